"""Multi-head latent attention against a float64 NumPy MLA, across attention implementations,
with the latent KV cache, and on every mesh layout against one device.

YaRN's frequencies and softmax scale are checked against transformers' logits in
tests/test_hf_deepseek.py (the fixture's config uses YaRN); here rope scaling is off, so the
NumPy reference below needs nothing from moejax but the weights.
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from moejax import validate
from moejax.errors import ConfigError
from moejax.model import attention, mla
from moejax.readers import sampling
from tests.helpers import tiny_config
from tests.layouts import assert_same_training, make_config, run
from tests.test_attention import packed_segments
from tests.test_sampling import greedy_without_cache, make_model

MLA_KEYS = dict(attention_kind='mla', kv_lora_rank=12, qk_nope_head_dim=12, qk_rope_head_dim=4,
                v_head_dim=8)


def mla_config(cfg=None, **model):
    cfg = cfg or tiny_config()
    cfg.model.update(**dict(MLA_KEYS, **model))
    return cfg


def rms(x, scale, eps=1e-6):
    return x / np.sqrt(np.mean(x * x, -1, keepdims=True) + eps) * scale


def rotate(x, pos, base):
    """Half-split rotary in float64: pairs (r, r + R/2)."""
    half = x.shape[-1] // 2
    angle = pos[..., None] * base ** (-np.arange(half) / half)
    cos, sin = np.cos(angle)[:, :, None], np.sin(angle)[:, :, None]
    x1, x2 = x[..., :half], x[..., half:]
    return np.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], -1)


def numpy_mla(p, x, seg, pos, m):
    """DeepSeek-V2's MLA written out: compressed query and key-value, decoupled rotary key."""
    N, R, C = m.qk_nope_head_dim, m.qk_rope_head_dim, m.kv_lora_rank
    if m.q_lora_rank:
        q = np.einsum('btq,qhk->bthk', rms(x @ p['wq_a_DQ'], p['q_norm']['scale']),
                      p['wq_b_QHK'])
    else:
        q = np.einsum('btd,dhk->bthk', x, p['wq_DHK'])
    q = np.concatenate([q[..., :N], rotate(q[..., N:], pos, m.rope_base)], -1)
    kv = x @ p['wkv_a_DM']
    latent = rms(kv[..., :C], p['kv_norm']['scale'])
    k_rope = rotate(kv[:, :, None, C:], pos, m.rope_base)
    kvh = np.einsum('btc,chz->bthz', latent, p['wkv_b_CHZ'])
    k = np.concatenate([kvh[..., :N], np.broadcast_to(k_rope, kvh.shape[:3] + (R,))], -1)
    v = kvh[..., N:]
    T = x.shape[1]
    allowed = ((seg[:, :, None] == seg[:, None, :]) & (seg[:, None, :] > 0)
               & np.tril(np.ones((T, T), bool)))[:, None]
    s = np.where(allowed, np.einsum('bthk,bshk->bhts', q, k) / np.sqrt(N + R), -np.inf)
    e = np.where(allowed, np.exp(s - np.max(np.where(allowed, s, -1e30), -1, keepdims=True)), 0)
    probs = e / np.maximum(e.sum(-1, keepdims=True), 1e-300)
    out = np.einsum('bhts,bshu->bthu', probs, v)
    return np.einsum('bthu,hud->btd', out, p['wo_HUD'])


def module_and_inputs(q_lora_rank=0, **model):
    cfg = mla_config(q_lora_rank=q_lora_rank, **model)
    module = mla.MLA(cfg, rngs=nnx.Rngs(params=jax.random.key(1)))
    rng = np.random.default_rng(0)
    seg = packed_segments(2, 21)
    pos = np.zeros_like(seg)
    for b in range(2):  # positions restart with each document
        for t in range(1, 21):
            pos[b, t] = pos[b, t - 1] + 1 if seg[b, t] == seg[b, t - 1] else 0
    x = rng.normal(size=(2, 21, cfg.model.d_model))
    params = jax.tree.map(lambda a: np.asarray(a, np.float64), nnx.to_pure_dict(nnx.state(module)))
    want = numpy_mla(params, x, seg, pos.astype(np.float64), cfg.model) * (seg > 0)[..., None]
    return module, cfg, (jnp.asarray(x, jnp.float32), jnp.asarray(seg), jnp.asarray(pos)), want


@pytest.mark.parametrize('implementation,q_lora_rank', [('xla', 0), ('xla', 6), ('chunked', 6)])
def test_mla_matches_numpy_on_packed_documents(implementation, q_lora_rank):
    """Values of K=16 and U=8 channels: padded for the kernels, cut back after."""
    module, _, args, want = module_and_inputs(q_lora_rank, attention=implementation,
                                              attention_block=4)
    got = jax.jit(lambda x, s, p: module(x, s, p))(*args)
    np.testing.assert_allclose(got, want, atol=2e-5, rtol=1e-4)


