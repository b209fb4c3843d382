"""Training that loses nothing: exact resume after SIGKILL and SIGTERM, corrupted checkpoints,
non-finite steps, and gradient accumulation equal to the larger batch.

The end-to-end tests start real training processes and kill them; the truth they compare
against is an uninterrupted run of the same command.
"""
import functools
import glob
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moejax import mesh as mesh_lib
from moejax.run import checkpoint as checkpoint_lib
from moejax.run import guards
from moejax.run import metrics as metrics_lib
from moejax.run import state as state_lib
from moejax.run import step as step_lib
from tests import decisions
from tests.helpers import REPO, tiny_config

NUM_STEPS = 10
COMMAND = ('--config=configs/default.py:tiny', '--config.train.log_every=1',
           '--config.train.checkpoint_every=2')
TIMING_KEYS = ('tokens_per_sec', 'mfu')  # differ between runs by nature; all else must not


# ------------------------------------------------------------------------------ helpers


@pytest.fixture(scope='session')
def compile_cache(tmp_path_factory):
    """A persistent XLA cache for the interrupted runs: each restart skips recompiling (~10 s).
    The reference run compiles afresh, so results are also compared across compilations."""
    return str(tmp_path_factory.getbasetemp() / 'moejax_compile_cache')


def train_command(workdir, data_dir, *extra):
    return [sys.executable, os.path.join(REPO, 'launch', 'train.py'), f'--workdir={workdir}',
            *COMMAND, f'--config.data.data_dir={data_dir}', *extra]


def process_env(cache_dir=None):
    env = dict(os.environ, JAX_PLATFORMS='cpu', PYTHONUNBUFFERED='1',
               XLA_FLAGS='--xla_force_host_platform_device_count=8')
    if cache_dir:
        env.update(JAX_COMPILATION_CACHE_DIR=cache_dir,
                   JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES='0',
                   JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS='0')
    return env


def run_training(workdir, data_dir, *extra, cache_dir=None) -> subprocess.CompletedProcess:
    return subprocess.run(train_command(workdir, data_dir, *extra), cwd=REPO,
                          env=process_env(cache_dir), capture_output=True, text=True, timeout=300)


def start_training(workdir, data_dir, stderr_path, cache_dir) -> subprocess.Popen:
    """A training process whose stdout we read line by line (stderr to a file: no deadlock)."""
    with open(stderr_path, 'a') as stderr:
        return subprocess.Popen(train_command(workdir, data_dir), cwd=REPO,
                                env=process_env(cache_dir), stdout=subprocess.PIPE,
                                stderr=stderr, text=True)


def read_until_step(proc: subprocess.Popen, step: int, seen: list) -> bool:
    """Read stdout until a progress line for `step` or later; False if the process ended."""
    for line in proc.stdout:
        seen.append(line)
        if line.startswith('step') and int(line.split()[1].split('/')[0]) >= step:
            return True
    return False


def records(workdir) -> list[dict]:
    """metrics.jsonl without the throughput figures, which no two runs share."""
    with open(os.path.join(workdir, 'metrics.jsonl')) as f:
        rows = [json.loads(line) for line in f]
    return [{k: v for k, v in row.items() if k not in TIMING_KEYS} for row in rows]


def train_losses(workdir) -> list[tuple[int, float]]:
    return [(r['step'], r['loss']) for r in records(workdir) if 'loss' in r]


def assert_same_run(workdir, reference, context=''):
    """Per-step losses (exact float32 values) and every other logged number equal the
    reference's, each step logged once."""
    assert train_losses(workdir) == train_losses(reference), context
    assert [r['step'] for r in records(workdir) if 'loss' in r] == list(range(1, NUM_STEPS + 1))
    assert records(workdir) == records(reference), context


def saved_steps(workdir) -> list[int]:
    """Committed checkpoints: Orbax renames a finished save to its step number."""
    return sorted(int(s) for s in os.listdir(os.path.join(workdir, 'checkpoints')) if s.isdigit())


def tmp_dirs(workdir) -> list[str]:
    return glob.glob(os.path.join(workdir, 'checkpoints', '*.orbax-checkpoint-tmp*'))


@pytest.fixture(scope='module')
def reference(data_dir, tmp_path_factory):
    """An uninterrupted run: the truth every interrupted run must reproduce bit for bit."""
    workdir = str(tmp_path_factory.mktemp('reference'))
    result = run_training(workdir, data_dir)
    assert result.returncode == 0, result.stderr[-3000:]
    assert len(train_losses(workdir)) == NUM_STEPS
    return workdir


# --------------------------------------------------------------------- end to end (slow)


