"""Issue 12, through the command line: a config that does not fit the saved run is refused and
changes nothing; the NaN/spike guard keeps and names the last good checkpoint; one trainer per
workdir; a double Ctrl-C exits 130; a full disk gives one line.

The truth each test compares against is an independent run: an uninterrupted run of the same
command, or a run that used the changed setting from the resumed step on.
"""
import glob
import hashlib
import json
import os
import resource
import shlex
import shutil
import signal
import subprocess
import sys
import time

import pytest

from moejax.data import stdlib_corpus
from moejax.run import workdir as workdir_lib
from tests.helpers import REPO, tiny_config

COMMAND = ('--config=configs/default.py:tiny', '--config.train.log_every=1')
TIMING_KEYS = ('tokens_per_sec', 'mfu')
# lr 1e6 without clipping: step 2's update ruins the weights, step 3's loss is ~1e18 (a spike),
# every later one a spike or non-finite. A constant schedule, so num_steps does not change lr.
DIVERGING = ('--config.opt.lr=1e6', '--config.opt.clip_norm=0', '--config.opt.schedule=constant',
             '--config.train.checkpoint_every=1', '--config.train.keep_checkpoints=1',
             '--config.train.max_skipped_steps=3')


@pytest.fixture(scope='module')
def cache_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp('moejax_compile_cache'))


def command(workdir, data_dir, *extra):
    return [sys.executable, os.path.join(REPO, 'launch', 'train.py'), f'--workdir={workdir}',
            *COMMAND, f'--config.data.data_dir={data_dir}', *extra]


def env(cache_dir):
    return dict(os.environ, JAX_PLATFORMS='cpu', PYTHONUNBUFFERED='1',
                XLA_FLAGS='--xla_force_host_platform_device_count=8',
                JAX_COMPILATION_CACHE_DIR=cache_dir, JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES='0',
                JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS='0')


