"""A training workdir's guards: one writer at a time (a lock file), and a resume guard that
compares the command's config with the one the saved checkpoints were trained with.

The lock is a file created atomically by process 0 (or by a conversion building the workdir),
naming host, pid and start time. A lock whose holder is a dead process on this host, or that
names no process at all, is stale and replaced; one held from another host (a shared
filesystem) cannot be checked from here, and the refusal says which file to delete once that run
is known to be gone. Readers (eval, generate, analyze) take no lock.
"""
import contextlib
import datetime
import json
import os
import shutil
import socket
import tempfile
import time

from moejax.errors import ConfigError

LOCK = 'train.lock'
CHANGES = 'config_changes.jsonl'
PREVIOUS_RUNS = 'previous_runs'
SET_ASIDE = ('unreadable_checkpoints', 'diverged_checkpoints')

# Keys that may change when a run resumes: they steer the run (length, cadence, retention,
# guards), or choose how the same function is computed and restore across layouts (mesh, comm,
# remat, attention and matmul implementations, the data's location), or set optimizer
# hyperparameters (a run stopped by the NaN guard resumes with a lower lr). A change of optimizer
# hyperparameter that alters the optimizer state's structure (clip_norm 0 <-> > 0) is refused by
# a separate structure check. opt.grad_accum splits the same global batch into micro-batches
# whose gradients add up to the whole batch's (same state, same data order): a memory knob.
# Every other key, including keys this list does not know yet, changes the saved state, the
# model function or the data order, and is refused.
STEERING = frozenset({
    'train.num_steps', 'train.log_every', 'train.eval_every', 'train.checkpoint_every',
    'train.keep_checkpoints', 'train.max_skipped_steps',
    'data.eval_batches', 'data.data_dir',
    'model.remat', 'model.attention', 'model.attention_block', 'moe.comm', 'moe.grouped_matmul',
    'moe.ep_buffer_factor',
    'opt.lr', 'opt.schedule', 'opt.warmup_steps', 'opt.clip_norm', 'opt.weight_decay',
    'opt.b1', 'opt.b2', 'opt.grad_accum'})
STEERING_GROUPS = ('mesh.',)
# A workdir whose only checkpoint is step 0 (written by moejax-convert: an imported or upcycled
# model, nothing trained yet) is a starting point: no data has been consumed, so the data, the
# compute dtype and the routing's capacity may still be chosen; the model and tokenizer may not.
STARTING_POINT = frozenset({
    'model.dtype', 'moe.dispatch', 'moe.capacity_factor', 'moe.eval_capacity_factor',
    'moe.group_size', 'moe.jitter', 'moe.aux_loss_weight', 'moe.z_loss_weight',
    'moe.capacity_rule', 'moe.min_capacity', 'moe.batch_prioritized'})
FIXED_DATA = ('data.vocab_size', 'data.tokenizer', 'data.tokenizer_path')


# ------------------------------------------------------------------------------------- lock


