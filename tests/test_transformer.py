"""The Transformer (moejax/model/transformer.py) against independent truths: causality, segment
isolation and finite padding rows; and scanned layers (model.scan_layers) and remat policies
against the unrolled, remat-free model with the same weights (converted between layouts): a
scan, a remat policy or the stacked bias update must not change a loss, a gradient or a decoded
logit.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from moejax.model import transformer as model_lib
from moejax.run import step as step_lib
from tests import decisions
from tests.helpers import jitted, tiny_config
from tests.layouts import assert_same_training, make_config, run
from tests.test_mla import MLA_KEYS


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
    forward = jitted()
    logits, _ = forward(model, *batch_of(ids))
    changed = ids.copy()
    changed[:, 9] = (changed[:, 9] + 7) % cfg.data.vocab_size
    logits2, _ = forward(model, *batch_of(changed))
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
    forward = jitted()
    logits, _ = forward(model, jnp.asarray(packed), jnp.asarray(seg), jnp.asarray(pos))
    alone, _ = forward(model, *batch_of(doc_b[None]))
    np.testing.assert_allclose(logits[0, 6:], alone[0], atol=1e-5)


def test_attention_padding_rows_are_finite():
    cfg = tiny_config()
    model = make_model(cfg)
    ids, seg, pos = batch_of(np.full((1, 8), 5))
    seg = seg.at[:, 5:].set(0)
    logits, _ = jitted()(model, ids, seg, pos)
    assert np.isfinite(np.asarray(logits)).all()


# ------------------------------------------------------------------- scanned layers, remat


def models(cfg, seed=0):
    """(unrolled, scanned) Transformers of cfg from the same seed."""
    unrolled_cfg, scanned_cfg = cfg.copy_and_resolve_references(), cfg.copy_and_resolve_references()
    unrolled_cfg.model.scan_layers, scanned_cfg.model.scan_layers = False, True
    unrolled = model_lib.Transformer(unrolled_cfg, rngs=nnx.Rngs(params=jax.random.key(seed)))
    scanned = model_lib.Transformer(scanned_cfg, rngs=nnx.Rngs(params=jax.random.key(seed)))
    return unrolled, scanned


def assert_layouts_convert(unrolled, scanned, cfg):
    """scanned_params, unrolled_params and unrolled_model map each layout's weights onto the
    other's exactly; returns both pure state dicts."""
    pure_u, pure_s = nnx.to_pure_dict(nnx.state(unrolled)), nnx.to_pure_dict(nnx.state(scanned))
    jax.tree.map(np.testing.assert_array_equal, model_lib.unrolled_params(pure_s, cfg), pure_u)
    jax.tree.map(np.testing.assert_array_equal, model_lib.scanned_params(pure_u, cfg), pure_s)
    flat = model_lib.unrolled_model(scanned, cfg)
    jax.tree.map(np.testing.assert_array_equal, nnx.to_pure_dict(nnx.state(flat)), pure_u)
    return pure_u, pure_s


def test_one_seed_gives_one_model_in_both_layouts():
    """The scanned model's stacked weights are the unrolled model's, layer by layer, and the
    layout conversions are inverses."""
    cfg = tiny_config(num_layers=4, moe_every=2)
    unrolled, scanned = models(cfg)
    assert_layouts_convert(unrolled, scanned, cfg)
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
    """The training objective (CE + weighted aux and z losses, + the MTP loss with
    model.mtp_depth) and its parameter gradients."""
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    args = data['inputs'], data['segment_ids'], data['positions']

    def loss_fn(params):
        m = nnx.merge(graphdef, params, rest)
        tokens = jnp.sum(data['segment_ids'] > 0)
        if cfg.model.mtp_depth:
            logits, stats, heads = m.forward_with_mtp(*args, data['targets'], train=True,
                                                      rng=jax.random.key(5))
            mtp = step_lib.mtp_parts(heads, tokens, cfg.model.mtp_loss_weight)
        else:
            logits, stats = m(*args, train=True, rng=jax.random.key(5))
            mtp = {}
        parts = dict(step_lib.loss_parts(logits, data, stats, tokens), **mtp)
        return step_lib.total_loss(parts, cfg.moe), stats
    (loss, stats), grads = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))(params)
    return loss, stats, nnx.to_pure_dict(grads)