def train(workdir, data_dir, cache_dir, *extra, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(command(workdir, data_dir, *extra), cwd=REPO, env=env(cache_dir),
                          capture_output=True, text=True, timeout=300, **kwargs)


def start(workdir, data_dir, cache_dir, *extra) -> subprocess.Popen:
    return subprocess.Popen(command(workdir, data_dir, *extra), cwd=REPO, env=env(cache_dir),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def read_until(proc, predicate) -> list[str]:
    seen = []
    for line in proc.stdout:
        seen.append(line)
        if predicate(line):
            break
    return seen


def error_lines(result) -> list[str]:
    return [line for line in result.stderr.splitlines() if line.strip()]


def train_records(workdir) -> list[dict]:
    with open(os.path.join(workdir, 'metrics.jsonl')) as f:
        rows = [json.loads(line) for line in f]
    return [{k: v for k, v in r.items() if k not in TIMING_KEYS} for r in rows if 'loss' in r]


def snapshot(workdir, skip=()) -> dict[str, str]:
    """{relative path: sha256} of every file in the workdir (but those under `skip`)."""
    out = {}
    for path in glob.glob(os.path.join(workdir, '**'), recursive=True):
        if os.path.isfile(path) and not os.path.relpath(path, workdir).startswith(skip):
            with open(path, 'rb') as f:
                out[os.path.relpath(path, workdir)] = hashlib.sha256(f.read()).hexdigest()
    return out


@pytest.fixture(scope='module')
def finished(data_dir, cache_dir, tmp_path_factory):
    """A finished 10-step tiny run (checkpoints at 5 and 10): the truth for resumes."""
    workdir = str(tmp_path_factory.mktemp('finished'))
    result = train(workdir, data_dir, cache_dir)
    assert result.returncode == 0, result.stderr[-3000:]
    assert workdir_lib.saved_steps(workdir) == [5, 10]
    return workdir


# ----------------------------------------------------------------- finding 1: resume guard


@pytest.mark.slow
def test_config_that_changes_the_saved_state_is_refused_and_nothing_is_touched(
        finished, data_dir, cache_dir, tmp_path):
    workdir = str(tmp_path / 'run')
    shutil.copytree(finished, workdir)
    before = snapshot(workdir)
    for flag, expected in (('--config.model.d_model=64', 'model.d_model 32 -> 64'),
                           ('--config.opt.name=adafactor', "opt.name 'adamw' -> 'adafactor'")):
        result = train(workdir, data_dir, cache_dir, flag)
        assert result.returncode == 2, result.stderr[-3000:]
        lines = error_lines(result)
        assert len(lines) == 1 and expected in lines[0] and 'new --workdir' in lines[0], lines
        assert snapshot(workdir) == before  # checkpoints, config.json, metrics: byte-identical
    # clip_norm is an optimizer hyperparameter, but 0 removes a state entry: refused too.
    result = train(workdir, data_dir, cache_dir, '--config.opt.clip_norm=0')
    assert result.returncode == 2 and 'opt.clip_norm 1.0 -> 0' in result.stderr, result.stderr
    assert snapshot(workdir) == before

    # A steering key may change: the run resumes, and the change is recorded.
    result = train(workdir, data_dir, cache_dir, '--config.train.num_steps=12')
    assert result.returncode == 0, result.stderr[-3000:]
    assert 'Resumed from checkpoint at step 10.' in result.stdout
    assert 'train.num_steps 10 -> 12' in result.stdout
    with open(os.path.join(workdir, workdir_lib.CHANGES)) as f:
        records = [json.loads(line) for line in f]
    assert records[-1]['changes'] == {'train.num_steps': [10, 12]}
    assert records[-1]['resumed_from_step'] == 10
    assert train_records(workdir)[:10] == train_records(finished)  # history kept
    assert [r['step'] for r in train_records(workdir)] == list(range(1, 13))


@pytest.mark.slow
def test_a_finished_run_says_so_and_names_the_command_that_extends_it(finished, data_dir,
                                                                      cache_dir, tmp_path):
    """Issue 29: the start banner says what runs; rerunning a finished run says it is finished
    and gives the command that extends it, and that command does."""
    workdir = str(tmp_path / 'run')
    shutil.copytree(finished, workdir)
    result = train(workdir, data_dir, cache_dir)
    assert result.returncode == 0, result.stderr[-3000:]
    lines = result.stdout.splitlines()
    assert lines[0] == (f'moejax: training configs/default.py:tiny with 2 override(s) in '
                        f'{workdir} (already finished)')
    assert lines[1].startswith('  model: 2 layers, d_model 32, 1 MoE layer(s) of 4 experts')
    assert lines[2] == '  devices: 8 x cpu in 1 process(es); mesh data=8 fsdp=1 expert=1 tensor=1'
    digest = stdlib_corpus.stdlib_manifest().digest[:16]
    assert lines[3] == (f'  data: python_stdlib (digest {digest}), byte tokenizer of 259 ids; '
                        '8 x 32 = 256 tokens per step')
    assert lines[4].startswith('  steps: 10 -> 10; adamw')
    finished_line = 'The run is finished: step 10 of train.num_steps=10, checkpoint saved. To ' \
                    'train further, raise train.num_steps: '
    assert lines[-1].startswith(finished_line)
    command = shlex.split(lines[-1][len(finished_line):])
    assert command[:2] == ['python', 'launch/train.py'] and command[-1] == \
        '--config.train.num_steps=20'
    extended = subprocess.run([sys.executable, *command[1:]], cwd=REPO, env=env(cache_dir),
                              capture_output=True, text=True, timeout=300)
    assert extended.returncode == 0, extended.stderr[-3000:]
    assert f'moejax: training configs/default.py:tiny with 3 override(s) in {workdir} ' \
           '(resuming from step 10)' in extended.stdout.splitlines()
    assert [r['step'] for r in train_records(workdir)] == list(range(1, 21))


@pytest.mark.slow
def test_all_checkpoints_damaged_is_refused_unless_restart(finished, data_dir, cache_dir,
                                                           tmp_path):
    workdir = str(tmp_path / 'run')
    shutil.copytree(finished, workdir)
    for step in (5, 10):  # flip one byte of each checkpoint's largest file
        files = [p for p in glob.glob(os.path.join(workdir, 'checkpoints', str(step), '**'),
                                      recursive=True) if os.path.isfile(p)]
        largest = max(files, key=os.path.getsize)
        with open(largest, 'r+b') as f:
            f.seek(100)
            byte = f.read(1)
            f.seek(100)
            f.write(bytes([byte[0] ^ 1]))
    before = snapshot(workdir, skip=('tensorboard',))
    result = train(workdir, data_dir, cache_dir)
    assert result.returncode == 2, result.stderr[-3000:]
    lines = error_lines(result)
    assert len(lines) == 1 and 'no readable checkpoint' in lines[0], lines
    assert 'step 10' in lines[0] and 'step 5' in lines[0] and '--restart' in lines[0]
    # Nothing moved or changed (the refusal comes after setup opened a TensorBoard file).
    assert snapshot(workdir, skip=('tensorboard',)) == before

    result = train(workdir, data_dir, cache_dir, '--restart')
    assert result.returncode == 0, result.stderr[-3000:]
    # Nothing deleted: the damaged run is in previous_runs/, byte for byte.
    [previous] = glob.glob(os.path.join(workdir, workdir_lib.PREVIOUS_RUNS, '*'))
    assert snapshot(previous, skip=('tensorboard',)) == before
    # The fresh start equals the original run from step 0.
    assert train_records(workdir) == train_records(finished)


# ---------------------------------------------------------------- finding 2: the NaN guard


@pytest.mark.slow
def test_guard_keeps_names_and_resumes_from_the_last_good_checkpoint(data_dir, cache_dir,
                                                                     tmp_path):
    workdir = str(tmp_path / 'run')
    result = train(workdir, data_dir, cache_dir, *DIVERGING)
    assert result.returncode == 1, result.stderr[-3000:]
    lines = error_lines(result)
    assert len(lines) == 1 and lines[0].startswith('moejax: 3 steps in a row'), lines
    rows = train_records(workdir)
    first_skipped = next(r['step'] for r in rows if r['skipped'])
    assert all(r['skipped'] for r in rows if r['step'] >= first_skipped)
    # Checkpoint first_skipped-1 holds the weights that gave the first skipped step; the one
    # before it is the last good one, kept although keep_checkpoints=1.
    good = first_skipped - 2
    assert good >= 1
    assert f'The last good checkpoint is step {good};' in lines[0]
    assert workdir_lib.saved_steps(workdir) == [good]
    assert glob.glob(os.path.join(workdir, 'diverged_checkpoints', f'{first_skipped - 1}-*'))
    with open(os.path.join(workdir, 'metrics.jsonl')) as f:
        diverged = [line for line in f if json.loads(line)['step'] > good]

    # Resume with a sane lr: from the good step, exactly as a run that switched lr there.
    sane = ('--config.opt.lr=1e-3',)
    result = train(workdir, data_dir, cache_dir, *DIVERGING, *sane)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f'Resumed from checkpoint at step {good}.' in result.stdout
    assert 'opt.lr 1000000.0 -> 0.001' in result.stdout
    # The diverged steps' records, cut from metrics.jsonl by the resume, are kept beside the
    # diverged checkpoint, as the message said (issue 24, finding 7).
    [copy] = glob.glob(os.path.join(workdir, 'diverged_checkpoints',
                                    f'metrics_after_step_{good}-*.jsonl'))
    assert f'were copied to {copy}' in lines[0]
    with open(copy) as f:
        assert f.readlines() == diverged and len(diverged) >= 3

    reference = str(tmp_path / 'reference')
    first = train(reference, data_dir, cache_dir, *DIVERGING, f'--config.train.num_steps={good}')
    assert first.returncode == 0, first.stderr[-3000:]
    second = train(reference, data_dir, cache_dir, *DIVERGING, *sane)
    assert second.returncode == 0, second.stderr[-3000:]
    assert train_records(workdir) == train_records(reference)


# -------------------------------------------------------------- finding 3: the workdir lock


@pytest.mark.slow
def test_second_trainer_is_refused_and_a_killed_runs_lock_does_not_block(data_dir, cache_dir,
                                                                        tmp_path):
    workdir = str(tmp_path / 'run')
    first = start(workdir, data_dir, cache_dir, '--config.train.num_steps=1000')
    try:
        read_until(first, lambda line: line.startswith('step'))
        holder = json.load(open(os.path.join(workdir, workdir_lib.LOCK)))
        assert holder['pid'] == first.pid
        second = train(workdir, data_dir, cache_dir, '--config.train.num_steps=1000')
        assert second.returncode == 2, second.stderr[-3000:]
        lines = error_lines(second)
        assert len(lines) == 1 and f'pid {first.pid}' in lines[0], lines
    finally:
        first.kill()
        first.wait(timeout=60)
        first.stdout.close()
        first.stderr.close()
    assert os.path.exists(os.path.join(workdir, workdir_lib.LOCK))  # left by the killed run
    third = train(workdir, data_dir, cache_dir)
    assert third.returncode == 0, third.stderr[-3000:]
    assert 'Removed a stale lock' in third.stdout
    assert not os.path.exists(os.path.join(workdir, workdir_lib.LOCK))  # released at exit
    steps = [r['step'] for r in train_records(workdir)]  # one record per step, in order
    assert steps == list(range(1, max(steps) + 1)) and max(steps) >= 10


def test_lock_is_exclusive_and_only_the_holder_releases_it(tmp_path):
    lock = workdir_lib.WorkdirLock(str(tmp_path))
    lock.acquire()
    with pytest.raises(workdir_lib.ConfigError, match=f'pid {os.getpid()}'):
        workdir_lib.WorkdirLock(str(tmp_path)).acquire()  # held by a live process
    lock.release()
    assert not os.path.exists(lock.path)
    # A lock of a process that has exited on this host is stale.
    dead = subprocess.run([sys.executable, '-c', 'import os; print(os.getpid())'],
                          capture_output=True, text=True).stdout.strip()
    with open(lock.path, 'w') as f:
        json.dump({'host': os.uname().nodename, 'pid': int(dead), 'started': 'then'}, f)
    lock.acquire()
    assert json.load(open(lock.path))['pid'] == os.getpid()
    lock.release()
    # One from another host cannot be checked from here: refused, naming the file to delete.
    with open(lock.path, 'w') as f:
        json.dump({'host': 'elsewhere', 'pid': 1, 'started': 'then'}, f)
    with pytest.raises(workdir_lib.ConfigError, match='delete the lock file'):
        lock.acquire()


# ------------------------------------------------------------------ finding 4: two signals


@pytest.mark.slow
def test_double_sigint_exits_130_and_the_run_resumes_exactly(finished, data_dir, cache_dir,
                                                            tmp_path):
    workdir = str(tmp_path / 'run')
    codes = []
    for attempt in range(5):
        proc = start(workdir, data_dir, cache_dir)
        if attempt % 2:  # during setup or compilation
            time.sleep(2 + attempt)
        else:  # during training, around a save
            read_until(proc, lambda line: line.startswith('step') or line.startswith('eval'))
        proc.send_signal(signal.SIGINT)
        time.sleep(0.1 * attempt)
        proc.send_signal(signal.SIGINT)
        signalled = time.time()
        codes.append(proc.wait(timeout=60))
        elapsed = time.time() - signalled
        stderr = proc.stderr.read()
        proc.stdout.close()
        proc.stderr.close()
        assert codes[-1] in (0, 130), (codes, stderr[-3000:])  # 0: it had finished already
        assert elapsed < 10, f'took {elapsed:.1f}s to exit'
        assert not os.path.exists(os.path.join(workdir, workdir_lib.LOCK))
    assert 130 in codes, codes
    result = train(workdir, data_dir, cache_dir)
    assert result.returncode == 0, result.stderr[-3000:]
    assert train_records(workdir) == train_records(finished)


# ---------------------------------------------------------------------- a failed save


def _small_filesystem(path) -> str:
    """'tmpfs' if a 1.6 MB tmpfs could be mounted at path (root), else 'rlimit'."""
    os.makedirs(path)
    if os.geteuid() == 0 and shutil.which('mount'):
        done = subprocess.run(['mount', '-t', 'tmpfs', '-o', 'size=1600k', 'tmpfs', str(path)],
                              capture_output=True)
        if done.returncode == 0:
            return 'tmpfs'
    return 'rlimit'


def _limit_file_size():
    """Fault injection where no tmpfs can be mounted: a file larger than 200 kB fails with
    EFBIG (SIGXFSZ ignored), as the checkpoint's data file does."""
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (200_000, 200_000))


@pytest.mark.slow
def test_full_disk_gives_one_summary_line(finished, data_dir, cache_dir, tmp_path):
    mount = str(tmp_path / 'small')
    kind = _small_filesystem(mount)
    workdir = os.path.join(mount, 'run')
    try:
        if kind == 'tmpfs':
            # 1.6 MB hold about one checkpoint (step 5) beside the logs; whether it fits varies
            # by a few kB from run to run, so the one line must name what is on disk.
            result = train(workdir, data_dir, cache_dir)
            reason = 'No space left on device'
        else:
            result = train(workdir, data_dir, cache_dir, preexec_fn=_limit_file_size)
            reason = 'File too large'
        assert result.returncode == 1, result.stderr[-3000:]
        saved = workdir_lib.saved_steps(workdir)
        assert saved in ([], [5]) and (kind == 'tmpfs' or not saved)
        last = f'step {saved[-1]}' if saved else 'none (no checkpoint was saved)'
        # the disk fills during the next checkpoint's save, or (rarely) while the logs are written
        failed_save = f'checkpoint at step {10 if saved else 5} not saved: {reason}'
        stopped = f'the run stopped: {reason} writing '
        lines = error_lines(result)
        assert len(lines) == 1 and lines[0].endswith(f'; the last good checkpoint is {last}') and (
            lines[0].startswith(f'moejax: {failed_save};') or
            lines[0].startswith(f'moejax: {stopped}')), result.stderr[-3000:]
        assert not os.path.exists(os.path.join(workdir, workdir_lib.LOCK))
    finally:
        if kind == 'tmpfs':
            subprocess.run(['umount', mount], check=False)


# ------------------------------------------------------------------------------ unit tests


def test_a_dense_run_resumes_whatever_the_unread_moe_keys_say():
    saved = tiny_config(moe_every=0)
    new = tiny_config(moe_every=0, dispatch='dropless', num_experts=16, group_size=64)
    assert workdir_lib.config_changes(saved, new) == {}
    new.model.moe_every = 2  # now the moe keys shape a layer: every change counts
    changes = workdir_lib.config_changes(saved, new)
    assert set(changes) == {'model.moe_every', 'moe.dispatch', 'moe.num_experts',
                            'moe.group_size'}
    assert changes['moe.dispatch'] == ('sort', 'dropless')


def test_resume_rule_allows_steering_keys_and_refuses_the_rest_and_unknown_keys():
    saved, new = tiny_config(), tiny_config()
    new.train.num_steps, new.mesh.expert, new.opt.lr = 99, 2, 1e-4
    new.model.d_model, new.moe.top_k = 64, 2
    new.model.brand_new_key = 'x'  # a key added later, absent from the saved config
    changes = workdir_lib.config_changes(saved, new)
    assert changes == {'train.num_steps': (10, 99), 'mesh.expert': (1, 2), 'opt.lr': (3e-3, 1e-4),
                       'model.d_model': (32, 64), 'moe.top_k': (1, 2),
                       'model.brand_new_key': (workdir_lib.ABSENT, 'x')}
    refused = sorted(k for k in changes if not workdir_lib.is_steering(k))
    assert refused == ['model.brand_new_key', 'model.d_model', 'moe.top_k']


def test_spike_guard_threshold_is_factor_times_the_recent_mean_and_survives_a_checkpoint():
    import numpy as np

    from moejax.run import guards
    assert guards.SpikeGuard(0.0, []).threshold() == ()  # off: the step takes no threshold
    guard = guards.SpikeGuard(10.0, [])
    assert guard.threshold() == (np.float32(np.inf),)  # nothing applied yet
    for step in range(40):
        guard.update({'loss': np.float32(1 + step), 'skipped': 0})
    guard.update({'loss': np.float32(1e9), 'skipped': 1})  # a skipped step does not count
    window = np.arange(40 - guards.SpikeGuard.WINDOW + 1, 41, dtype=np.float64)
    assert guard.threshold() == (np.float32(10 * window.mean()),)
    resumed = guards.SpikeGuard(10.0, json.loads(json.dumps(guard.state()['recent_losses'])))
    assert resumed.threshold() == guard.threshold()