def test_mla_flash_kernel_in_interpret_mode(monkeypatch):
    """'flash' (splash attention, interpreted on CPU) through MLA's padded values: values and
    gradients as xla."""
    module, _, args, want = module_and_inputs(6, attention='flash')
    monkeypatch.setattr(attention, 'flash_attention', functools.partial(
        attention.flash_attention, kernel='tpu', interpret=True))
    got = jax.jit(lambda x, s, p: module(x, s, p))(*args)
    np.testing.assert_allclose(got, want, atol=2e-5, rtol=1e-4)
    xla, _, _, _ = module_and_inputs(6, attention='xla')
    grad = lambda mod: jax.jit(jax.grad(lambda x: jnp.sum(mod(x, *args[1:]) ** 2)))(args[0])
    np.testing.assert_allclose(grad(module), grad(xla), atol=1e-5, rtol=1e-4)


def test_yarn_frequencies_and_scales():
    """YaRN by its definition (Peng et al. 2023, DeepSeek-V3's reference code): high frequencies
    kept, low ones divided by the factor; mscale 0.1 ln(40) + 1 squared on the softmax."""
    m = mla_config(rope_scaling='yarn', rope_factor=40.0, rope_original_max_len=4096,
                   rope_mscale=1.0, rope_mscale_all_dim=1.0, qk_rope_head_dim=64).model
    freq, cos_scale, softmax = mla.rope_frequencies(m, 64)
    plain = 10_000.0 ** (-np.arange(32) / 32)
    np.testing.assert_allclose(freq[:10], plain[:10], rtol=1e-6)  # wavelength < 4096/32
    np.testing.assert_allclose(freq[-8:], plain[-8:] / 40, rtol=1e-6)  # wavelength > 4096
    assert cos_scale == 1.0  # mscale == mscale_all_dim
    assert softmax == pytest.approx((0.1 * np.log(40) + 1) ** 2)


def test_latent_cache_generation_equals_generation_without_it():
    """Greedy decoding through the latent cache (absorbed up-projections) gives the tokens and
    logits of recomputing the full forward for every new token; MoE dropless, q low-rank."""
    cfg = mla_config(tiny_config(top_k=2, dispatch='dropless', activation='swiglu'),
                     q_lora_rank=6)
    model = make_model(cfg)
    cache = model.init_cache(2, 16)
    assert cache[0].latent_BSC.shape == (2, 16, 12) and cache[0].k_rope_BSR.shape == (2, 16, 4)
    prompt_BP = np.random.default_rng(0).integers(3, cfg.data.vocab_size, (2, 5))
    tokens, logits = sampling.generate(model, prompt_BP, 11, temperature=0.0)
    want_tokens, want_logits = greedy_without_cache(model, prompt_BP, 11)
    np.testing.assert_array_equal(np.asarray(tokens), want_tokens)
    np.testing.assert_allclose(np.asarray(logits), want_logits, atol=2e-5, rtol=1e-5)


# The weights (the query LoRA's included) over fsdp with the explicit all-to-all here; heads
# over tensor in test_transformer's dense-prefix model on a mesh (MLA, MTP); tests/
# test_sharding.py covers the rest of the layouts for the layers MLA shares with standard
# attention.
LAYOUTS = [({'fsdp': 2, 'expert': 4}, 'all_to_all')]


@functools.lru_cache(maxsize=None)
def mla_one_device():
    history, _, margins = run(mla_config(make_config(), q_lora_rank=6), jax.devices()[:1],
                              ulps=0, record=True)
    margins.assert_clear()
    return history


@pytest.mark.parametrize('mesh,comm', LAYOUTS, ids=lambda v: v if isinstance(v, str) else
                         'x'.join(f'{k}{n}' for k, n in v.items()))
def test_mla_layout_matches_one_device(mesh, comm):
    """Heads split over tensor, the latent projections over fsdp: the same 6 training steps."""
    history, _, _ = run(mla_config(make_config(mesh, comm=comm), q_lora_rank=6))
    assert_same_training(history, mla_one_device())


@pytest.mark.parametrize('key,value', [('kv_lora_rank', 0), ('qk_rope_head_dim', 3),
                                       ('v_head_dim', 0), ('num_kv_heads', 1)])
def test_bad_mla_config_names_the_key(key, value):
    cfg = mla_config(**{key: value})
    with pytest.raises(ConfigError, match=f'model.{key}'):
        validate.check(cfg, 1)


def test_yarn_needs_mla():
    cfg = tiny_config()
    cfg.model.rope_scaling = 'yarn'
    with pytest.raises(ConfigError, match='model.rope_scaling'):
        validate.check(cfg, 1)