def _process_start(pid: int) -> str | None:
    """The kernel's start time of a process (Linux), to tell a reused pid from the holder."""
    try:
        with open(f'/proc/{pid}/stat') as f:
            return f.read().rsplit(')', 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def process_alive(pid: int, start: str | None = None) -> bool:
    """Whether process pid runs on this host (and, given its start time, is still that one)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return start is None or _process_start(pid) in (None, start)


MAX_PID = 1 << 22  # Linux's largest pid_max


def _valid_holder(holder) -> bool:
    pid = holder.get('pid') if isinstance(holder, dict) else None
    return isinstance(holder, dict) and isinstance(holder.get('host'), str) and \
        isinstance(pid, int) and not isinstance(pid, bool) and 0 < pid <= MAX_PID


class WorkdirLock:
    """The workdir's single-writer lock, held by a trainer's process 0 from start to exit (or by
    a conversion while it builds the workdir).

    The record (host, pid, start time, purpose) is written whole to a file aside, then
    hard-linked into place: the link fails if a lock exists, as O_EXCL would, and nobody ever
    sees an empty or half-written lock; a full disk leaves none behind. A lock naming a process
    that is gone from this host, or naming none (empty or damaged), is stale and replaced with
    one line saying so."""

    def __init__(self, workdir: str, purpose: str = 'trainer'):
        self.path = os.path.join(workdir, LOCK)
        self.purpose, self.held = purpose, False

    def acquire(self) -> None:
        """Create the lock file, replacing a stale one; ConfigError naming a live holder."""
        for _ in range(3):
            if self._link(self._record()):
                self.held = True
                return
            raw, holder = self._holder()
            if raw is None:
                continue  # released meanwhile
            if self._stale(holder) and self._take_stale(raw, holder):
                continue
            raise self._refusal(holder)
        raise self._refusal(self._holder()[1])

    def _record(self) -> bytes:
        pid = os.getpid()
        return json.dumps({
            'host': socket.gethostname(), 'pid': pid, 'pid_start': _process_start(pid),
            'purpose': self.purpose, 'started': datetime.datetime.now(
                datetime.timezone.utc).isoformat(timespec='seconds')}).encode()

    def _link(self, record: bytes) -> bool:
        """Write the record aside and link it into place; False if a lock is already there."""
        aside = f'{self.path}.{os.getpid()}.tmp'
        try:
            with open(aside, 'wb') as f:
                f.write(record)
                f.flush()
                os.fsync(f.fileno())
            os.link(aside, self.path)
            return True
        except FileExistsError:
            return False
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(aside)

    def _holder(self) -> tuple[bytes | None, dict | None]:
        """(the lock's bytes, or None if there is no lock; its record, or None if it names no
        process: empty, not JSON, or a pid that cannot be one)."""
        try:
            with open(self.path, 'rb') as f:
                raw = f.read()
        except FileNotFoundError:
            return None, None
        except OSError:
            return b'', None
        try:
            holder = json.loads(raw)
        except ValueError:
            holder = None
        return raw, holder if _valid_holder(holder) else None

    def _stale(self, holder: dict | None) -> bool:
        """Stale: the lock names no process, or a dead one on this host."""
        if holder is None:
            return True
        return holder['host'] == socket.gethostname() and \
            not process_alive(holder['pid'], holder.get('pid_start'))

    def _take_stale(self, raw: bytes, holder: dict | None) -> bool:
        """Move the stale lock away atomically; False if someone else's lock was moved instead
        (a racing start replaced it first), which is then put back."""
        aside = f'{self.path}.stale.{os.getpid()}'
        try:
            os.rename(self.path, aside)
        except FileNotFoundError:
            return True
        with open(aside, 'rb') as f:
            moved = f.read()
        if moved != raw:
            os.rename(aside, self.path)
            return False
        os.unlink(aside)
        print(f'Removed a stale lock left by pid {holder["pid"]} on this host (started '
              f'{holder.get("started")}).' if holder else f'Removed an unreadable lock file '
              f'{self.path} (it names no process that could hold it).', flush=True)
        return True

    def _refusal(self, holder: dict | None) -> ConfigError:
        who = 'another moejax process' if holder is None else (
            f'another {holder.get("purpose", "trainer")}: host {holder["host"]}, pid '
            f'{holder["pid"]}, started {holder.get("started")}')
        return ConfigError('--workdir', os.path.dirname(self.path), (
            f'is in use by {who} (lock file {self.path}). Wait for that run to end or stop it; '
            'if it is gone (killed on another machine of a shared filesystem), delete the lock '
            'file and start again'))

    def release(self) -> None:
        """Remove the lock if this process still holds it (never another run's)."""
        if not self.held:
            return
        self.held = False
        holder = self._holder()[1]
        if holder is not None and holder['pid'] == os.getpid() and \
                holder['host'] == socket.gethostname():
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.path)


# ------------------------------------------------------------------------------ resume guard


def unwritable(directory: str) -> str | None:
    """Why files cannot be written in directory (created if missing), or None if they can."""
    try:
        os.makedirs(directory, exist_ok=True)
        with tempfile.TemporaryFile(dir=directory):
            pass
    except OSError as err:
        return err.strerror or str(err)
    return None


def saved_steps(workdir: str) -> list[int]:
    """Committed checkpoints in workdir/checkpoints (Orbax renames a finished save to its step)."""
    directory = os.path.join(workdir, 'checkpoints')
    if not os.path.isdir(directory):
        return []
    return sorted(int(name) for name in os.listdir(directory) if name.isdigit())


def set_aside_checkpoints(workdir: str) -> list[str]:
    """Checkpoints an earlier run moved aside (damaged bytes, or weights that diverged)."""
    found = []
    for name in SET_ASIDE:
        directory = os.path.join(workdir, name)
        if os.path.isdir(directory):  # checkpoints are folders; the diverged metrics a file
            found += [os.path.join(name, entry) for entry in sorted(os.listdir(directory))
                      if os.path.isdir(os.path.join(directory, entry))]
    return found


def is_steering(key: str) -> bool:
    return key in STEERING or key.startswith(STEERING_GROUPS)


def is_free_at_start(key: str) -> bool:
    return key in STARTING_POINT or key.startswith('data.') and key not in FIXED_DATA


def _flatten(tree: dict, prefix: str = '') -> dict:
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f'{prefix}{key}.'))
        else:
            flat[f'{prefix}{key}'] = json.loads(json.dumps(value))  # tuples as lists, like JSON
    return flat


