"""Cached sampling against recomputing the full forward; eval and generate from checkpoints."""
import json
import math
import shutil
import subprocess

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from moejax import data as data_lib
from moejax.errors import ConfigError
from moejax.model import transformer as model_lib
from moejax.readers import evaluation, sampling, saved_run
from tests.helpers import mounted_tmpfs, run_cli, tiny_config


def make_model(cfg, seed=0):
    return model_lib.Transformer(cfg, rngs=nnx.Rngs(params=jax.random.key(seed)))


def greedy_without_cache(model, prompt_BP, num_new):
    """The reference: the whole sequence through the model's forward for every new token.

    The row is padded to its final length (segment id 0: attended by nothing, routed nowhere)
    so one compiled forward serves every step.
    """
    B, P = prompt_BP.shape
    L = P + num_new
    forward = jax.jit(lambda ids, seg: model(ids, seg, jnp.broadcast_to(jnp.arange(L), (B, L)),
                                             train=False)[0])
    seq_BL = np.zeros((B, L), np.int32)
    seq_BL[:, :P] = prompt_BP
    logits = []
    for t in range(P, L):
        seg_BL = (np.arange(L) < t).astype(np.int32)[None].repeat(B, 0)
        logits.append(np.asarray(forward(jnp.asarray(seq_BL), jnp.asarray(seg_BL))[:, t - 1]))
        seq_BL[:, t] = logits[-1].argmax(-1)
    return seq_BL[:, P:], np.stack(logits, axis=1)


# Configurations whose full forward never drops a token (see MoEBlock.decode): then cached
# decoding (one token per routing group) must give the full forward's logits exactly.
NO_DROP_CASES = {
    'switch_no_capacity_limit': dict(eval_capacity_factor=0.0),
    'gshard_top2_dropless_gqa': dict(top_k=2, dispatch='dropless', num_kv_heads=1),
    'soft_swiglu_shared_every_layer': dict(router='soft', activation='swiglu',
                                           num_shared_experts=1, moe_every=1),
    'dense': dict(moe_every=0),
}


@pytest.mark.parametrize('case', list(NO_DROP_CASES))
def test_cached_greedy_decoding_equals_full_forward(case):
    cfg = tiny_config(**NO_DROP_CASES[case])
    model = make_model(cfg)
    prompt_BP = np.random.default_rng(0).integers(3, cfg.data.vocab_size, (2, 5))
    tokens, logits = sampling.generate(model, prompt_BP, 11, temperature=0.0)
    want_tokens, want_logits = greedy_without_cache(model, prompt_BP, 11)
    np.testing.assert_array_equal(np.asarray(tokens), want_tokens)
    np.testing.assert_allclose(np.asarray(logits), want_logits, atol=2e-5, rtol=1e-5)


def test_prefill_routes_the_prompt_like_the_full_forward_even_when_it_drops():
    """With a short eval capacity the forward drops tokens; prefill uses the same groups (the
    prompt), so the first token's logits still match. Later tokens are decoded one per group
    (never dropped), which is where the two may part (documented in MoEBlock.decode)."""
    cfg = tiny_config(eval_capacity_factor=0.5)
    model = make_model(cfg)
    prompt_BP = np.random.default_rng(1).integers(3, cfg.data.vocab_size, (2, 12))
    forward = jax.jit(lambda ids: model(ids, jnp.ones((2, 12), jnp.int32),
                                        jnp.broadcast_to(jnp.arange(12), (2, 12)), train=False))
    _, stats = forward(jnp.asarray(prompt_BP))
    assert float(stats['dropped_fraction'][0]) > 0  # the premise: the forward drops
    _, logits = sampling.generate(model, prompt_BP, 1)
    _, want_logits = greedy_without_cache(model, prompt_BP, 1)
    np.testing.assert_allclose(np.asarray(logits), want_logits, atol=2e-5, rtol=1e-5)


