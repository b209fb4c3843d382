"""The CPU dropless expert step (rows gathered from tokens, gate-weighted sums scattered back)
against a NumPy float64 reference and against autodiff of a plain jnp version."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moejax.moe import dropless_cpu, experts

T, D, F = 12, 4, 6


def np_act(h, g):
    """GELU (tanh form), or SwiGLU silu(g) * h, in float64."""
    if g is None:
        return 0.5 * h * (1.0 + np.tanh(math.sqrt(2.0 / math.pi) * (h + 0.044715 * h ** 3)))
    return g / (1.0 + np.exp(-g)) * h


def case(seed, sizes, rows, gated, num_experts=None):
    """Token rows, a layout of `rows` rows (groups of `sizes`, then rows past them), each layout
    row's token and gate (a few padding rows with gate 0), and the experts' weights."""
    e = num_experts or len(sizes)
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(T, D)).astype(np.float32)
    token = rng.integers(0, T, rows).astype(np.int32)
    gate = rng.uniform(0.1, 1.0, rows).astype(np.float32)
    gate[rng.random(rows) < 0.2] = 0.0  # padding rows inside the groups
    gate[sum(sizes):] = 5.0  # rows past the groups are never read, whatever they hold
    w = [rng.normal(size=(e, D, F)) / np.sqrt(D), rng.normal(size=(e, D, F)) / np.sqrt(D),
         rng.normal(size=(e, F, D)) / np.sqrt(F)]
    w_in, w_gate, w_out = (jnp.asarray(a, jnp.float32) for a in w)
    return (jnp.asarray(x), jnp.asarray(token), jnp.asarray(gate), w_in,
            w_gate if gated else None, w_out, jnp.asarray(sizes, jnp.int32))


def np_reference(x, token, gate, w_in, w_gate, w_out, sizes):
    """float64: each layout row's FFN on its token's row, times its gate, summed per token."""
    f64 = lambda a: None if a is None else np.asarray(a, np.float64)
    x, gate, w_in, w_gate, w_out = map(f64, (x, gate, w_in, w_gate, w_out))
    y, row = np.zeros(x.shape), 0
    for e, size in enumerate(np.asarray(sizes)):
        for r in range(row, row + size):
            t = int(token[r])
            g = None if w_gate is None else x[t] @ w_gate[e]
            y[t] += gate[r] * (np_act(x[t] @ w_in[e], g) @ w_out[e])
        row += size
    return y


def jnp_reference(x, token, gate, w_in, w_gate, w_out, sizes):
    """Plain jnp (every expert on every row, the row's own picked): autodiff's gradients."""
    sizes = np.asarray(sizes)  # host values, also where the gradient below is traced
    n = int(np.sum(sizes))
    expert = np.repeat(np.arange(len(sizes)), sizes)
    x_rows = x[token[:n]]
    h = jnp.einsum('rd,rdf->rf', x_rows, w_in[expert])
    g = None if w_gate is None else jnp.einsum('rd,rdf->rf', x_rows, w_gate[expert])
    y_rows = jnp.einsum('rf,rfd->rd', experts.activate(h, g), w_out[expert])
    return jnp.zeros_like(x).at[token[:n]].add(gate[:n, None] * y_rows)


def run(x, token, gate, w_in, w_gate, w_out, sizes, blocks):
    return dropless_cpu.blocked_dropless_ffn(x, token, gate, w_in, w_gate, w_out, sizes, blocks,
                                             experts.activate)


# Big blocks, tails, empty experts, odd multiples of the smallest block, rows past the groups;
# the last: many narrow experts with one block each.
CASES = [([10, 0, 4, 18, 2], 40, (8, 2)), ([6, 0, 0, 14], 24, (16, 4, 2)),
         ([2] * 20 + [0] * 4, 52, (8, 2))]


@pytest.mark.parametrize('gated', [False, True])
@pytest.mark.parametrize('sizes, rows, blocks', CASES)
def test_forward_matches_numpy(sizes, rows, blocks, gated):
    args = case(0, sizes, rows, gated)
    y = jax.jit(run, static_argnums=7)(*args, blocks)
    np.testing.assert_allclose(y, np_reference(*args), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize('gated', [False, True])
@pytest.mark.parametrize('sizes, rows, blocks', CASES)
def test_gradients_match_autodiff(sizes, rows, blocks, gated):
    x, token, gate, w_in, w_gate, w_out, sizes_E = case(1, sizes, rows, gated)
    dy = jax.random.normal(jax.random.key(2), x.shape)
    n = sum(sizes)

    def loss(fn, x, gate, w_in, w_gate, w_out):
        return jnp.sum(fn(x, token, gate, w_in, w_gate, w_out, sizes_E) * dy)
    diff = (0, 1, 2, 3, 4) if gated else (0, 1, 2, 4)
    blocked = lambda *a: run(*a, blocks)
    got = jax.jit(jax.grad(lambda *a: loss(blocked, *a), argnums=diff))(
        x, gate, w_in, w_gate, w_out)
    want = jax.jit(jax.grad(lambda *a: loss(jnp_reference, *a), argnums=diff))(
        x, gate, w_in, w_gate, w_out)
    for i, (a, b) in enumerate(zip(got, want)):
        if i == 1:  # the gates: rows past the groups are not read, so get no gradient
            np.testing.assert_array_equal(a[n:], 0)
            a, b = a[:n], b[:n]
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
