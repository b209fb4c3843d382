"""The model against independent truths: causality, segment isolation, a dense reference."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from moejax.model import transformer as model_lib
from moejax.moe import experts
from moejax.moe.block import MoEBlock
from tests.helpers import tiny_config


def make_model(cfg, seed=0):
    return model_lib.Transformer(cfg, rngs=nnx.Rngs(params=jax.random.key(seed)))


def batch_of(ids_BT, segment_ids_BT=None):
    ids = jnp.asarray(ids_BT, jnp.int32)
    seg = jnp.ones_like(ids) if segment_ids_BT is None else jnp.asarray(segment_ids_BT, jnp.int32)
    pos = jnp.broadcast_to(jnp.arange(ids.shape[1]), ids.shape).astype(jnp.int32)
    return ids, seg, pos


@pytest.mark.parametrize('router', ['top_k', 'expert_choice', 'soft'])
def test_model_is_causal(router):
    """Changing token t never changes the logits before t (expert choice excepted: below)."""
    cfg = tiny_config(router=router, capacity_factor=8.0, eval_capacity_factor=8.0)
    cfg.moe.group_size = 1 if router == 'expert_choice' else 0  # experts choose within a token
    model = make_model(cfg)
    rng = np.random.default_rng(0)
    ids = rng.integers(3, cfg.data.vocab_size, (2, 16))
    logits, _ = model(*batch_of(ids))
    changed = ids.copy()
    changed[:, 9] = (changed[:, 9] + 7) % cfg.data.vocab_size
    logits2, _ = model(*batch_of(changed))
    np.testing.assert_allclose(logits[:, :9], logits2[:, :9], atol=1e-5)
    assert not np.allclose(logits[:, 9:], logits2[:, 9:], atol=1e-3)


def test_packed_documents_do_not_see_each_other():
    """A row holding two documents gives the second one the logits it gets alone."""
    cfg = tiny_config(capacity_factor=8.0, eval_capacity_factor=8.0)
    model = make_model(cfg)
    rng = np.random.default_rng(1)
    doc_a, doc_b = rng.integers(3, 200, 6), rng.integers(3, 200, 10)
    packed = np.concatenate([doc_a, doc_b])[None]
    seg = np.array([[1] * 6 + [2] * 10])
    pos = np.concatenate([np.arange(6), np.arange(10)])[None]
    logits, _ = model(jnp.asarray(packed), jnp.asarray(seg), jnp.asarray(pos))
    alone, _ = model(*batch_of(doc_b[None]))
    np.testing.assert_allclose(logits[0, 6:], alone[0], atol=1e-5)


def test_moe_block_with_one_expert_equals_dense_ffn():
    """E=1, k=1, ample capacity: the gate is softmax over one expert = 1, so MoE == its FFN."""
    cfg = tiny_config(num_experts=1, top_k=1, capacity_factor=2.0, eval_capacity_factor=2.0)
    block = MoEBlock(cfg, rngs=nnx.Rngs(params=jax.random.key(0)))
    dense = experts.MLP(cfg.model.d_model, cfg.model.d_ff, 'gelu',
                       rngs=nnx.Rngs(params=jax.random.key(1)))
    dense.w_in_DF[...] = block.w_in_EDF[...][0]
    dense.w_out_FD[...] = block.w_out_EFD[...][0]
    x = jax.random.normal(jax.random.key(2), (2, 8, cfg.model.d_model))
    y, stats = block(x, jnp.ones((2, 8), jnp.int32), train=False)
    np.testing.assert_allclose(y, dense(x), atol=1e-5)
    assert float(stats['dropped_fraction']) == 0.0


def test_dense_ffn_matches_numpy():
    cfg = tiny_config()
    mlp = experts.MLP(cfg.model.d_model, cfg.model.d_ff, 'swiglu',
                     rngs=nnx.Rngs(params=jax.random.key(0)))
    x = np.random.default_rng(0).normal(size=(1, 3, cfg.model.d_model)).astype(np.float32)
    w_in, w_gate, w_out = (np.asarray(v[...]) for v in (mlp.w_in_DF, mlp.w_gate_DF, mlp.w_out_FD))
    gate = x @ w_gate
    expected = (gate / (1 + np.exp(-gate)) * (x @ w_in)) @ w_out
    np.testing.assert_allclose(mlp(jnp.asarray(x)), expected, rtol=1e-4, atol=1e-5)


def test_param_counts_match_the_arrays():
    for variant in ({}, {'activation': 'swiglu', 'num_shared_experts': 1},
                    {'router': 'noisy_top_k', 'moe_every': 1},
                    {'activation': 'swiglu', 'head_dim': 8, 'qkv_bias': True, 'qk_norm': True,
                     'moe_every': 1, 'dense_layers': [0], 'expert_d_ff': 40,
                     'num_shared_experts': 1, 'shared_d_ff': 24, 'shared_gate': True}):
        cfg = tiny_config(**variant)
        params = nnx.state(make_model(cfg), nnx.Param)
        total = sum(x.size for x in jax.tree.leaves(params))
        assert model_lib.param_counts(cfg)['params'] == total, variant


def test_attention_padding_rows_are_finite():
    cfg = tiny_config()
    model = make_model(cfg)
    ids, seg, pos = batch_of(np.full((1, 8), 5))
    seg = seg.at[:, 5:].set(0)
    logits, _ = model(ids, seg, pos)
    assert np.isfinite(np.asarray(logits)).all()