@pytest.mark.slow
def test_sigkill_at_random_moments_then_resume_is_bit_exact(reference, data_dir, compile_cache,
                                                            tmp_path):
    seed = int(os.environ.get('MOEJAX_KILL_SEED', random.randrange(1 << 30)))
    rng = random.Random(seed)
    workdir, stderr_path = str(tmp_path / 'run'), str(tmp_path / 'stderr.txt')
    resumed_at, kills = 0, []
    for kill in range(3):
        if resumed_at >= NUM_STEPS - 1:
            break
        proc = start_training(workdir, data_dir, stderr_path, compile_cache)
        seen = []
        if kill == 1:  # at a random time: in setup, restore, compilation or a step
            when = f'{rng.uniform(1, 8):.2f}s'
            time.sleep(float(when[:-1]))
        else:  # during the step after a random one, or its eval or save
            when = rng.randint(resumed_at + 1, NUM_STEPS - 1)
            if read_until_step(proc, when, seen):
                time.sleep(rng.uniform(0, 0.3))
        proc.kill()
        assert proc.wait(timeout=60) in (0, -signal.SIGKILL), open(stderr_path).read()[-3000:]
        seen += proc.stdout.readlines()
        proc.stdout.close()
        kills.append(when)
        resumed = [line for line in seen if line.startswith('Resumed from checkpoint')]
        if resumed:  # never from an older checkpoint than the last process saw
            assert int(resumed[0].split()[-1].rstrip('.')) == resumed_at, seen
        resumed_at = max(saved_steps(workdir) or [0])
    result = run_training(workdir, data_dir, cache_dir=compile_cache)
    context = f'MOEJAX_KILL_SEED={seed}, killed at {kills}\n{result.stderr[-2000:]}'
    assert result.returncode == 0, context
    if resumed_at:
        assert f'Resumed from checkpoint at step {resumed_at}.' in result.stdout, context
    assert_same_run(workdir, reference, context)
    assert not tmp_dirs(workdir), 'a save cut short was left behind'


@pytest.mark.slow
def test_sigterm_saves_exits_0_within_seconds_and_resumes_exactly(reference, data_dir,
                                                                  compile_cache, tmp_path):
    workdir, stderr_path = str(tmp_path / 'run'), str(tmp_path / 'stderr.txt')
    proc = start_training(workdir, data_dir, stderr_path, compile_cache)
    seen = []
    assert read_until_step(proc, 3, seen), seen
    signalled = time.time()
    proc.send_signal(signal.SIGTERM)
    seen += proc.stdout.readlines()
    returncode, elapsed = proc.wait(timeout=60), time.time() - signalled
    proc.stdout.close()
    assert returncode == 0, open(stderr_path).read()[-2000:]
    assert elapsed < 10, f'took {elapsed:.1f}s to stop'
    stop_lines = [line for line in seen if line.startswith('Stop requested: saved step')]
    assert len(stop_lines) == 1, seen
    stopped_at = int(stop_lines[0].split()[4].rstrip(';'))
    assert 3 <= stopped_at < NUM_STEPS
    assert stopped_at in saved_steps(workdir)

    result = run_training(workdir, data_dir, cache_dir=compile_cache)
    assert result.returncode == 0, result.stderr[-2000:]
    assert f'Resumed from checkpoint at step {stopped_at}.' in result.stdout
    assert_same_run(workdir, reference)


@pytest.mark.slow
def test_truncated_latest_checkpoint_falls_back_to_previous(reference, data_dir, compile_cache,
                                                            tmp_path):
    workdir = str(tmp_path / 'run')
    shutil.copytree(reference, workdir)
    latest = os.path.join(workdir, 'checkpoints', str(NUM_STEPS))
    files = [p for p in glob.glob(os.path.join(latest, 'state', '**'), recursive=True)
             if os.path.isfile(p)]
    largest = max(files, key=os.path.getsize)
    truncated_size = os.path.getsize(largest) // 2
    with open(largest, 'r+b') as f:
        f.truncate(truncated_size)
    # And a save cut short by a kill, for a step beyond: never taken for a checkpoint.
    shutil.copytree(latest, os.path.join(os.path.dirname(latest),
                                         f'{NUM_STEPS + 2}.orbax-checkpoint-tmp-1234'))
    previous = saved_steps(workdir)[-2]  # metrics.jsonl runs past it, as after a crash

    result = run_training(workdir, data_dir, cache_dir=compile_cache)
    assert result.returncode == 0, result.stderr[-3000:]
    warnings = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(warnings) == 1 and warnings[0].startswith(f'WARNING: checkpoint {NUM_STEPS} '), \
        result.stderr[-3000:]
    assert os.path.relpath(largest, latest) in warnings[0]
    assert f'Resumed from checkpoint at step {previous}.' in result.stdout
    assert_same_run(workdir, reference)
    # The bad checkpoint is kept aside, not deleted; the redone one is whole; no tmp left.
    aside = glob.glob(os.path.join(workdir, 'unreadable_checkpoints', f'{NUM_STEPS}-*'))
    assert len(aside) == 1
    assert os.path.getsize(os.path.join(aside[0], os.path.relpath(largest, latest))) == \
        truncated_size
    assert checkpoint_lib.verify_digest(latest)
    assert not tmp_dirs(workdir)