ABSENT = '(absent)'


def config_changes(saved_cfg, cfg) -> dict[str, tuple]:
    """{key: (saved value, new value)} for every key of cfg that differs from the saved config.

    Ignored: keys only the saved config has (this code no longer reads them), and the moe.*
    keys when both models are dense (moe_every 0: no layer reads them). Keys with an automatic
    value compare as resolved (scan_layers None is whatever the depth implies)."""
    from moejax import config as config_lib
    old, new = _flatten(saved_cfg.to_dict()), _flatten(cfg.to_dict())
    old['model.scan_layers'] = config_lib.scans_layers(saved_cfg)
    new['model.scan_layers'] = config_lib.scans_layers(cfg)
    dense = saved_cfg.model.moe_every == 0 and cfg.model.moe_every == 0
    return {key: (old.get(key, ABSENT), value) for key, value in sorted(new.items())
            if old.get(key, ABSENT) != value and not (dense and key.startswith('moe.'))}


def load_saved_config(workdir: str):
    """The config the saved checkpoints were trained with (None if there is no saved state)."""
    from moejax import config as config_lib
    if not (saved_steps(workdir) or set_aside_checkpoints(workdir)):
        return None
    path = os.path.join(workdir, 'config.json')
    if not os.path.exists(path):
        raise ConfigError('--workdir', workdir, 'holds checkpoints but no config.json to check '
                          'this config against; put it back, or pass --restart to set the old '
                          'run aside (nothing is deleted) and start over')
    try:
        return config_lib.from_json(path)
    except (OSError, ValueError, TypeError, KeyError, AttributeError) as err:
        raise ConfigError('--workdir', workdir, f'{path} is unreadable ({type(err).__name__}: '
                          f'{" ".join(str(err).split())[:120]}); cannot check this config '
                          'against the saved checkpoints; repair it, or pass --restart') from None


def _flag_value(value) -> str:
    """A saved config value as a --config.KEY=VALUE flag spells it."""
    return value if isinstance(value, str) else repr(value)


