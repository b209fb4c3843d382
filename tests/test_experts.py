"""The one expert FFN and its grouped-matmul backends against NumPy (values and gradients)."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from moejax import validate
from moejax.errors import ConfigError
from moejax.moe import dispatch, experts, grouped
from moejax.moe.block import MoEBlock
from moejax.moe.routing import TokenChoice
from tests.helpers import jitted, tiny_config

nnx.use_eager_sharding(False)

D, F = 4, 6
SIZES = [6, 0, 4, 10, 2]  # an empty group, tails; multiples of the patched smallest block (2)
ROWS = 26  # 4 rows past the groups
BACKENDS = ('blocks', 'ragged_dot', 'tokamax')


def np_silu(v):
    return v / (1.0 + np.exp(-v))


def np_gelu(v):
    return 0.5 * v * (1.0 + np.tanh(math.sqrt(2.0 / math.pi) * (v + 0.044715 * v ** 3)))


def np_gelu_grad(v):
    c = math.sqrt(2.0 / math.pi)
    t = np.tanh(c * (v + 0.044715 * v ** 3))
    return 0.5 * (1.0 + t) + 0.5 * v * (1.0 - t ** 2) * c * (1.0 + 3 * 0.044715 * v ** 2)


def np_ffn_and_grads(x, wi, wg, wo, probe):
    """One FFN, float64: y = (silu(x@wg) * (x@wi)) @ wo (gelu(x@wi) @ wo without wg), and the
    gradients of sum(y * probe) w.r.t. x, wi, wg, wo, derived by hand."""
    hi = x @ wi
    if wg is None:
        a, dhi_da = np_gelu(hi), np_gelu_grad(hi)
    else:
        hg = x @ wg
        s = 1.0 / (1.0 + np.exp(-hg))
        a, dhi_da = hg * s * hi, hg * s
    y = a @ wo
    da = probe @ wo.T
    dhi = da * dhi_da
    dx, grads = dhi @ wi.T, {'wi': x.T @ dhi, 'wo': a.T @ probe}
    if wg is not None:
        dhg = da * hi * s * (1.0 + hg * (1.0 - s))
        dx, grads['wg'] = dx + dhg @ wg.T, x.T @ dhg
    return y, dx, grads


def np_grouped(x, w, sizes, probe):
    """Rows of group e through expert e; rows past the groups give 0 (and get 0 gradient)."""
    f64 = lambda a: None if a is None else np.asarray(a, np.float64)
    x, probe = f64(x), f64(probe)
    wi, wg, wo = (f64(a) for a in w)
    y, dx = np.zeros_like(x), np.zeros_like(x)
    dw = {'wi': np.zeros_like(wi), 'wg': None if wg is None else np.zeros_like(wg),
          'wo': np.zeros_like(wo)}
    row = 0
    for e, size in enumerate(sizes):
        rows = slice(row, row + size)
        y[rows], dx[rows], g = np_ffn_and_grads(x[rows], wi[e], None if wg is None else wg[e],
                                                wo[e], probe[rows])
        for name, value in g.items():
            dw[name][e] = value
        row += size
    return y, dx, (dw['wi'], dw['wg'], dw['wo'])


def make_weights(seed, num_experts, gated):
    ks = jax.random.split(jax.random.key(seed), 3)
    w_in = jax.random.normal(ks[0], (num_experts, D, F)) / math.sqrt(D)
    w_gate = jax.random.normal(ks[1], (num_experts, D, F)) / math.sqrt(D) if gated else None
    w_out = jax.random.normal(ks[2], (num_experts, F, D)) / math.sqrt(F)
    return experts.ExpertWeights(w_in, w_gate, w_out)


def backend_available(backend):
    if backend == 'tokamax':
        pytest.importorskip('tokamax')  # installed wherever CI runs (Python >= 3.12)


@pytest.mark.parametrize('gated', [False, True])
def test_ffn_convention_matches_numpy(gated):
    """experts.ffn, batched_ffn and the dense MLP: (silu(x@wg) * (x@wi)) @ wo, or gelu."""
    w = make_weights(0, 2, gated)
    x = np.random.default_rng(0).normal(size=(2, 5, D)).astype(np.float32)
    probe = np.zeros((5, D))
    for e in range(2):
        want = np_ffn_and_grads(np.asarray(x[e], np.float64), *(
            None if a is None else np.asarray(a[e], np.float64) for a in w), probe)[0]
        one = jax.jit(experts.ffn)(jnp.asarray(x[e]), *(None if a is None else a[e] for a in w))
        np.testing.assert_allclose(one, want, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(jax.jit(experts.batched_ffn)(w, jnp.asarray(x))[e], want,
                                   rtol=1e-5, atol=1e-6)
    mlp = experts.MLP(D, F, 'swiglu' if gated else 'gelu', rngs=nnx.Rngs(params=0))
    mlp.w_in_DF[...], mlp.w_out_FD[...] = w.w_in_EDF[0], w.w_out_EFD[0]
    if gated:
        mlp.w_gate_DF[...] = w.w_gate_EDF[0]
    want = np_ffn_and_grads(np.asarray(x[0], np.float64), *(
        None if a is None else np.asarray(a[0], np.float64) for a in w), probe)[0]
    np.testing.assert_allclose(jitted()(mlp, jnp.asarray(x[:1]))[0], want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize('backend', BACKENDS)
@pytest.mark.parametrize('gated', [False, True])
def test_grouped_backend_matches_numpy_values_and_gradients(backend, gated, monkeypatch):
    backend_available(backend)
    monkeypatch.setattr(grouped, 'CPU_BLOCKS', (8, 2))  # big blocks, tails, and padding
    w = make_weights(1, len(SIZES), gated)
    x = jax.random.normal(jax.random.key(2), (ROWS, D))
    probe = jax.random.normal(jax.random.key(3), (ROWS, D))
    sizes = jnp.asarray(SIZES, jnp.int32)
    loss = lambda x, w: jnp.sum(experts.grouped_ffn(w, x, sizes, backend) * probe)
    y = jax.jit(lambda x, w: experts.grouped_ffn(w, x, sizes, backend))(x, w)
    dx, dw = jax.jit(jax.grad(loss, argnums=(0, 1)))(x, w)
    y_want, dx_want, dw_want = np_grouped(x, w, SIZES, probe)
    np.testing.assert_allclose(y, y_want, rtol=1e-5, atol=1e-6)
    assert np.all(np.asarray(y)[sum(SIZES):] == 0.0)
    np.testing.assert_allclose(dx, dx_want, rtol=1e-5, atol=1e-5)
    for got, want in zip(dw, dw_want):
        if want is None:
            assert got is None
        else:
            np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def random_routing(seed, k, num_experts, g, s):
    rng = np.random.default_rng(seed)
    expert = np.stack([np.stack([rng.choice(num_experts, k, replace=False) for _ in range(s)])
                       for _ in range(g)]).astype(np.int32)
    gate = rng.uniform(0.1, 1.0, size=(g, s, k)).astype(np.float32)
    return TokenChoice(jnp.asarray(expert), jnp.asarray(gate), {}, {})


@pytest.mark.parametrize('backend', BACKENDS)
def test_dropless_with_each_backend_equals_einsum_without_drops(backend):
    """Outputs and gradients (x and every weight) of dropless == einsum with capacity S."""
    backend_available(backend)
    g, s, num_experts = 2, 8, 4
    w = make_weights(4, num_experts, True)
    x = jax.random.normal(jax.random.key(5), (g, s, D))
    mask = jnp.ones((g, s), bool).at[1, 6:].set(False)
    route = random_routing(6, 2, num_experts, g, s)
    probe = jax.random.normal(jax.random.key(7), (g, s, D))

    def run(engine, grouped_matmul):
        def loss(x, w):
            y, _ = dispatch.dispatch_combine(x, mask, route, w, engine=engine, capacity=s,
                                             grouped_matmul=grouped_matmul)
            return jnp.sum(y * probe), y
        (_, y), grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))(x, w)
        return y, grads
    y_want, grads_want = run('einsum', 'ragged_dot')  # einsums on buffers, no grouped matmul
    y, grads = run('dropless', backend)
    np.testing.assert_allclose(y, y_want, rtol=1e-5, atol=1e-6)
    for got, want in zip(jax.tree.leaves(grads), jax.tree.leaves(grads_want)):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize('engine', ['einsum', 'sort', 'dropless'])
@pytest.mark.parametrize('activation', ['gelu', 'swiglu'])
def test_dense_mlp_equals_a_one_expert_moe(engine, activation):
    """E=1, k=1, ample capacity: the gate is 1, so the MoE block is its expert's FFN, and with
    the dense MLP's weights it is the dense MLP (same convention on both paths)."""
    cfg = tiny_config(num_experts=1, top_k=1, capacity_factor=2.0, eval_capacity_factor=2.0,
                      dispatch=engine, activation=activation)
    block = MoEBlock(cfg, rngs=nnx.Rngs(params=jax.random.key(0)))
    dense = experts.MLP(cfg.model.d_model, cfg.model.d_ff, activation,
                       rngs=nnx.Rngs(params=jax.random.key(1)))
    block.w_in_EDF[...] = dense.w_in_DF[...][None]
    block.w_out_EFD[...] = dense.w_out_FD[...][None]
    if activation == 'swiglu':
        block.w_gate_EDF[...] = dense.w_gate_DF[...][None]
    x = jax.random.normal(jax.random.key(2), (2, 8, cfg.model.d_model))
    y, stats = jitted(train=False)(block, x, jnp.ones((2, 8), jnp.int32))
    np.testing.assert_allclose(y, jitted()(dense, x), rtol=1e-5, atol=1e-5)
    assert float(stats['dropped_fraction']) == 0.0