def test_temperature_zero_is_argmax_and_top_k_one_is_argmax_at_any_temperature():
    logits_BV = jax.random.normal(jax.random.key(0), (16, 50))
    want = np.asarray(jnp.argmax(logits_BV, -1))
    key = jax.random.key(1)
    np.testing.assert_array_equal(sampling.sample_token(logits_BV, key, 0.0), want)
    np.testing.assert_array_equal(sampling.sample_token(logits_BV, key, 5.0, top_k=1), want)


def test_sampling_follows_the_tempered_distribution_within_top_k():
    logits_V = jnp.log(jnp.array([0.5, 0.25, 0.15, 0.07, 0.03]))
    keys = jax.random.split(jax.random.key(0), 20000)
    draw = jax.vmap(lambda k, t, top: sampling.sample_token(logits_V[None], k, t, top)[0],
                    in_axes=(0, None, None))
    counts = np.bincount(np.asarray(draw(keys, 1.0, 0)), minlength=5) / len(keys)
    np.testing.assert_allclose(counts, [0.5, 0.25, 0.15, 0.07, 0.03], atol=0.015)
    # Temperature 2 flattens: p ~ sqrt(p); top_k=3 renormalises over the 3 most likely.
    p = np.sqrt([0.5, 0.25, 0.15])
    counts = np.bincount(np.asarray(draw(keys, 2.0, 3)), minlength=5) / len(keys)
    np.testing.assert_allclose(counts, np.concatenate([p / p.sum(), [0, 0]]), atol=0.015)


def test_a_seed_fixes_the_sample_and_another_seed_changes_it():
    cfg = tiny_config()
    sampler = sampling.Sampler(make_model(cfg))
    prompt_BP = np.full((3, 4), 7)
    run = lambda seed: np.asarray(sampler.generate(prompt_BP, 16, temperature=1.0,
                                                   seed=seed)[0])
    first = run(3)
    np.testing.assert_array_equal(first, run(3))
    assert not np.array_equal(first, run(4))
    assert not np.array_equal(first[0], first[1])  # rows of one batch are independent draws


# ------------------------------------------------------------------- from a trained checkpoint


@pytest.fixture(scope='module')
def trained(tmp_path_factory):
    """configs/default.py:tiny trained 10 steps (checkpoints at 5 and 10) through the CLI."""
    root = tmp_path_factory.mktemp('trained')
    workdir, data_dir = str(root / 'run'), str(root / 'data')
    proc = run_cli('train', '--config=configs/default.py:tiny', f'--workdir={workdir}',
                   f'--config.data.data_dir={data_dir}')
    assert proc.returncode == 0, proc.stderr[-3000:]
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
def test_generate_prints_text_from_a_checkpoint(trained):
    workdir, _ = trained
    args = (f'--workdir={workdir}', '--prompt=import os', '--max_new_tokens=16')
    proc = run_cli('generate', *args, '--temperature=0')
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.startswith('import os') and len(proc.stdout) > len('import os\n')
    # In-process, the same checkpoint and settings give the same text.
    loaded = saved_run.open_run(workdir)
    assert loaded.step == 10
    text = sampling.generate_text(loaded, 'import os', 16, temperature=0.0)[0]
    assert proc.stdout == 'import os' + text + '\n'
    sampled = run_cli('generate', *args, '--temperature=1', '--top_k=20', '--seed=5',
                      '--num_samples=2')
    assert sampled.returncode == 0, sampled.stderr[-3000:]
    assert sampled.stdout.count('--- sample') == 2


@pytest.mark.slow
def test_generate_usage_errors_exit_2(trained):
    workdir, _ = trained
    too_long = run_cli('generate', f'--workdir={workdir}', '--max_new_tokens=1000')
    assert too_long.returncode == 2 and '--max_new_tokens' in too_long.stderr
    no_step = run_cli('generate', f'--workdir={workdir}', '--step=7')
    assert no_step.returncode == 2 and 'saved steps: [5, 10]' in no_step.stderr
