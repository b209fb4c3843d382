"""Orbax checkpoints of the whole run: train state (params, optimizer, step, RNG) + data position.

Saves are asynchronous (training does not wait on disk) and atomic (Orbax writes to a temporary
directory and renames it when complete, so a write cut short is never taken for a checkpoint;
the training run removes such leftovers when it starts again). Each checkpoint also
holds a digest (size and CRC32 of every file), written before the rename, so a file truncated
or corrupted later is caught before Orbax reads it: TensorStore would otherwise restore
flipped bits silently. A checkpoint whose bytes fail its digest is reported in one line,
moved aside (never deleted) and the previous one is used; one that fails to restore for any
other reason (a config it does not fit) is left in place and the run refuses to start. A save
that fails (a full disk) ends in one summary line naming the last good checkpoint.
"""
import errno
import functools
import glob
import json
import os
import shutil
import sys
import time
import zlib

import jax

from moejax.errors import ConfigError
from moejax.run import orbax_noise

DIGEST = 'moejax_digest.json'
# Rewritten by Orbax after the digest is taken, and not needed to restore: left out of it.
UNDIGESTED = (DIGEST, '_CHECKPOINT_METADATA')


class CorruptCheckpointError(RuntimeError):
    """A checkpoint's files do not match the digest written with them."""


class SaveError(RuntimeError):
    """A checkpoint could not be written; the message is the one line the user sees, `reason`
    its cause in a few words (e.g. 'No space left on device')."""

    def __init__(self, message: str, reason: str = ''):
        super().__init__(message)
        self.reason = reason


class _Protected:
    """Orbax preservation policy: keep the given steps whatever the rotation says (the last
    checkpoint known good while non-finite steps are being skipped)."""

    def __init__(self, steps: set):
        self.steps = steps

    def should_preserve(self, checkpoints, *, context):
        del context
        return [c.step in self.steps for c in checkpoints]


def file_digests(step_dir: str) -> dict[str, list[int]]:
    """{relative path: [size, crc32]} for every file a checkpoint needs."""
    digests = {}
    for root, _, files in os.walk(step_dir):
        for name in files:
            path = os.path.join(root, name)
            rel = os.path.relpath(path, step_dir)
            if rel in UNDIGESTED:
                continue
            crc = 0
            with open(path, 'rb') as f:
                while chunk := f.read(1 << 22):
                    crc = zlib.crc32(chunk, crc)
            digests[rel] = [os.path.getsize(path), crc]
    return digests


def write_digest(step_dir: str) -> None:
    """Record the files of a just-written checkpoint (atomically: a cut write leaves none)."""
    digests, path = file_digests(step_dir), os.path.join(step_dir, DIGEST)
    with open(path + '.tmp', 'w') as f:
        json.dump(digests, f, sort_keys=True)
    os.replace(path + '.tmp', path)


def verify_digest(step_dir: str) -> bool:
    """Raise CorruptCheckpointError on a missing, truncated or altered file.

    Returns False (nothing checked) for a checkpoint written without a digest.
    """
    path = os.path.join(step_dir, DIGEST)
    if not os.path.exists(path):
        return False
    with open(path) as f:
        expected = json.load(f)
    actual = file_digests(step_dir)
    for rel, (size, crc) in sorted(expected.items()):
        if rel not in actual:
            raise CorruptCheckpointError(f'{rel} is missing')
        if actual[rel][0] != size:
            raise CorruptCheckpointError(f'{rel} has {actual[rel][0]} bytes, expected {size}')
        if actual[rel][1] != crc:
            raise CorruptCheckpointError(f'{rel} has a wrong checksum (corrupted)')
    return True


def _one_line(err: Exception, limit: int = 200) -> str:
    text = ' '.join(str(err).split())
    return f'{type(err).__name__}: {text[:limit]}'


