"""Evaluating a saved checkpoint (moejax/readers/evaluation.py) through the eval command and in
process: perplexity of any step and split, on any mesh, and out of a read-only run."""
import json
import math
import shutil
import subprocess

import numpy as np
import pytest

from moejax import data as data_lib
from moejax.errors import ConfigError
from moejax.readers import evaluation
from tests.helpers import assert_usage_error, mounted_tmpfs, run_cli, tiny_config


@pytest.fixture
def trained(trained_tiny_run, data_dir, tmp_path):
    """A copy of trained_tiny_run (evaluating writes the result into the run) and its config."""
    workdir = str(tmp_path / 'trained')
    shutil.copytree(trained_tiny_run, workdir)
    cfg = tiny_config()
    cfg.data.data_dir = data_dir
    return workdir, cfg


@pytest.mark.slow
def test_eval_cli_writes_perplexity_of_a_saved_step(trained):
    workdir, cfg = trained
    proc = run_cli('eval', '--config=configs/default.py:tiny', f'--workdir={workdir}',
                   f'--config.data.data_dir={cfg.data.data_dir}', '--split=validation', '--step=5')
    assert proc.returncode == 0, proc.stderr[-3000:]
    with open(f'{workdir}/eval_validation_5.json') as f:
        saved = json.load(f)
    # One readable line, as training prints its evaluations, naming the file it wrote.
    assert proc.stdout.strip().splitlines()[-1] == (
        f'eval at step 5 on validation: loss {saved["loss"]:.4f} | perplexity '
        f'{saved["perplexity"]:.2f} | bits/byte {saved["bits_per_byte"]:.4f} | '
        f'{saved["tokens"]:,} tokens (written to {workdir}/eval_validation_5.json)')
    assert saved['step'] == 5 and saved['split'] == 'validation'
    assert saved['perplexity'] == pytest.approx(math.exp(saved['loss']), rel=1e-9)
    # Tokens counted: every real target token of the eval batches, counted independently.
    tokenizer = data_lib.get_tokenizer(cfg, workdir)
    batches = data_lib.eval_batches(cfg, tokenizer, 'validation')
    assert saved['tokens'] == sum(int((batches[i]['segment_ids'] > 0).sum())
                                  for i in range(len(batches)))
    # Byte tokenizer: each target is one byte, except end-of-document tokens (zero bytes).
    assert saved['bits_per_byte'] >= saved['loss'] / math.log(2) - 1e-9
    load = np.asarray(saved['expert_load'])
    assert load.shape == (1, cfg.moe.num_experts)
    np.testing.assert_allclose(load.sum(-1), 1.0, atol=1e-5)


@pytest.mark.slow
def test_eval_any_step_and_split_on_any_mesh(trained):
    workdir, cfg = trained
    at = {step: evaluation.evaluate_checkpoint(cfg, workdir, 'validation', step) for step in (5, 10)}
    assert at[10]['perplexity'] < at[5]['perplexity']  # validation perplexity falls
    for result in at.values():
        assert result['perplexity'] == pytest.approx(math.exp(result['loss']), rel=1e-9)
    on_train = evaluation.evaluate_checkpoint(cfg, workdir, 'train', 10)
    assert on_train['split'] == 'train' and on_train['loss'] != at[10]['loss']
    # The same checkpoint on another layout (experts split over 4 devices): the same numbers.
    other = cfg.copy_and_resolve_references()
    other.mesh.update(data=2, expert=4)
    moved = evaluation.evaluate_checkpoint(other, workdir, 'validation', 10)
    assert moved['loss'] == pytest.approx(at[10]['loss'], rel=1e-5, abs=1e-5)
    assert moved['tokens'] == at[10]['tokens']
    np.testing.assert_allclose(moved['expert_load'], at[10]['expert_load'], atol=1e-5)


@pytest.mark.slow
def test_eval_of_a_read_only_workdir_writes_its_result_to_out_dir(trained, tmp_path):
    """Issue 24, finding 12: a reader needs nothing written into the run; the result file goes
    to --out_dir, and without it the refusal says so, before anything is evaluated."""
    workdir, cfg = trained
    expected = evaluation.evaluate_checkpoint(cfg, workdir, 'validation', 5)
    with mounted_tmpfs(tmp_path / 'mount', size='64m') as mount:
        shutil.copytree(workdir, mount / 'run')
        subprocess.run(['mount', '-o', 'remount,ro', str(mount)], check=True)
        with pytest.raises(ConfigError, match='cannot hold the result .Read-only file system.; '
                                              'pass --out_dir'):
            evaluation.evaluate_checkpoint(cfg, str(mount / 'run'), 'validation', 5)
        out = tmp_path / 'out'
        result = evaluation.evaluate_checkpoint(cfg, str(mount / 'run'), 'validation', 5,
                                                out_dir=str(out))
    assert result['file'] == str(out / 'eval_validation_5.json')
    assert {k: v for k, v in result.items() if k != 'file'} == json.loads(
        (out / 'eval_validation_5.json').read_text())
    assert result['loss'] == expected['loss'] and result['tokens'] == expected['tokens']


@pytest.mark.slow
@pytest.mark.parametrize('args,shown', [
    (('--split=nonexistent',), ["split='nonexistent'", 'train, validation']),
    (('--step=99',), ['--step=99', 'saved steps: [5, 10]']),
])
def test_eval_bad_split_or_step(trained_tiny_run, args, shown):
    proc = run_cli('eval', f'--workdir={trained_tiny_run}', *args, timeout=120)
    assert_usage_error(proc, *shown)