def resume_fixes(workdir: str, refused: dict, argv: list | None) -> str:
    """How to resume, from what was given: drop each --config.KEY flag that made a refused
    change, add back (with the saved value) each refused key that came from the config file."""
    given = {a[len('--config.'):].split('=', 1)[0]: a for a in argv or []
             if a.startswith('--config.')}
    fixes = [f'drop {given[key]}' if key in given else f'add --config.{key}={_flag_value(old)}'
             for key, (old, _) in refused.items() if old != ABSENT]
    saved = f'--config=configs/saved.py:{workdir}'
    if argv is None or not fixes or len(fixes) > 3:  # a different recipe: its saved config
        return f'resume it with the config it saved: {saved}'
    return f'resume it: {", ".join(fixes)} (or use {saved})'


def refusal(workdir: str, refused: dict, why: str, argv: list | None = None) -> ConfigError:
    """The one-line refusal of a resume whose config does not fit the saved run, naming the
    ways out (see resume_fixes)."""
    listed = '; '.join(f'{key} {old!r} -> {new!r}' for key, (old, new) in refused.items())
    return ConfigError('--workdir', workdir, (
        f'was trained with a different config: {listed} ({why}). Nothing was changed. To '
        f'{resume_fixes(workdir, refused, argv)}; to train this config instead, use a new '
        '--workdir (for a deliberate change of model, start it from this run with the '
        'import/upcycle path), or pass --restart to set this run aside (nothing is deleted) and '
        'start over here'))


def check_resume(cfg, workdir: str, argv: list | None = None):
    """(saved config, allowed changes) for a workdir with saved state; (None, {}) without.

    Raises ConfigError (exit 2, one line) when a key outside STEERING changed; argv (the
    command) lets it say which flags to drop or add."""
    saved_cfg = load_saved_config(workdir)
    if saved_cfg is None:
        return None, {}
    changes = config_changes(saved_cfg, cfg)
    fresh = saved_steps(workdir) == [0]
    # A model imported without a tokenizer may be given one before it is trained.
    untokenized = saved_cfg.data.get('tokenizer') == 'none'
    refused = {k: v for k, v in changes.items() if not (is_steering(k) or fresh and (
        is_free_at_start(k) or untokenized and k in ('data.tokenizer', 'data.tokenizer_path')))}
    if refused:
        raise refusal(workdir, refused, 'these keys change the saved state, the model function '
                      'or the data order', argv)
    return saved_cfg, changes


def record_changes(workdir: str, changes: dict, step: int | None) -> None:
    """Say which steering keys changed, on the console and in config_changes.jsonl."""
    if not changes:
        return
    path = os.path.join(workdir, CHANGES)
    listed = '; '.join(f'{key} {old!r} -> {new!r}' for key, (old, new) in changes.items())
    with open(path, 'a') as f:
        f.write(json.dumps({'time': datetime.datetime.now(datetime.timezone.utc).isoformat(
            timespec='seconds'), 'resumed_from_step': step,
            'changes': {k: list(v) for k, v in changes.items()}}) + '\n')
    print(f'Config changed since the last run (recorded in {path}): {listed}', flush=True)


def set_aside_run(workdir: str) -> str | None:
    """--restart: move everything of the old run (checkpoints, metrics, config, tokenizer...)
    into previous_runs/<time>/; nothing is deleted. Returns where, or None if nothing."""
    entries = [e for e in sorted(os.listdir(workdir)) if e not in (LOCK, PREVIOUS_RUNS)
               and not e.startswith(LOCK + '.')]
    if not entries:
        return None
    stamp = time.strftime('%Y%m%d-%H%M%S', time.gmtime())
    dst = os.path.join(workdir, PREVIOUS_RUNS, stamp)
    suffix = 0
    while os.path.exists(dst):
        suffix += 1
        dst = os.path.join(workdir, PREVIOUS_RUNS, f'{stamp}-{suffix}')
    os.makedirs(dst)
    for entry in entries:
        shutil.move(os.path.join(workdir, entry), os.path.join(dst, entry))
    print(f'--restart: the previous run ({", ".join(entries)}) was moved to {dst}.', flush=True)
    return dst