@functools.cache
def _whole_shards_on_cpu() -> None:
    """On CPU every device is the host's own memory, so Orbax's replica-parallel saving (its
    default except on GPU) gains no bandwidth: it slices each replicated array into one piece
    per device, every shape a program compiled on its own. There one replica writes each shard
    whole, as on GPU: the same arrays restore, bit for bit. The tiny run on 8 CPU devices: 5
    compiles instead of 85 (1.3 s less), checkpoints of 0.59 MB instead of 1.3-1.7 MB."""
    if jax.default_backend() != 'cpu':
        return
    # Orbax's default jax.Array handler, but for replica-parallel, replaced without a warning
    # (register_type_handler logs one, which would reach the user): both only in _src.
    import orbax.checkpoint as ocp
    from orbax.checkpoint._src.metadata.array_metadata_store import Store
    from orbax.checkpoint._src.serialization.type_handler_registry import (
        GLOBAL_TYPE_HANDLER_REGISTRY,
    )
    handler = ocp.type_handlers.ArrayHandler(use_replica_parallel=False,
                                             array_metadata_store=Store())
    GLOBAL_TYPE_HANDLER_REGISTRY.add(jax.Array, handler, override=True, ignore_warnings=True)


class Checkpointer:
    """Save/restore (state, data position) by step.

    Only the training run that owns the directory passes cleanup_tmp (removing saves cut short
    by a crash); a reader of a live run's directory passes read_only and changes nothing.
    """

    def __init__(self, workdir: str, keep: int, *, async_save: bool = True,
                 read_only: bool = False, cleanup_tmp: bool = False):
        self.workdir = workdir
        self.directory = os.path.join(os.path.abspath(workdir), 'checkpoints')
        self.read_only, self.async_save = read_only, async_save
        self._saving = None  # the step whose asynchronous save is in flight, until its commit
        self._in_flight = None  # the step of the last save, until it is known to have finished
        self.failed = None  # the SaveError already reported, if any
        self.protected = set()  # steps rotation must keep (see protect)
        import orbax.checkpoint as ocp  # 0.15 s: imported where checkpoints are read or written
        _whole_shards_on_cpu()
        async_options = ocp.AsyncOptions(post_finalization_callback=self._before_commit) \
            if async_save else None
        policies = ocp.checkpoint_managers
        retention = None if read_only else policies.AnyPreservationPolicy(
            [policies.LatestN(keep), _Protected(self.protected)])
        options = ocp.CheckpointManagerOptions(
            preservation_policy=retention, create=not read_only, read_only=read_only,
            cleanup_tmp_directories=cleanup_tmp and not read_only,
            enable_async_checkpointing=async_save, async_options=async_options)
        self.manager = ocp.CheckpointManager(self.directory, options=options)
        if not read_only:
            orbax_noise.quiet_background_failures()

    def steps(self) -> list[int]:
        return sorted(self.manager.all_steps())

    def protect(self, steps) -> None:
        """Keep exactly these steps through rotation (besides the newest `keep`)."""
        self.protected.clear()
        self.protected.update(s for s in steps if s is not None)

    def save(self, step: int, state, data_state: dict) -> bool:
        """Start an asynchronous save; a step that is already saved is left untouched.

        Raises SaveError (one line) if this save, or the one before it, failed."""
        if step in self.manager.all_steps():
            return False
        self.wait()  # one save in flight: _saving names it
        self._saving = self._in_flight = step
        import orbax.checkpoint as ocp
        args = ocp.args.Composite(state=ocp.args.StandardSave(state),
                                  data=ocp.args.JsonSave(data_state))
        try:
            saved = self.manager.save(step, args=args)
            if saved and not self.async_save:
                self._write_digest(os.path.join(self.directory, str(step)))
        except Exception as err:  # noqa: BLE001 - any failure to write is reported the same way
            raise self._save_failed(step, err) from None
        return saved

    def _save_failed(self, step: int, err: Exception) -> SaveError:
        """The one-line report of a failed save, naming the newest committed checkpoint."""
        self._saving = self._in_flight = None
        try:
            self.manager.reload()
            good = [s for s in self.steps() if s != step]
        except Exception:  # noqa: BLE001 - the listing itself may fail on a broken disk
            good = []
        last = f'step {good[-1]}' if good else 'none (no checkpoint was saved)'
        reason = _root_cause(err)
        self.failed = SaveError(f'checkpoint at step {step} not saved: {reason}; the last good '
                                f'checkpoint is {last}', reason)
        return self.failed

    def _before_commit(self) -> None:
        """Orbax calls this when a save's files are complete, before the rename commits it."""
        step, self._saving = self._saving, None
        tmp = glob.glob(os.path.join(self.directory, f'{step}.orbax-checkpoint-tmp*'))
        self._write_digest(tmp[0] if len(tmp) == 1 else os.path.join(self.directory, str(step)))

    def _write_digest(self, step_dir: str) -> None:
        if jax.process_index() == 0 and os.path.isdir(step_dir):
            write_digest(step_dir)

    def restore(self, abstract_state, step: int | None = None):
        """(state, data_state, step) from `step` or the newest restorable one; None if none.

        A checkpoint whose bytes fail their digest is skipped, and moved aside (by a training
        run) once an older one restores; when none restores the training run refuses (nothing
        moved). Any other failure leaves the checkpoint in place: a training run refuses, a
        reader warns and tries the previous one."""
        return self._first_restorable(lambda s: self._restore(abstract_state, s), step)

    def _first_restorable(self, restore_step, step: int | None):
        """restore_step(step), or else the newest step it restores (see restore)."""
        if step is not None:
            return restore_step(step)
        damaged = []
        for s in self.steps()[::-1]:
            try:
                restored = restore_step(s)
            except CorruptCheckpointError as err:
                damaged.append((s, err))
                continue
            except Exception as err:  # noqa: BLE001 - any failure means: not restorable
                if not self.read_only:
                    raise self._unfit(s, err) from None
                print(f'WARNING: checkpoint {s} could not be restored ({_one_line(err)}); '
                      'left in place, trying the previous one', file=sys.stderr, flush=True)
                continue
            self._report_damaged(damaged, f'resuming from step {s}')
            return restored
        if damaged and not self.read_only:
            found = '; '.join(f'step {s}: {_one_line(err, 100)}' for s, err in damaged)
            raise ConfigError('--workdir', self.workdir, (
                f'holds no readable checkpoint ({found}); nothing was moved or deleted. Pass '
                '--restart to set them aside and start over from step 0, or put good copies '
                f'back into {self.directory}'))
        self._report_damaged(damaged, 'no older one')
        return None

    def _report_damaged(self, damaged, outcome: str) -> None:
        for s, err in damaged:
            where = self._set_aside(s)
            print(f'WARNING: checkpoint {s} could not be restored ({_one_line(err)}); {where}; '
                  f'{outcome}', file=sys.stderr, flush=True)

    def _unfit(self, step: int, err: Exception) -> ConfigError:
        return ConfigError('--workdir', self.workdir, (
            f'checkpoint {step} could not be restored ({_one_line(err, 160)}) although its files '
            'are whole; it was left in place. It was probably saved with another config or '
            'version: resume with the config in config.json, use a new --workdir, or pass '
            '--restart to set this run aside and start over'))

    def read_params(self, abstract_parts: dict, step: int | None = None):
        """(parts, step): only the named parts of a saved train state, e.g. {'params': ...,
        'extra': ...} given as ShapeDtypeStructs with their shardings, of `step` (default: the
        newest restorable); a step never saved, or no restorable checkpoint, is a ConfigError.

        Orbax's partial restore reads no other array: the optimizer moments (twice the
        parameters under Adam) take no memory and need not fit any optimizer (the digest check
        still reads every file's bytes once, to catch corruption). Orbax binds one handler to
        the 'state' item per manager, so a Checkpointer that reads parts restores no whole
        states (use another one)."""
        return self._read(lambda s: self._restore_parts(abstract_parts, s), step)

    def _read(self, restore_step, step: int | None):
        steps = self.steps()
        if step is not None and step not in steps:
            raise ConfigError('--step', step, f'no such checkpoint; saved steps: {steps}')
        try:
            restored = self._first_restorable(restore_step, step)
        except CorruptCheckpointError as err:  # only an explicit step gets here
            raise ConfigError('--step', step, f'checkpoint {step} is damaged ({err}); saved '
                              f'steps: {steps}') from None
        if restored is None:
            raise ConfigError('--workdir', self.workdir, 'holds no restorable checkpoint')
        state, _, saved_step = restored
        return state, saved_step

    def _restore(self, abstract_state, step: int):
        import orbax.checkpoint as ocp
        verify_digest(os.path.join(self.directory, str(step)))
        args = ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state),
                                  data=ocp.args.JsonRestore())
        restored = self.manager.restore(step, args=args)
        return restored['state'], dict(restored['data']), step

    def _restore_parts(self, abstract_parts: dict, step: int):
        import orbax.checkpoint as ocp
        verify_digest(os.path.join(self.directory, str(step)))
        restore_args = ocp.checkpoint_utils.construct_restore_args(abstract_parts)
        args = ocp.args.Composite(state=ocp.args.PyTreeRestore(
            abstract_parts, restore_args=restore_args, partial_restore=True))
        restored = self.manager.restore(step, args=args)
        return dict(restored['state']), {}, step

    def _set_aside(self, step: int, folder: str = 'unreadable_checkpoints') -> str:
        """Move a checkpoint out of the manager's way, keeping it for inspection."""
        if self.read_only:
            return 'left in place (read-only)'
        src = os.path.join(self.directory, str(step))
        dst = os.path.join(self.workdir, folder, f'{step}-{int(time.time())}')
        if jax.process_index() == 0 and os.path.exists(src):
            os.makedirs(os.path.dirname(dst), exist_ok=True)
            shutil.move(src, dst)
        self.manager.reload()
        return f'moved to {dst}'

    def set_aside_diverged(self, step: int) -> str:
        """Move aside a checkpoint whose weights gave non-finite steps (kept, not deleted)."""
        self.wait()
        return self._set_aside(step, 'diverged_checkpoints')

    def wait(self) -> None:
        """Wait for the save in flight; SaveError (one line) if it failed."""
        try:
            self.manager.wait_until_finished()
        except Exception as err:  # noqa: BLE001 - any failure to write is reported the same way
            raise self._save_failed(self._in_flight, err) from None
        self._in_flight = None

    def close(self) -> None:
        """Finish the save in flight and close; a failure already reported is not raised twice."""
        reported = self.failed
        try:
            self.wait()
        except SaveError:
            if reported is None:
                raise
        finally:
            try:
                self.manager.close()
            except Exception:  # noqa: BLE001 - a failed save was reported by wait
                if self.failed is None:
                    raise


# Operating-system failures a save meets, named the way TensorStore's messages spell them.
_OS_ERRORS = tuple(os.strerror(code) for code in (
    errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS, errno.EACCES, errno.EIO, errno.ENOENT))


def _root_cause(err: BaseException) -> str:
    """The innermost cause of a failure, in a few words (e.g. 'No space left on device')."""
    seen, chain = set(), []
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        chain.append(err)
        err = err.__cause__ or err.__context__
    for e in chain[::-1]:
        if isinstance(e, OSError) and e.strerror:
            return e.strerror + (f' ({e.filename})' if e.filename else '')
    for reason in _OS_ERRORS:
        if any(reason in str(e) for e in chain):
            return reason
    return _one_line(chain[-1], 160)