@pytest.mark.slow
def test_nonfinite_steps_are_skipped_then_the_run_stops(data_dir, tmp_path):
    workdir = str(tmp_path / 'run')
    # lr=1e30 without clipping: step 1 blows the weights up, every later loss is NaN.
    result = run_training(workdir, data_dir, '--config.opt.lr=1e30', '--config.opt.clip_norm=0',
                          '--config.opt.warmup_steps=0', '--config.train.max_skipped_steps=3',
                          '--config.train.checkpoint_every=1')
    assert result.returncode == 1, result.stderr[-3000:]
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr[-3000:]
    assert lines[0].startswith('moejax: 3 steps in a row') and 'max_skipped_steps=3' in lines[0]
    rows = [r for r in records(workdir) if 'loss' in r]
    assert [r['step'] for r in rows] == [1, 2, 3, 4]
    assert np.isfinite(rows[0]['loss']) and rows[0]['skipped'] == 0
    assert all(not np.isfinite(r['loss']) and r['skipped'] == 1 for r in rows[1:])
    assert [r['skipped_steps'] for r in rows] == [0, 1, 2, 3]
    # Nothing is saved while steps are skipped; checkpoint 1, whose weights gave the first
    # skipped step, is moved aside whole (no earlier one is known good: the message says so).
    assert saved_steps(workdir) == []
    [aside] = glob.glob(os.path.join(workdir, 'diverged_checkpoints', '1-*'))
    assert checkpoint_lib.verify_digest(aside)
    assert 'No checkpoint before the first skipped step is known good' in lines[0]


# ---------------------------------------------------------------------------- unit tests


def test_digest_catches_truncated_and_flipped_files(tmp_path):
    step_dir = tmp_path / '7'
    (step_dir / 'state' / 'd').mkdir(parents=True)
    blob = step_dir / 'state' / 'd' / 'blob'
    blob.write_bytes(os.urandom(10_000))
    (step_dir / '_CHECKPOINT_METADATA').write_text('{}')
    assert not checkpoint_lib.verify_digest(str(step_dir))  # no digest: nothing to check
    checkpoint_lib.write_digest(str(step_dir))
    (step_dir / '_CHECKPOINT_METADATA').write_text('{"rewritten": 1}')  # Orbax may rewrite it
    assert checkpoint_lib.verify_digest(str(step_dir))
    data = bytearray(blob.read_bytes())
    data[5000] ^= 1
    blob.write_bytes(bytes(data))
    with pytest.raises(checkpoint_lib.CorruptCheckpointError, match='checksum'):
        checkpoint_lib.verify_digest(str(step_dir))
    blob.write_bytes(bytes(data[:100]))
    with pytest.raises(checkpoint_lib.CorruptCheckpointError, match='100 bytes'):
        checkpoint_lib.verify_digest(str(step_dir))
    blob.unlink()
    with pytest.raises(checkpoint_lib.CorruptCheckpointError, match='missing'):
        checkpoint_lib.verify_digest(str(step_dir))


def test_metrics_log_is_cut_back_to_the_checkpoint(tmp_path):
    writer = metrics_lib.MetricWriter(str(tmp_path), tensorboard=False)
    for step in (1, 2, 3):
        writer.write(step, {'loss': np.float32(1 / 3) * step})
    with open(writer.path, 'a') as f:
        f.write('{"step": 4, "lo')  # a line cut short by SIGKILL
    writer.truncate_after(2)
    assert [r['step'] for r in records(str(tmp_path))] == [1, 2]
    writer.truncate_after(0)
    assert records(str(tmp_path)) == []


def test_logged_float32_values_are_exact():
    values = np.random.default_rng(0).standard_normal(1000).astype(np.float32) * 10.0 ** \
        np.arange(-20, 20, 0.04, dtype=np.float32)
    for value in values:
        logged = json.loads(json.dumps(metrics_lib.to_python(value)))
        assert np.float32(logged) == value


def test_skip_counter_stops_after_too_many_in_a_row():
    skips = guards.SkipCounter(limit=2)
    for step, skipped in enumerate([1, 0, 1], start=1):  # never two in a row
        skips.update(skipped)
        skips.check(step)
    assert (skips.total, skips.in_a_row) == (2, 1)
    resumed = guards.SkipCounter(2, **skips.state())  # counts survive a checkpoint
    resumed.update(1)
    with pytest.raises(guards.NonFiniteError, match='max_skipped_steps=2'):
        resumed.check(4)


