"""Sampling (moejax/readers/sampling.py): cached decoding against recomputing the full forward;
the generate command on a trained checkpoint."""
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from moejax.model import transformer as model_lib
from moejax.readers import sampling, saved_run
from tests.helpers import assert_usage_error, run_cli, timed, tiny_config


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
    assert_cached_greedy_equals_forward(make_model(cfg), cfg, 11)


def assert_cached_greedy_equals_forward(model, cfg, num_new: int):
    """Greedy decoding through the KV cache gives the tokens and logits of recomputing the
    whole forward for every new token (a random 5-token prompt, 2 rows)."""
    prompt_BP = np.random.default_rng(0).integers(3, cfg.data.vocab_size, (2, 5))
    tokens, logits = sampling.generate(model, prompt_BP, num_new, temperature=0.0)
    want_tokens, want_logits = greedy_without_cache(model, prompt_BP, num_new)
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


@pytest.mark.slow
def test_generate_prints_text_from_a_checkpoint(trained_tiny_run):
    workdir = trained_tiny_run
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
def test_generate_usage_errors_exit_2(trained_tiny_run):
    workdir = trained_tiny_run
    too_long = run_cli('generate', f'--workdir={workdir}', '--max_new_tokens=1000')
    assert too_long.returncode == 2 and '--max_new_tokens' in too_long.stderr
    no_step = run_cli('generate', f'--workdir={workdir}', '--step=7')
    assert no_step.returncode == 2 and 'saved steps: [5, 10]' in no_step.stderr


@pytest.mark.parametrize('flag,shown', [
    ('--top_k=-3', ['--top_k=-3', '>= 0']),
    ('--temperature=-1', ['--temperature=-1', 'finite number >= 0']),
    ('--temperature=nan', ['--temperature=nan', 'finite number >= 0']),
    ('--temperature=inf', ['--temperature=inf', 'finite number >= 0']),
    ('--max_new_tokens=-1', ['--max_new_tokens=-1', '>= 1']),
    ('--num_samples=0', ['--num_samples=0', '>= 1']),
])
def test_bad_generate_flags_are_one_line(tmp_path, flag, shown):
    """Checked before a checkpoint is read (so this workdir needs none), within seconds."""
    proc, seconds = timed('generate', f'--workdir={tmp_path}', '--prompt=x', flag)
    assert_usage_error(proc, *shown, seconds=seconds)


@pytest.mark.slow
def test_prompt_longer_than_max_len_names_the_prompt(trained_tiny_run):
    with open(os.path.join(trained_tiny_run, 'config.json')) as f:
        max_len = json.load(f)['model']['max_len']
    proc = run_cli('generate', f'--workdir={trained_tiny_run}', '--prompt=' + 'a' * (2 * max_len),
                   timeout=120)
    bos_and_bytes = 2 * max_len + 1  # the tiny run's byte tokenizer: one token per byte
    assert_usage_error(proc, '--prompt', f'{bos_and_bytes} tokens', f'model.max_len={max_len}')
    assert '--max_new_tokens' not in proc.stderr
    fits = run_cli('generate', f'--workdir={trained_tiny_run}', '--prompt=ab',
                   '--max_new_tokens=64', timeout=120)
    assert_usage_error(fits, '--max_new_tokens=64', f'use at most {max_len - 3}')


@pytest.mark.slow
def test_generate_missing_step(trained_tiny_run):
    proc = run_cli('generate', f'--workdir={trained_tiny_run}', '--prompt=x', '--max_new_tokens=4',
                   '--step=7', timeout=120)
    assert_usage_error(proc, '--step=7', 'saved steps: [5, 10]')