def against_reference(reference, model, cfg, data):
    """loss_and_grads of the reference, whose routing decisions must have clear margins (so
    that the comparison does not hang on rounding: tests/decisions.py), then of the model."""
    with decisions.record() as margins:
        expected = loss_and_grads(reference, cfg, data)
    margins.assert_clear()
    return expected, loss_and_grads(model, cfg, data)


def assert_close(a, b, tol=1e-5):
    jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=tol, atol=tol), a, b)


@pytest.mark.parametrize('moe_every,remat,router', [(2, 'minimal', 'noisy_top_k'),
                                                    (0, 'none', 'top_k')])
def test_scanned_equals_unrolled(moe_every, remat, router):
    """Same weights, same loss, MoE statistics (per MoE layer, in order) and gradients. With
    the dense prefix's mesh test (period 1, block remat) every remat policy is covered, so with
    test_remat_policies_change_nothing a scanned model under any policy computes what the
    unrolled one computes without remat."""
    cfg = tiny_config(num_layers=4, moe_every=moe_every, router=router, jitter=0.1)
    cfg.model.remat = remat
    assert_scanned_equals_unrolled(cfg, moe_layers=4 // moe_every if moe_every else 0)


def assert_scanned_equals_unrolled(cfg, moe_layers: int):
    """One seed's model scanned and unrolled: the same loss, statistics of moe_layers MoE
    layers in layer order, and gradients, on one batch."""
    unrolled, scanned = models(cfg)
    (loss_u, stats_u, grads_u), (loss_s, stats_s, grads_s) = against_reference(
        unrolled, scanned, cfg, batch(cfg))
    np.testing.assert_allclose(loss_s, loss_u, rtol=1e-5)
    assert_close(stats_s, stats_u)
    if moe_layers:
        assert stats_s['expert_load'].shape[0] == moe_layers
    assert_close(model_lib.unrolled_params(grads_s, cfg), grads_u)


@pytest.mark.parametrize('remat', ['block', 'minimal'])
def test_remat_policies_change_nothing(remat):
    """Every remat policy gives the loss and gradients of no remat at all (unrolled; scanned
    equals unrolled under each policy: test_scanned_equals_unrolled)."""
    cfg = tiny_config(num_layers=2)
    cfg.model.scan_layers = False
    reference = model_lib.Transformer(cfg, rngs=nnx.Rngs(params=jax.random.key(0)))
    cfg_remat = cfg.copy_and_resolve_references()
    cfg_remat.model.remat = remat
    rematted = model_lib.Transformer(cfg_remat, rngs=nnx.Rngs(params=jax.random.key(0)))
    data = batch(cfg)
    (loss_r, _, grads_r), (loss, _, grads) = against_reference(reference, rematted, cfg, data)
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
    """Prefill then one-token steps with the KV cache: the same logits in both layouts. The
    caches of a dense prefix's blocks, kept before the stacked ones, are checked against the
    full forward by test_generation_with_a_dense_prefix_uses_the_cache_correctly."""
    cfg = tiny_config(num_layers=4, moe_every=2, dispatch='dropless')
    unrolled, scanned = models(cfg)
    ids_BT = jax.random.randint(jax.random.key(2), (2, 8), 3, cfg.data.vocab_size)
    out = []
    for model in (unrolled, scanned):
        extend = jitted('extend')  # one program for the prefill, one for every step
        cache = model.init_cache(2, 12)
        logits, cache = extend(model, ids_BT[:, :6], cache, 0)
        steps = [logits]
        for t in (6, 7):
            logits, cache = extend(model, ids_BT[:, t:t + 1], cache, t)
            steps.append(logits)
        out.append(jnp.concatenate(steps, axis=1))
    np.testing.assert_allclose(out[1], out[0], atol=1e-5)


# ----------------------------------------------- scanned layers after an unrolled dense prefix


def prefix_config(attention='mha', mtp_depth=0, **overrides):
    """DeepSeek-V3's layer kinds in small: layer 0 dense (model.dense_layers=[0], kept unrolled
    when scanned), layers 1-3 MoE (three scanned periods); jitter draws per-layer noise."""
    cfg = tiny_config(**dict(dict(num_layers=4, moe_every=1, dense_layers=[0], jitter=0.1),
                             **overrides))
    if attention == 'mla':
        cfg.model.update(**MLA_KEYS)
    cfg.model.mtp_depth = mtp_depth
    return cfg


def test_one_seed_gives_one_model_with_a_dense_prefix():
    """The prefix blocks are the unrolled model's first layers (their params without the
    'layers' axis), the stack holds the rest, and the layout conversions are inverses."""
    cfg = prefix_config(mtp_depth=1)
    unrolled, scanned = models(cfg)
    pure_u, pure_s = assert_layouts_convert(unrolled, scanned, cfg)
    assert sorted(pure_s['prefix']) == [0] and 'blocks' not in pure_s
    jax.tree.map(np.testing.assert_array_equal, pure_s['prefix'][0], pure_u['blocks'][0])
    w_in = scanned.stack.blocks[0].ffn.w_in_EDF
    assert w_in.shape[0] == 3 and w_in.get_metadata()['out_sharding'][0] == 'layers'
    dense_w = scanned.prefix[0].ffn.w_in_DF
    assert dense_w.get_metadata()['out_sharding'] == unrolled.blocks[0].ffn.w_in_DF \
        .get_metadata()['out_sharding'] and 'layers' not in dense_w.get_metadata()['out_sharding']


def test_bias_update_with_a_dense_prefix_moves_each_layers_row():
    """Loss-free balancing after a dense prefix: MoE layer l's load moves the stacked bias row
    of layer l (and the MTP block's its own), as the unrolled model's per-layer update does."""
    cfg = prefix_config(mtp_depth=1, balance='bias', bias_update_rate=0.1)
    unrolled, scanned = models(cfg)
    load_LE = jax.random.uniform(jax.random.key(4), (4, cfg.moe.num_experts))
    for model in (unrolled, scanned):
        assert len(model.moe_blocks()) == 4  # layers 1-3 and the MTP block
        for layer, block in enumerate(model.moe_blocks()):
            block.update_bias(load_LE[layer])
    pure_u = nnx.to_pure_dict(nnx.state(unrolled))
    jax.tree.map(np.testing.assert_array_equal,
                 model_lib.unrolled_params(nnx.to_pure_dict(nnx.state(scanned)), cfg), pure_u)
    bias_LE = np.stack([pure_u['blocks'][i]['ffn']['router']['expert_bias'] for i in (1, 2, 3)])
    assert len({tuple(row) for row in np.round(bias_LE, 6)}) == 3  # each row moved its own way


def test_generation_with_a_dense_prefix_uses_the_cache_correctly():
    """Greedy decoding of the scanned prefix model through its KV caches gives the tokens and
    logits of recomputing the whole forward for every new token."""
    from tests.test_sampling import assert_cached_greedy_equals_forward
    cfg = prefix_config('mla', dispatch='dropless', jitter=0.0)
    _, scanned = models(cfg)
    assert_cached_greedy_equals_forward(scanned, cfg, 7)


def test_dense_prefix_scanned_on_a_mesh_trains_like_the_unrolled_model_on_one_device():
    """The scanned prefix model (MLA, MTP, bias balancing, block remat) on 8 devices, the
    stacked weights over fsdp, heads over tensor and experts over expert: the same 6 training
    steps as the unrolled model without remat on one device, MTP's loss included. With jitter,
    each scanned layer must draw the unrolled layer's noise (fold_in(rng, layer), the prefix
    counted). It is also the prefix's scanned = unrolled check."""
    def cfg_for(scan, mesh=None):
        cfg = make_config(mesh)
        cfg.model.update(num_layers=2, dense_layers=[0], scan_layers=scan, mtp_depth=1,
                         remat='block' if scan else 'none', **MLA_KEYS)
        cfg.moe.update(balance='bias', bias_update_rate=0.1, jitter=0.1)
        return cfg
    reference, _, margins = run(cfg_for(False), jax.devices()[:1], ulps=0, record=True)
    margins.assert_clear()
    history, _, _ = run(cfg_for(True, {'fsdp': 2, 'expert': 2, 'tensor': 2}))
    assert_same_training(history, reference)
    np.testing.assert_allclose([h['mtp_loss_1'] for h in history],
                               [h['mtp_loss_1'] for h in reference], rtol=1e-5)
    assert np.asarray(reference[0]['expert_load']).shape[0] == 2  # layer 1 and MTP