def test_backend_choice(monkeypatch):
    assert experts.resolve('auto') == 'blocks'  # the tests run on CPU
    assert experts.resolve('ragged_dot') == 'ragged_dot'
    with pytest.raises(ConfigError, match='moe.grouped_matmul'):
        experts.resolve('magic')
    experts._tokamax.cache_clear()
    monkeypatch.setattr(experts, '_tokamax', lambda: 'ModuleNotFoundError: no tokamax')
    with pytest.raises(ConfigError, match=r"moe.grouped_matmul='tokamax'.*pip install"):
        experts.resolve('tokamax')
    assert experts.resolve('auto') == 'blocks'


def test_config_rejects_tokamax_when_missing(monkeypatch):
    cfg = tiny_config(grouped_matmul='tokamax')
    monkeypatch.setattr(validate.importlib.util, 'find_spec', lambda name: None)
    with pytest.raises(ConfigError, match=r"moe.grouped_matmul='tokamax'.*pip install"):
        validate.check(cfg, 1)
    cfg.moe.grouped_matmul = 'fast'
    with pytest.raises(ConfigError, match='moe.grouped_matmul'):
        validate.check(cfg, 1)


def test_dense_ffn_matches_numpy():
    cfg = tiny_config()
    mlp = experts.MLP(cfg.model.d_model, cfg.model.d_ff, 'swiglu',
                     rngs=nnx.Rngs(params=jax.random.key(0)))
    x = np.random.default_rng(0).normal(size=(1, 3, cfg.model.d_model)).astype(np.float32)
    w_in, w_gate, w_out = (np.asarray(v[...]) for v in (mlp.w_in_DF, mlp.w_gate_DF, mlp.w_out_FD))
    gate = x @ w_gate
    expected = (gate / (1 + np.exp(-gate)) * (x @ w_in)) @ w_out
    np.testing.assert_allclose(jitted()(mlp, jnp.asarray(x)), expected, rtol=1e-4, atol=1e-5)
