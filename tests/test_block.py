"""The MoE block (moejax/moe/block.py): route, capacity and dispatch together, against a dense
FFN; and every routing, balancing and dispatch choice, peers' conventions included, trains on the
embedded corpus: finite, falling loss.

Each run is 24 steps of the tiny model cut to one MoE layer, on real python_stdlib batches (byte
tokenizer), compared with its own first steps.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from moejax import data, mesh, validate
from moejax.moe import experts
from moejax.moe.block import MoEBlock
from moejax.run import evaluate
from moejax.run import state as state_lib
from moejax.run import step as step_lib
from tests.helpers import jitted, tiny_config


def test_moe_block_with_one_expert_equals_dense_ffn():
    """E=1, k=1, ample capacity: the gate is softmax over one expert = 1, so MoE == its FFN."""
    cfg = tiny_config(num_experts=1, top_k=1, capacity_factor=2.0, eval_capacity_factor=2.0)
    block = MoEBlock(cfg, rngs=nnx.Rngs(params=jax.random.key(0)))
    dense = experts.MLP(cfg.model.d_model, cfg.model.d_ff, 'gelu',
                       rngs=nnx.Rngs(params=jax.random.key(1)))
    dense.w_in_DF[...] = block.w_in_EDF[...][0]
    dense.w_out_FD[...] = block.w_out_EFD[...][0]
    x = jax.random.normal(jax.random.key(2), (2, 8, cfg.model.d_model))
    y, stats = jitted(train=False)(block, x, jnp.ones((2, 8), jnp.int32))
    np.testing.assert_allclose(y, jitted()(dense, x), atol=1e-5)
    assert float(stats['dropped_fraction']) == 0.0


# -------------------------------------------------------- each choice trains (24 steps)

STEPS = 24


def block_config(**overrides):
    """The tiny model cut to its MoE layer (one layer, an MoE block): what each choice changes,
    at a third less to compile than the tiny model's dense + MoE pair."""
    return tiny_config(**dict(dict(num_layers=1, moe_every=1), **overrides))


def train_briefly(cfg, data_dir, *, evaluate_after=False):
    """STEPS steps on one device; returns the CE losses, the last step's metrics and (if asked:
    one more program to compile) one eval batch's routing sums after them."""
    cfg.data.data_dir = data_dir
    cfg.opt.update(lr=3e-3, warmup_steps=2)
    cfg.mesh.update(data=1)
    validate.check(cfg, 1)
    setup = state_lib.make_setup(cfg, mesh.make_mesh(cfg.mesh, devices=jax.devices()[:1]))
    state = state_lib.init_state(setup, seed=0)
    step_fn, eval_fn = step_lib.compile_steps(setup)
    batches = data.train_batches(cfg, data.get_tokenizer(cfg))
    losses = []
    for i in range(STEPS):
        batch = state_lib.global_batch(setup, batches[i])
        state, metrics = step_fn(state, batch)
        losses.append(float(metrics['ce_loss']))
    sums = None
    if evaluate_after:
        sums = eval_fn(state.params, state.extra, batch, jnp.ones(cfg.data.vocab_size))
    return np.array(losses), jax.device_get(metrics), jax.device_get(sums)


# Top-2 dropless with a shared expert and bias balancing: OPTIONS['deepseek_v3']; expert choice
# through the einsum engine: the engines agree on it (test_dispatch).
COMBINATIONS = [
    dict(router='top_k', top_k=1, dispatch='einsum', capacity_factor=0.0),  # 0: no drops
    dict(router='top_k', top_k=2, dispatch='sort', jitter=0.01),
    dict(router='top_k', balance='none', dispatch='dropless'),
    dict(router='noisy_top_k', top_k=2, dispatch='sort', num_shared_experts=1),
    dict(router='expert_choice', dispatch='dropless', num_shared_experts=1),
    dict(router='soft', dispatch='sort'),
]


