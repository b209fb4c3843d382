"""Grouped FFN, row gathers and the sorted layout against NumPy references and plain autodiff."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType

from moejax.moe import dispatch, experts, grouped

D, F = 4, 6


def np_gelu(v):
    return 0.5 * v * (1.0 + np.tanh(math.sqrt(2.0 / math.pi) * (v + 0.044715 * v ** 3)))


def np_grouped_ffn(x, w_in, w_gate, w_out, sizes):
    """Row by row, float64: rows of group e through expert e; rows past the groups give 0."""
    x = np.asarray(x, np.float64)
    y = np.zeros((x.shape[0], w_out.shape[-1]))
    row = 0
    for e, size in enumerate(sizes):
        for r in range(row, row + size):
            h = x[r] @ np.asarray(w_in[e], np.float64)
            if w_gate is None:
                h = np_gelu(h)
            else:  # SwiGLU: silu(x @ w_gate) * (x @ w_in)
                g = x[r] @ np.asarray(w_gate[e], np.float64)
                h = g / (1.0 + np.exp(-g)) * h
            y[r] = h @ np.asarray(w_out[e], np.float64)
        row += size
    return y


def weights(seed, num_experts, gated):
    ks = jax.random.split(jax.random.key(seed), 3)
    w_in = jax.random.normal(ks[0], (num_experts, D, F)) / math.sqrt(D)
    w_gate = jax.random.normal(ks[1], (num_experts, D, F)) / math.sqrt(D) if gated else None
    w_out = jax.random.normal(ks[2], (num_experts, F, D)) / math.sqrt(F)
    return w_in, w_gate, w_out


# Group sizes (multiples of the smallest block) that use big blocks, tails, empty groups, and
# leave rows past the groups.
SIZES = [10, 0, 4, 18, 2]
ROWS = 40


def blocked(x, w_in, w_gate, w_out, sizes, blocks):
    return grouped.blocked_ffn(x, w_in, w_gate, w_out, sizes, blocks, experts.activate)


@pytest.mark.parametrize('gated', [False, True])
@pytest.mark.parametrize('blocks', [(8, 2), (2,), (16, 8, 2)])
def test_blocked_ffn_matches_numpy(blocks, gated):
    w_in, w_gate, w_out = weights(0, len(SIZES), gated)
    x = jax.random.normal(jax.random.key(1), (ROWS, D))
    y = blocked(x, w_in, w_gate, w_out, jnp.asarray(SIZES, jnp.int32), blocks)
    want = np_grouped_ffn(x, w_in, w_gate, w_out, SIZES)
    np.testing.assert_allclose(y, want, rtol=1e-5, atol=1e-6)
    assert np.all(np.asarray(y)[sum(SIZES):] == 0.0)


@pytest.mark.parametrize('gated', [False, True])
def test_blocked_grouped_ffn_gradients_match_ragged_dot(gated):
    """The blocked loops' custom backward equals autodiff of the ragged_dot formulation."""
    w = weights(2, len(SIZES), gated)
    x = jax.random.normal(jax.random.key(3), (ROWS, D))
    probe = jax.random.normal(jax.random.key(4), (ROWS, D))
    sizes = jnp.asarray(SIZES, jnp.int32)

    def grads(ffn):
        loss = lambda x, w: jnp.sum(ffn(x, w) * probe)
        return jax.jit(jax.grad(loss, argnums=(0, 1)))(x, w)
    got = grads(lambda x, w: blocked(x, *w, sizes, (8, 2)))
    want = grads(lambda x, w: experts.grouped_ffn(experts.ExpertWeights(*w), x, sizes,
                                                  'ragged_dot'))
    for got, want in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_gather_rows_gradient_is_the_gather_transpose():
    """gather_rows' gather-by-inverse gradient equals the scatter-add autodiff of a plain gather."""
    rng = np.random.default_rng(0)
    num_src, k = 6, 2
    # Each source row m is read by output rows inverse[m, :k] (where valid); 3 extra rows unused.
    valid_MJ = rng.random((num_src, k)) < 0.7
    rows = rng.permutation(num_src * k + 3)
    inverse_MJ = rows[:num_src * k].reshape(num_src, k)
    index_R = np.zeros(num_src * k + 3, np.int32)
    valid_R = np.zeros(num_src * k + 3, bool)
    index_R[inverse_MJ[valid_MJ]] = np.nonzero(valid_MJ)[0]
    valid_R[inverse_MJ[valid_MJ]] = True
    x = jax.random.normal(jax.random.key(0), (num_src, D))
    ct = jax.random.normal(jax.random.key(1), (len(index_R), D))
    args = tuple(jnp.asarray(a) for a in (index_R, valid_R, inverse_MJ, valid_MJ))
    y, vjp = jax.vjp(lambda x: grouped.gather_rows(x, *args), x)
    plain = lambda x: jnp.where(valid_R[:, None], x[index_R], 0.0)
    y_want, vjp_want = jax.vjp(plain, x)
    np.testing.assert_array_equal(y, y_want)
    np.testing.assert_allclose(vjp(ct)[0], vjp_want(ct)[0], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize('block', [1, 4])
def test_sorted_layout_groups_pairs_by_expert(block):
    rng = np.random.default_rng(block)
    num_experts, n = 5, 37
    expert = rng.integers(0, num_experts, n).astype(np.int32)
    expert[expert == 3] = 1  # an expert with no pairs
    valid = rng.random(n) < 0.8
    lay = jax.jit(grouped.sorted_layout, static_argnums=(2, 3))(
        jnp.asarray(expert), jnp.asarray(valid), num_experts, block)
    row, pair, filled, sizes = (np.asarray(a) for a in lay)
    counts = np.bincount(expert[valid], minlength=num_experts)
    np.testing.assert_array_equal(sizes, -(-counts // block) * block)
    assert len(pair) == grouped.num_layout_rows(n, num_experts, block) >= sizes.sum()
    np.testing.assert_array_equal(pair[row[valid]], np.nonzero(valid)[0])  # row <-> pair
    assert filled[row[valid]].all() and filled.sum() == valid.sum()
    group_of_row = np.repeat(np.arange(num_experts), sizes)
    np.testing.assert_array_equal(expert[pair[:sizes.sum()][filled[:sizes.sum()]]],
                                  group_of_row[filled[:sizes.sum()]])
    # Within an expert, pairs keep their order (a stable sort).
    for e in range(num_experts):
        mine = pair[:sizes.sum()][(group_of_row == e) & filled[:sizes.sum()]]
        assert np.all(np.diff(mine) > 0)


def test_ffn_blocks_rules(monkeypatch):
    monkeypatch.setattr(grouped, 'CPU_BLOCKS', (256, 32))
    assert grouped.ffn_blocks() == (256, 32)
    assert grouped.ffn_blocks(40) == (256, 8)  # largest power of two dividing 40, <= 32
    assert grouped.ffn_blocks(6) is None  # under MIN_BLOCK: einsums
    mesh = jax.make_mesh((8,), ('data',), axis_types=(AxisType.Auto,))
    with jax.set_mesh(mesh):
        assert grouped.ffn_blocks(64, partitioned_ok=False) is None
        assert grouped.ffn_blocks(64) == (256, 32)


@pytest.mark.parametrize('gated', [False, True])
def test_expert_ffn_block_loops_equal_einsums(gated, monkeypatch):
    """Capacity buffers through the CPU block loops (several block sizes) and through einsums."""
    w = experts.ExpertWeights(*weights(5, 3, gated))
    x_GECD = jax.random.normal(jax.random.key(6), (2, 3, 24, D))
    monkeypatch.setattr(grouped, 'CPU_BLOCKS', (16, 8))
    assert grouped.ffn_blocks(2 * 24) == (16, 8)
    looped = jax.jit(lambda x: dispatch.experts_on_buffers(w, x))(x_GECD)
    monkeypatch.setattr(grouped, 'MIN_BLOCK', 64)
    assert grouped.ffn_blocks(2 * 24) is None
    einsums = jax.jit(lambda x: dispatch.experts_on_buffers(w, x))(x_GECD)
    want = np.stack([np_grouped_ffn(x_GECD[g].reshape(-1, D), w.w_in_EDF, w.w_gate_EDF,
                                    w.w_out_EFD, [24] * 3).reshape(3, 24, D) for g in range(2)])
    np.testing.assert_allclose(looped, want, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(einsums, want, rtol=1e-5, atol=1e-6)
