"""The Transformer (moejax/model/transformer.py) against independent truths: causality, segment
isolation and finite padding rows; and scanned layers (model.scan_layers) and remat policies
against the unrolled, remat-free model with the same weights (converted between layouts): a
scan, a remat policy or the stacked bias update must not change a loss, a gradient or a decoded
logit.
"""
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from moejax.model import transformer as model_lib
from moejax.run import loop
from moejax.run import step as step_lib
from tests import decisions
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


def test_attention_padding_rows_are_finite():
    cfg = tiny_config()
    model = make_model(cfg)
    ids, seg, pos = batch_of(np.full((1, 8), 5))
    seg = seg.at[:, 5:].set(0)
    logits, _ = model(ids, seg, pos)
    assert np.isfinite(np.asarray(logits)).all()


# ------------------------------------------------------------------- scanned layers, remat


def models(cfg, seed=0):
    """(unrolled, scanned) Transformers of cfg from the same seed."""
    unrolled_cfg, scanned_cfg = cfg.copy_and_resolve_references(), cfg.copy_and_resolve_references()
    unrolled_cfg.model.scan_layers, scanned_cfg.model.scan_layers = False, True
    unrolled = model_lib.Transformer(unrolled_cfg, rngs=nnx.Rngs(params=jax.random.key(seed)))
    scanned = model_lib.Transformer(scanned_cfg, rngs=nnx.Rngs(params=jax.random.key(seed)))
    return unrolled, scanned


def test_one_seed_gives_one_model_in_both_layouts():
    """The scanned model's stacked weights are the unrolled model's, layer by layer, and the
    layout conversions are inverses."""
    cfg = tiny_config(num_layers=4, moe_every=2)
    unrolled, scanned = models(cfg)
    pure_u, pure_s = nnx.state(unrolled).to_pure_dict(), nnx.state(scanned).to_pure_dict()
    jax.tree.map(np.testing.assert_array_equal, model_lib.unrolled_params(pure_s, cfg), pure_u)
    jax.tree.map(np.testing.assert_array_equal, model_lib.scanned_params(pure_u, cfg), pure_s)
    flat = model_lib.unrolled_model(scanned, cfg)
    jax.tree.map(np.testing.assert_array_equal, nnx.state(flat).to_pure_dict(), pure_u)
    w_in = scanned.stack.blocks[1].ffn.w_in_EDF
    assert w_in.shape[0] == 2 and w_in.get_metadata()['out_sharding'][0] == 'layers'


def batch(cfg, seed=1):
    B, T = 2, cfg.data.seq_len
    ids_BT = jax.random.randint(jax.random.key(seed), (B, T), 3, cfg.data.vocab_size)
    seg_BT = jnp.concatenate([jnp.ones((B, T // 2), jnp.int32), 2 * jnp.ones((B, T // 2),
                                                                             jnp.int32)], axis=1)
    pos_BT = jnp.concatenate([jnp.arange(T // 2), jnp.arange(T // 2)])[None].repeat(B, 0)
    return {'inputs': ids_BT, 'targets': jnp.roll(ids_BT, -1, axis=1), 'segment_ids': seg_BT,
            'positions': pos_BT}


def loss_and_grads(model, cfg, data):
    """The training objective (CE + weighted aux and z losses) and its parameter gradients."""
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)

    def loss_fn(params):
        m = nnx.merge(graphdef, params, rest)
        logits, stats = m(data['inputs'], data['segment_ids'], data['positions'], train=True,
                          rng=jax.random.key(5))
        parts = step_lib.loss_parts(logits, data, stats, jnp.sum(data['segment_ids'] > 0))
        return step_lib.total_loss(parts, cfg.moe), stats
    (loss, stats), grads = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))(params)
    return loss, stats, grads.to_pure_dict()


def assert_close(a, b, tol=1e-5):
    jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=tol, atol=tol), a, b)


@pytest.mark.parametrize('moe_every,remat,router', [(2, 'none', 'top_k'), (1, 'block', 'top_k'),
                                                    (2, 'minimal', 'noisy_top_k'),
                                                    (0, 'none', 'top_k')])