@pytest.mark.slow
@pytest.mark.parametrize('overrides', COMBINATIONS, ids=lambda o: '-'.join(map(str, o.values())))
def test_each_routing_choice_trains(overrides, data_dir):
    losses, metrics, _ = train_briefly(block_config(**overrides), data_dir)
    assert np.isfinite(losses).all()
    assert losses[-4:].mean() < losses[:4].mean() - 0.5, losses
    if overrides.get('capacity_factor') == 0.0:  # capacity = the group size: nothing drops
        assert float(metrics['dropped_fraction']) == 0.0


OPTIONS = {
    'batch_prioritized': dict(top_k=2, dispatch='einsum', batch_prioritized=True,
                              capacity_factor=1.0),
    'raw_gates_t5x': dict(top_k=2, dispatch='sort', gate_norm='raw', capacity_rule='t5x',
                          min_capacity=4, aux_loss_norm='tokens', batch_prioritized=True),
    'sigmoid': dict(top_k=2, dispatch='sort', score_fn='sigmoid', gate_norm='renorm'),
    'deepseek_v3': dict(top_k=2, dispatch='dropless', score_fn='sigmoid', gate_norm='renorm',
                        routed_scaling_factor=2.5, num_expert_groups=2, top_expert_groups=1,
                        balance='bias', num_shared_experts=1),
    'switch_raw_k1': dict(top_k=1, dispatch='sort', gate_norm='raw', capacity_rule='t5x',
                          capacity_factor=1.0, batch_prioritized=True),
}


@pytest.mark.slow
@pytest.mark.parametrize('name', list(OPTIONS))
def test_each_convention_trains(name, data_dir):
    options = OPTIONS[name]
    losses, metrics, sums = train_briefly(block_config(**options), data_dir,
                                         evaluate_after=True)
    assert np.isfinite(losses).all()
    assert losses[-4:].mean() < losses[:4].mean() - 0.5, losses
    left, dropped = float(metrics['tokens_left_behind']), float(metrics['dropped_fraction'])
    assert 0.0 <= left <= dropped + 1e-6  # a token left behind dropped all its assignments
    if options['top_k'] == 1:
        assert left == pytest.approx(dropped, abs=1e-6)  # one assignment per token
    if options['dispatch'] == 'dropless':
        assert left == dropped == 0.0
    else:
        assert dropped > 0  # the tiny capacities do drop: the metrics are live
    summary = evaluate.summarize(sums, 1)
    assert len(summary['tokens_left_behind']) == len(summary['dropped_fraction'])


def test_capacity_factor_zero_drops_nothing():
    """capacity_factor <= 0 means capacity = the group size: the block then equals the
    dropless engine (an independent path without capacity), and reports no drops, while a
    small factor on the same tokens does drop."""
    x_BTD = jax.random.normal(jax.random.key(1), (2, 16, 32))
    seg_BT = np.ones((2, 16), np.int32)
    outputs = {}
    for name, (dispatch_name, cf) in {'zero': ('einsum', 0.0), 'negative': ('sort', -1.0),
                                      'dropless': ('dropless', 1.0),
                                      'small': ('einsum', 0.25)}.items():
        cfg = tiny_config(d_model=32, d_ff=64, num_experts=4, top_k=2, dispatch=dispatch_name,
                          capacity_factor=cf, eval_capacity_factor=cf)
        block = MoEBlock(cfg, rngs=nnx.Rngs(params=jax.random.key(0)))
        outputs[name] = [jitted(train=t)(block, x_BTD, seg_BT) for t in (True, False)]
    for name in ('zero', 'negative'):
        for (y, stats), (y_ref, _) in zip(outputs[name], outputs['dropless']):
            assert float(stats['dropped_fraction']) == 0.0
            np.testing.assert_allclose(y, y_ref, atol=1e-5)
    assert float(outputs['small'][0][1]['dropped_fraction']) > 0.1


