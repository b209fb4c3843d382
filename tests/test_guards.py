"""The guards of a training run (moejax/run/guards.py): SIGTERM saves and exits 0, a double
Ctrl-C exits 130, and either way the run resumes exactly; non-finite and spiking steps are
skipped, then the run stops, keeping and naming the last good checkpoint.

The truth each end-to-end test compares against is an independent run: trained_tiny_run
(uninterrupted), or a run that used the changed setting from the resumed step on.
"""
import glob
import json
import os
import signal
import time

import numpy as np
import pytest

from moejax.run import checkpoint as checkpoint_lib
from moejax.run import guards
from moejax.run import workdir as workdir_lib
from tests.runs import (
    DIVERGING,
    NUM_STEPS,
    assert_same_run,
    error_lines,
    read_until,
    read_until_step,
    records,
    run_training,
    saved_steps,
    start,
    start_training,
    train,
    train_records,
)

# ------------------------------------------------------------------------- stop signals

@pytest.mark.slow
def test_sigterm_saves_exits_0_within_seconds_and_resumes_exactly(trained_tiny_run, data_dir,
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
    assert elapsed < 30, f'took {elapsed:.1f}s to stop'  # a save, not a hang
    stop_lines = [line for line in seen if line.startswith('Stop requested: saved step')]
    assert len(stop_lines) == 1, seen
    stopped_at = int(stop_lines[0].split()[4].rstrip(';'))
    assert 3 <= stopped_at < NUM_STEPS
    assert stopped_at in saved_steps(workdir)

    result = run_training(workdir, data_dir, cache_dir=compile_cache)
    assert result.returncode == 0, result.stderr[-2000:]
    assert f'Resumed from checkpoint at step {stopped_at}.' in result.stdout
    assert_same_run(workdir, trained_tiny_run)


@pytest.mark.slow
def test_double_sigint_exits_130_and_the_run_resumes_exactly(trained_tiny_run, data_dir,
                                                             compile_cache, tmp_path):
    workdir = str(tmp_path / 'run')
    # A save every step keeps the 10 steps from ending before the signals arrive (with the
    # compile cache they take about a second); the records are trained_tiny_run's all the same.
    every_step = '--config.train.checkpoint_every=1'
    codes = []
    for attempt in range(3):  # training, setup or compilation, training
        proc = start(workdir, data_dir, compile_cache, every_step)
        if attempt % 2:  # during setup or compilation
            time.sleep(2 + attempt)
        else:  # during training, around a save
            read_until(proc, lambda line: line.startswith('step') or line.startswith('eval'))
        proc.send_signal(signal.SIGINT)
        # Apart: two signals sent before the process runs again arrive as one (POSIX keeps one
        # pending signal of a kind), and one SIGINT only asks for a save.
        time.sleep(0.05 + 0.1 * attempt)
        proc.send_signal(signal.SIGINT)
        signalled = time.time()
        codes.append(proc.wait(timeout=60))
        elapsed = time.time() - signalled
        stderr = proc.stderr.read()
        proc.stdout.close()
        proc.stderr.close()
        assert codes[-1] in (0, 130), (codes, stderr[-3000:])  # 0: it had finished already
        # at once, not after a save or a compile (generous: a loaded CI machine took 12 s)
        assert elapsed < 30, f'took {elapsed:.1f}s to exit'
        assert not os.path.exists(os.path.join(workdir, workdir_lib.LOCK))
    assert 130 in codes, codes
    result = train(workdir, data_dir, compile_cache, every_step)
    assert result.returncode == 0, result.stderr[-3000:]
    assert train_records(workdir) == train_records(trained_tiny_run)


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


# ------------------------------------------------------------ non-finite and spiking steps

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


@pytest.mark.slow
def test_guard_keeps_names_and_resumes_from_the_last_good_checkpoint(data_dir, compile_cache,
                                                                     tmp_path):
    workdir = str(tmp_path / 'run')
    result = train(workdir, data_dir, compile_cache, *DIVERGING)
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
    result = train(workdir, data_dir, compile_cache, *DIVERGING, *sane)
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
    first = train(reference, data_dir, compile_cache, *DIVERGING,
                  f'--config.train.num_steps={good}')
    assert first.returncode == 0, first.stderr[-3000:]
    second = train(reference, data_dir, compile_cache, *DIVERGING, *sane)
    assert second.returncode == 0, second.stderr[-3000:]
    assert train_records(workdir) == train_records(reference)


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