def test_scanned_equals_unrolled(moe_every, remat, router):
    """Same weights, same loss, MoE statistics (per MoE layer, in order) and gradients."""
    cfg = tiny_config(num_layers=4, moe_every=moe_every, router=router, jitter=0.1)
    cfg.model.remat = remat
    unrolled, scanned = models(cfg)
    data = batch(cfg)
    with decisions.record() as margins:
        loss_u, stats_u, grads_u = loss_and_grads(unrolled, cfg, data)
    margins.assert_clear()
    loss_s, stats_s, grads_s = loss_and_grads(scanned, cfg, data)
    np.testing.assert_allclose(loss_s, loss_u, rtol=1e-5)
    assert_close(stats_s, stats_u)
    if moe_every:
        assert stats_s['expert_load'].shape[0] == 4 // moe_every
    assert_close(model_lib.unrolled_params(grads_s, cfg), grads_u)


@pytest.mark.parametrize('remat', ['block', 'minimal'])
@pytest.mark.parametrize('scan', [False, True])
def test_remat_policies_change_nothing(remat, scan):
    """Every remat policy gives the loss and gradients of no remat at all."""
    cfg = tiny_config(num_layers=2)
    cfg.model.scan_layers = scan
    reference = model_lib.Transformer(cfg, rngs=nnx.Rngs(params=jax.random.key(0)))
    cfg_remat = cfg.copy_and_resolve_references()
    cfg_remat.model.remat = remat
    rematted = model_lib.Transformer(cfg_remat, rngs=nnx.Rngs(params=jax.random.key(0)))
    data = batch(cfg)
    with decisions.record() as margins:
        loss_r, _, grads_r = loss_and_grads(reference, cfg, data)
    margins.assert_clear()
    loss, _, grads = loss_and_grads(rematted, cfg, data)
    np.testing.assert_allclose(loss, loss_r, rtol=1e-6)
    assert_close(grads, grads_r)


def test_stacked_bias_update_equals_per_layer_update():
    """Loss-free balancing moves each MoE layer's bias by its own load, stacked or not."""
    cfg = tiny_config(num_layers=4, moe_every=2, balance='bias', bias_update_rate=0.1)
    unrolled, scanned = models(cfg)
    load_LE = jnp.array([[0.1, 0.2, 0.3, 0.4], [0.4, 0.3, 0.2, 0.1]])
    for model in (unrolled, scanned):
        for layer, block in enumerate(model.moe_blocks()):
            block.update_bias(load_LE[layer])
    bias_u = np.stack([b.router.expert_bias[...] for b in unrolled.moe_blocks()])
    np.testing.assert_allclose(scanned.stack.blocks[1].ffn.router.expert_bias[...], bias_u)
    assert not np.allclose(bias_u[0], bias_u[1])


def test_scanned_cached_decoding_equals_unrolled():
    """Prefill then one-token steps with the KV cache: the same logits in both layouts."""
    cfg = tiny_config(num_layers=4, moe_every=2, dispatch='dropless')
    unrolled, scanned = models(cfg)
    ids_BT = jax.random.randint(jax.random.key(2), (2, 8), 3, cfg.data.vocab_size)
    out = []
    for model in (unrolled, scanned):
        cache = model.init_cache(2, 12)
        logits, cache = model.extend(ids_BT[:, :6], cache, 0)
        steps = [logits]
        for t in (6, 7):
            logits, cache = model.extend(ids_BT[:, t:t + 1], cache, t)
            steps.append(logits)
        out.append(jnp.concatenate(steps, axis=1))
    np.testing.assert_allclose(out[1], out[0], atol=1e-5)


@pytest.mark.slow
def test_tiny_training_logs_the_same_losses_scanned_or_not(data_dir, tmp_path):
    """configs/default.py:tiny trained both ways on 8 devices logs the same losses."""
    losses = {}
    for scan in (False, True):
        cfg = tiny_config(num_layers=2, moe_every=1)
        cfg.model.scan_layers = scan
        cfg.mesh.update(data=2, fsdp=2, expert=2)
        cfg.train.update(num_steps=4, log_every=1, eval_every=0, checkpoint_every=100)
        cfg.data.data_dir = data_dir
        workdir = str(tmp_path / f'scan_{scan}')
        with decisions.record() as margins:
            loop.train_and_evaluate(cfg, workdir)
        margins.assert_clear()
        with open(os.path.join(workdir, 'metrics.jsonl')) as f:
            records = [json.loads(line) for line in f]
        losses[scan] = [r['loss'] for r in records if 'loss' in r]
    assert len(losses[True]) == 4
    np.testing.assert_allclose(losses[True], losses[False], rtol=1e-5)