def test_stop_signal_defers_the_first_signal_and_honours_a_second():
    stop = guards.StopSignal()
    try:
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.01)
        assert stop.requested and stop.agreed()
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.01)
    finally:
        stop.restore()
    assert signal.getsignal(signal.SIGTERM) != stop._handle


# ------------------------------------------------- train_step: skipping and accumulation


def step_config(grad_accum: int):
    cfg = tiny_config()
    cfg.data.batch_size = 16  # micro-batches of 8 rows: one per device
    cfg.opt.update(grad_accum=grad_accum, warmup_steps=0, schedule='constant')
    return cfg


@pytest.fixture(scope='module')
def batch_16():
    """16 rows of random tokens: a few packed documents per row, and padding in two rows."""
    rng = np.random.default_rng(0)
    tokens = rng.integers(3, 259, size=(16, 33))
    segments = np.repeat(np.arange(1, 5), 8)[None].repeat(16, axis=0)
    segments[3, 20:] = 0       # a partly padded row in the first micro-batch
    segments[12, :] = 0        # an all-padding row in the second
    positions = np.tile(np.arange(8), 4)[None].repeat(16, axis=0)
    batch = {'inputs': tokens[:, :-1], 'targets': tokens[:, 1:], 'segment_ids': segments,
             'positions': positions}
    return {k: v.astype(np.int32) for k, v in batch.items()}


@functools.lru_cache(maxsize=None)
def compiled_step(grad_accum: int):
    """(setup, jitted train_step) for step_config(grad_accum), compiled once per module."""
    cfg = step_config(grad_accum)
    setup = state_lib.make_setup(cfg, mesh_lib.make_mesh(cfg.mesh))
    return setup, step_lib.compile_steps(setup)[0]


def one_step(grad_accum, batch, poison=False, compiled=None):
    """(state before, state after, metrics) of one jitted train_step, as host arrays
    (compiled: a (setup, step) pair to use instead of the module's)."""
    setup, step_fn = compiled or compiled_step(grad_accum)
    state = state_lib.init_state(setup, setup.cfg.train.seed)
    if poison:  # a NaN in one weight: the loss and every gradient become NaN
        leaves, treedef = jax.tree.flatten(state.params)
        leaves[0] = leaves[0].at[(0,) * leaves[0].ndim].set(jnp.nan)
        state = jax.device_put(state.replace(params=jax.tree.unflatten(treedef, leaves)),
                               setup.state_shardings)
    before = jax.device_get(state)
    after, metrics = step_fn(state, state_lib.global_batch(setup, batch))
    return before, jax.device_get(after), jax.device_get(metrics)


def test_nonfinite_step_leaves_params_and_optimizer_untouched(batch_16):
    before, after, metrics = one_step(1, batch_16, poison=True)
    assert metrics['skipped'] == 1 and not np.isfinite(metrics['loss'])
    assert int(after.step) == 1  # the batch is consumed: a resume repeats the same skip
    same = jax.tree.map(lambda a, b: np.array_equal(a, b, equal_nan=True),
                        (before.params, before.opt_state, before.extra),
                        (after.params, after.opt_state, after.extra))
    assert all(jax.tree.leaves(same))


def test_grad_accum_equals_the_larger_batch(batch_16):
    """Two micro-batches of 8 rows give the step of one batch of 16: gradients (Adam's first
    moment), loss and balance terms, with padding spread unevenly between micro-batches."""
    with decisions.record() as margins:
        before, whole, whole_metrics = one_step(1, batch_16, compiled=compiled_step.__wrapped__(1))
    margins.assert_clear()
    _, accum, accum_metrics = one_step(2, batch_16)
    assert whole_metrics['skipped'] == 0 and accum_metrics['skipped'] == 0
    for key in ('loss', 'ce_loss', 'aux_loss', 'z_loss', 'grad_norm'):
        np.testing.assert_allclose(accum_metrics[key], whole_metrics[key], rtol=1e-5, err_msg=key)
    np.testing.assert_allclose(accum_metrics['expert_load'], whole_metrics['expert_load'],
                               atol=1e-6)
    close = jax.tree.map(lambda a, b: np.allclose(a, b, rtol=1e-4, atol=1e-7),
                         (accum.params, accum.opt_state), (whole.params, whole.opt_state))
    assert all(jax.tree.leaves(close))
    # The step did something (lr at step 0 is not 0): every param moved.
    moved = jax.tree.map(lambda a, b: not np.allclose(a, b), whole.params, before.params)
    assert all(jax.tree.leaves(moved))
