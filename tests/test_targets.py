"""Plans for an accelerator this host lacks (moejax.plan.targets, moejax.target), from the CPU.

The step is lowered for an abstract device of each target (the CI machine has neither libtpu
nor the CUDA plugin), so what is checked is the program's text: the choices follow the target
(Triton flash attention on GPU; splash attention and tokamax's Mosaic grouped matmul on TPU;
the ragged exchange on both), never the CPU host. The kernels' numerics are checked in
interpret mode against XLA's paths.
"""
import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AbstractDevice, AbstractMesh, use_abstract_mesh

from configs import default
from moejax import target
from moejax.errors import ConfigError
from moejax.plan import dry_run, targets


def bf16_moe(**model):
    """The default recipe in bfloat16, experts over 8 devices (dropless: the ragged exchange)."""
    cfg = default.get_config()
    cfg.model.update(dtype='bfloat16', num_layers=1, **model)
    cfg.mesh.update(data=1, expert=8)
    return cfg


def test_a_gpu_plan_lowers_the_triton_kernel_and_the_ragged_exchange(capsys):
    result = dry_run.plan(bf16_moe(), 'gpu-h100', 8)
    assert result['built'].startswith('lowered only') and 'moejax[cuda]' in result['built']
    assert result['kernels'] == ['Pallas Triton (flash attention)',
                                 'ragged all-to-all (expert exchange)']
    assert result['temp_bytes_per_device'] is None and result['fits'] is None
    # the grouped matmul fell back, and said so (tokamax's GPU kernel needs a compile-only GPU)
    assert "tokamax's mosaic_gpu kernel cannot take" in capsys.readouterr().out


def test_a_tpu_plan_lowers_splash_and_tokamaxs_grouped_matmul():
    """head_dim 128 (splash's lanes) and expert dims >= 128 (tokamax's TPU kernel)."""
    cfg = bf16_moe(d_model=256, num_heads=2, d_ff=256)
    result = dry_run.plan(cfg, 'tpu-v5p', 8)
    assert 'Pallas Mosaic TPU (splash attention, grouped matmul)' in result['kernels']
    assert 'ragged all-to-all (expert exchange)' in result['kernels']
    assert result['device_memory_bytes'] == 95e9


def test_a_kernel_that_cannot_take_the_shape_falls_back_in_one_line(capsys):
    dry_run.plan(bf16_moe(), 'tpu-v5p', 8)  # head_dim 16, expert dims 64: both too small
    out = capsys.readouterr().out
    assert "attention on tpu: no fused kernel for queries bfloat16[32, 128, 4, 16]; using 'xla'" \
        in out
    assert "tokamax's mosaic_tpu kernel cannot take bfloat16[640, 64] x [1, 64, 256] (its TPU " \
        "kernel takes dims >= 128); using XLA's ragged_dot" in out


def test_choices_follow_the_traced_mesh_not_the_host():
    assert target.platform() == 'cpu'
    for kind, platform in (('NVIDIA H100 80GB HBM3', 'gpu'), ('TPU v5', 'tpu')):
        mesh = AbstractMesh((1,), ('data',), abstract_device=AbstractDevice(kind, 1, platform))
        with use_abstract_mesh(mesh):
            assert target.platform() == platform
            assert target.current_chip().platform == platform
    assert target.chip_of('TPU v5 lite').name == 'tpu-v5e'  # the longest prefix wins
    assert target.chip_of('cpu') is None


@pytest.mark.parametrize('family,count,want', [
    ('v5p', 4, ('v5p:1x2x2', 1)), ('v5p', 64, ('v5p:4x4x4', 1)), ('v5p', 128, ('v5p:4x4x8', 1)),
    ('v6e', 8, ('v6e:2x4', 1)), ('v6e', 256, ('v6e:16x16', 1)), ('v6e', 512, ('v6e:16x16', 2))])
def test_tpu_topologies(family, count, want):
    assert targets.tpu_topology(family, count) == want


def test_unknown_targets_and_counts_are_config_errors():
    with pytest.raises(ConfigError, match='--target.*known: gpu-a100'):
        targets.chip('gpu-h300')
    with pytest.raises(ConfigError, match='--devices'):
        targets.tpu_topology('v5p', 6)


def test_the_gpu_description_names_the_chip():
    text = targets.gpu_target_config('gpu-b200')
    assert 'core_count: 148' in text and 'major: 10' in text and 'NVIDIA B200' in text


# ---- the kernels' numerics, interpreted on the CPU ----------------------------------------------

def test_tokamax_tpu_grouped_matmul_interpreted_matches_xla():
    """tokamax's Mosaic TPU ragged_dot (Megablox-style) in interpret mode against
    jax.lax.ragged_dot: values and both gradients, an empty group, rows past the groups."""
    tokamax = pytest.importorskip('tokamax')
    from tokamax.ops import tpu as tokamax_tpu
    M, K, N = 512, 256, 256
    keys = jax.random.split(jax.random.key(0), 3)
    lhs = jax.random.normal(keys[0], (M, K), jnp.float32)
    rhs = jax.random.normal(keys[1], (4, K, N), jnp.float32)
    dout = jax.random.normal(keys[2], (M, N), jnp.float32)
    sizes = jnp.array([200, 0, 184, 64], jnp.int32)  # an empty group; 64 rows past the groups

    def grads(fn):
        out, vjp = jax.vjp(lambda a, b: fn(a, b, sizes), lhs, rhs)
        return (out,) + vjp(dout)
    want = grads(lambda a, b, g: jax.lax.ragged_dot(a, b, g, precision='highest'))
    kernel = tokamax_tpu.RaggedDot(interpret=True, config=tokamax_tpu.RaggedDotConfig(
        tile_m=128, tile_k=128, tile_n=128))
    tpu = AbstractMesh((), (), abstract_device=AbstractDevice('TPU v5', 1, 'tpu'))
    logging.getLogger('absl').setLevel(logging.ERROR)
    with tokamax.config.cross_compile(True), use_abstract_mesh(tpu):
        got = jax.jit(lambda: grads(lambda a, b, g: tokamax.ragged_dot(
            a, b, g, precision='highest', implementation=(kernel,))))()
    rows = int(jnp.sum(sizes))  # the kernel leaves rows past the groups unspecified, both ways
    for name, g, w in (('out', got[0][:rows], want[0][:rows]), ('dlhs', got[1][:rows],
                                                                want[1][:rows]),
                       ('drhs', got[2], want[2])):
        np.testing.assert_allclose(g, w, rtol=2e-5, atol=2e-4 * float(jnp.max(jnp.abs(w))),
                                   err_msg=name)
