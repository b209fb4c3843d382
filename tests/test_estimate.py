"""The step-time estimate's counts (moejax/plan/estimate.py) from optimized HLO, against matmul
FLOPs counted by hand."""
import jax
import jax.numpy as jnp

from moejax.plan import estimate


def test_hlo_costs_count_loop_bodies_by_their_trips():
    """A scan of 8 matmuls [128,256]@[256,256], differentiated: 3 matmuls a step (forward,
    and two in the backward) = 24 x 2*128*256*256 FLOPs; cost_analysis counts one step."""
    def f(x_MK, w_LKK):
        return jax.lax.scan(lambda c, w: (jnp.tanh(c @ w), None), x_MK, w_LKK)[0].sum()
    compiled = jax.jit(jax.grad(f, argnums=1)).lower(
        jnp.ones((128, 256)), jnp.ones((8, 256, 256))).compile()
    costs = estimate.hlo_costs(compiled.as_text())
    assert costs['dot_flops'] == 24 * 2 * 128 * 256 * 256
    assert costs['dot_flops_once'] == 3 * 2 * 128 * 256 * 256
    assert costs['collective_bytes'] == 0
