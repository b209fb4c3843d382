"""Checkpoints of the whole run (moejax/run/checkpoint.py): atomic and checked by a digest, so a
run killed at any moment resumes bit-exactly from the last whole one; damaged ones are set aside,
never deleted; a full disk is one line; and a checkpoint restores onto another mesh.

The end-to-end tests start real training processes and kill them; the truth they compare
against is trained_tiny_run, an uninterrupted run of the same config.
"""
import glob
import os
import random
import resource
import shutil
import signal
import subprocess
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moejax import mesh as mesh_lib
from moejax.run import checkpoint as checkpoint_lib
from moejax.run import state as state_lib
from moejax.run import workdir as workdir_lib
from tests.helpers import snapshot
from tests.layouts import make_config
from tests.runs import (
    NUM_STEPS,
    assert_same_run,
    error_lines,
    read_until_step,
    run_training,
    saved_steps,
    start_training,
    tmp_dirs,
    train,
    train_records,
)


def test_checkpoint_restores_onto_another_mesh(tmp_path):
    """Saved on data=8, restored onto data=2 x expert=4: same values, the new shardings."""
    cfg = make_config({'data': 8})
    setup = state_lib.make_setup(cfg, mesh_lib.make_mesh(cfg.mesh))
    state = state_lib.init_state(setup, 0)
    # Distinct non-zero optimizer moments, so a mix-up between leaves would show.
    bump = lambda x: x * 2 + 1 if jnp.issubdtype(x.dtype, jnp.floating) else x + 3
    state = state.replace(opt_state=jax.tree.map(bump, state.opt_state))
    saver = checkpoint_lib.Checkpointer(str(tmp_path), keep=1)
    saver.save(3, state, {'next_batch': 3})
    saver.close()

    cfg2 = make_config({'data': 2, 'expert': 4})
    setup2 = state_lib.make_setup(cfg2, mesh_lib.make_mesh(cfg2.mesh))
    loader = checkpoint_lib.Checkpointer(str(tmp_path), keep=1)
    restored, data_state, step = loader.restore(setup2.abstract_state)
    loader.close()
    assert step == 3 and data_state == {'next_batch': 3}
    saved, loaded = jax.tree.leaves(state), jax.tree.leaves(restored)
    assert len(saved) == len(loaded)
    for a, b, sharding in zip(saved, loaded, jax.tree.leaves(setup2.state_shardings)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
        assert b.sharding.is_equivalent_to(sharding, b.ndim)
    w_in = restored.params['blocks'][0]['ffn']['w_in_EDF'][...]
    assert {s.data.shape[0] for s in w_in.addressable_shards} == {cfg2.moe.num_experts // 4}


# --------------------------------------------------------------------- end to end (slow)

@pytest.mark.slow
def test_sigkill_at_random_moments_then_resume_is_bit_exact(trained_tiny_run, data_dir,
                                                            compile_cache, tmp_path):
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
            try:  # or until the run ends (then the kill finds nothing to kill)
                proc.wait(timeout=float(when[:-1]))
            except subprocess.TimeoutExpired:
                pass
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
    assert_same_run(workdir, trained_tiny_run, context)
    assert not tmp_dirs(workdir), 'a save cut short was left behind'


@pytest.mark.slow
def test_truncated_latest_checkpoint_falls_back_to_previous(trained_tiny_run, data_dir,
                                                            compile_cache, tmp_path):
    workdir = str(tmp_path / 'run')
    shutil.copytree(trained_tiny_run, workdir)
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
    assert_same_run(workdir, trained_tiny_run)
    # The bad checkpoint is kept aside, not deleted; the redone one is whole; no tmp left.
    aside = glob.glob(os.path.join(workdir, 'unreadable_checkpoints', f'{NUM_STEPS}-*'))
    assert len(aside) == 1
    assert os.path.getsize(os.path.join(aside[0], os.path.relpath(largest, latest))) == \
        truncated_size
    assert checkpoint_lib.verify_digest(latest)
    assert not tmp_dirs(workdir)


@pytest.mark.slow
def test_all_checkpoints_damaged_is_refused_unless_restart(trained_tiny_run, data_dir,
                                                           compile_cache, tmp_path):
    workdir = str(tmp_path / 'run')
    shutil.copytree(trained_tiny_run, workdir)
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
    result = train(workdir, data_dir, compile_cache)
    assert result.returncode == 2, result.stderr[-3000:]
    lines = error_lines(result)
    assert len(lines) == 1 and 'no readable checkpoint' in lines[0], lines
    assert 'step 10' in lines[0] and 'step 5' in lines[0] and '--restart' in lines[0]
    # Nothing moved or changed (the refusal comes after setup opened a TensorBoard file).
    assert snapshot(workdir, skip=('tensorboard',)) == before

    result = train(workdir, data_dir, compile_cache, '--restart')
    assert result.returncode == 0, result.stderr[-3000:]
    # Nothing deleted: the damaged run is in previous_runs/, byte for byte.
    [previous] = glob.glob(os.path.join(workdir, workdir_lib.PREVIOUS_RUNS, '*'))
    assert snapshot(previous, skip=('tensorboard',)) == before
    # The fresh start equals the original run from step 0.
    assert train_records(workdir) == train_records(trained_tiny_run)


# ---------------------------------------------------------------------- a failed save

def _small_filesystem(path) -> str:
    """'tmpfs' if a 1 MB tmpfs could be mounted at path (root), else 'rlimit'."""
    os.makedirs(path)
    if os.geteuid() == 0 and shutil.which('mount'):
        done = subprocess.run(['mount', '-t', 'tmpfs', '-o', 'size=1000k', 'tmpfs', str(path)],
                              capture_output=True)
        if done.returncode == 0:
            return 'tmpfs'
    return 'rlimit'


def _limit_file_size():
    """Fault injection where no tmpfs can be mounted: a file larger than 100 kB fails with
    EFBIG (SIGXFSZ ignored), as the largest data file of every checkpoint (130-180 kB) does."""
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (100_000, 100_000))


@pytest.mark.slow
def test_full_disk_gives_one_summary_line(data_dir, compile_cache, tmp_path):
    mount = str(tmp_path / 'small')
    kind = _small_filesystem(mount)
    workdir = os.path.join(mount, 'run')
    try:
        if kind == 'tmpfs':
            # 1 MB holds one checkpoint (step 5: 0.65 MB) beside the logs, not two; whether it
            # fits varies by a few kB from run to run, so the one line must name what is on disk.
            result = train(workdir, data_dir, compile_cache)
            reason = 'No space left on device'
        else:  # without the compile cache, whose new entries the limit would refuse too
            result = train(workdir, data_dir, None, preexec_fn=_limit_file_size)
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
