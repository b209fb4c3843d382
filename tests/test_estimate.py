"""The step-time estimate's counts (moejax/plan/estimate.py) from optimized HLO, against matmul
FLOPs counted by hand."""
import os

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


def test_hlo_costs_count_convolutions_as_the_tpu_writes_matmuls():
    """A 3x3 convolution, 3 -> 4 channels, on 2 images of 8x8 (VALID): each of the 2*4*6*6
    outputs sums 3*3*3 products."""
    conv = lambda x, w: jax.lax.conv_general_dilated(x, w, (1, 1), 'VALID')
    compiled = jax.jit(conv).lower(jnp.ones((2, 3, 8, 8)), jnp.ones((4, 3, 3, 3))).compile()
    assert 'convolution(' in compiled.as_text()
    assert estimate.hlo_costs(compiled.as_text())['dot_flops'] == 2 * (2 * 4 * 6 * 6) * 27


def test_hlo_costs_read_the_tpu_loops_bounds():
    """The same scan compiled for a TPU v5p slice (libtpu, saved by the command below): its
    loops carry no known_trip_count and its matmuls are convolutions; 24 matmuls counted.
    venv-tpu/bin/python: jax.jit(jax.grad(f, argnums=1)).trace(...).lower().compile().as_text()
    with f and shapes as in the CPU test above, devices from topologies 'v5p:2x2x1'."""
    text = open(os.path.join(os.path.dirname(__file__), 'fixtures', 'tpu_scan_grad.hlo')).read()
    assert 'known_trip_count' not in text and 'convolution(' in text
    costs = estimate.hlo_costs(text)
    assert costs['dot_flops'] == 24 * 2 * 128 * 256 * 256
    assert costs['dot_flops_once'] == 3 * 2 * 128 * 256 * 256


def test_hlo_costs_count_cublas_matmuls():
    """XLA:GPU writes large matmuls as cuBLAS custom calls (as in Mixtral's step compiled for
    H100s): a [4096, 512] x [512, 1024] product, its result first in a (result, workspace)
    tuple, is 2 * 4096 * 512 * 1024 FLOPs."""
    text = """HloModule m

ENTRY %main.1 (p0: bf16[4096,512], p1: bf16[512,1024]) -> bf16[4096,1024] {
  %p0 = bf16[4096,512]{1,0} parameter(0)
  %p1 = bf16[512,1024]{1,0} parameter(1)
  %mm = (bf16[4096,1024]{1,0}, s8[33554432]{0}) custom-call(%p0, %p1), custom_call_target="__cublas$lt$matmul", backend_config={"gemm_backend_config":{"dot_dimension_numbers":{"lhs_contracting_dimensions":["1"],"rhs_contracting_dimensions":["0"],"lhs_batch_dimensions":[],"rhs_batch_dimensions":[]}}}
  ROOT %r = bf16[4096,1024]{1,0} get-tuple-element(%mm), index=0
}
"""
    assert estimate.hlo_costs(text)['dot_flops'] == 2 * 4096 * 512 * 1024
