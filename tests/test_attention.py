"""Every attention implementation against a NumPy reference, in values and gradients.

Truth is float64 NumPy softmax attention with layers' mask (same non-padding segment, causal)
and GQA, with its gradients written out by hand. Inputs pack several documents per row with
padding (segment 0), at lengths that are not a multiple of the block size.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

from moejax import validate
from moejax.errors import ConfigError
from moejax.model import attention
from moejax.moe import experts
from tests.helpers import run_cli, tiny_config
from tests.layouts import assert_same_training, make_config, one_device, run
from tests.runs import COMMAND, train_records

B, T, H, J, K = 2, 21, 4, 2, 8


def packed_segments(batch: int, length: int) -> np.ndarray:
    """Row 0: three documents then padding; row 1: two documents; the rest one document."""
    seg = np.ones((batch, length), np.int32)
    seg[0, 7:15], seg[0, 15:] = 2, 0
    seg[1, 10:] = 3
    seg[0, 3:7] = 4  # a third document inside row 0
    return seg


def inputs(length=T, seed=0):
    rng = np.random.default_rng(seed)
    q, w = (rng.normal(size=(B, length, H, K)) for _ in range(2))
    k, v = (rng.normal(size=(B, length, J, K)) for _ in range(2))
    return q, k, v, w, packed_segments(B, length)


def reference(q, k, v, w, seg):
    """Outputs and the gradients of sum(out * w) w.r.t. q, k, v, by hand in float64."""
    L = q.shape[1]
    allowed = ((seg[:, :, None] == seg[:, None, :]) & (seg[:, None, :] > 0)
               & np.tril(np.ones((L, L), bool)))
    out, dq = np.zeros_like(q), np.zeros_like(q)
    dk, dv = np.zeros_like(k), np.zeros_like(v)
    for b in range(q.shape[0]):
        for h in range(H):
            g = h // (H // J)
            s = q[b, :, h] @ k[b, :, g].T / np.sqrt(K)
            s = np.where(allowed[b], s, -np.inf)
            row_max = np.max(s, axis=-1, keepdims=True)
            e = np.where(allowed[b], np.exp(s - np.where(np.isfinite(row_max), row_max, 0)), 0)
            total = e.sum(-1, keepdims=True)
            p = e / np.where(total > 0, total, 1)  # rows with no key (padding): all zero
            out[b, :, h] = p @ v[b, :, g]
            do = w[b, :, h]
            dv[b, :, g] += p.T @ do
            dp = do @ v[b, :, g].T
            ds = p * (dp - (dp * p).sum(-1, keepdims=True)) / np.sqrt(K)
            dq[b, :, h] = ds @ k[b, :, g]
            dk[b, :, g] += ds.T @ q[b, :, h]
    return out, (dq, dk, dv)


def run_impl(fn, q, k, v, w, seg):
    """fn's outputs and gradients of sum(out * w), in float32 under jit."""
    f32 = lambda x: jnp.asarray(x, jnp.float32)
    seg = jnp.asarray(seg)
    loss = lambda q, k, v: jnp.sum(fn(q, k, v, seg) * f32(w))
    out = jax.jit(fn)(f32(q), f32(k), f32(v), seg)
    grads = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(f32(q), f32(k), f32(v))
    return out, grads


def assert_matches_reference(fn, length=T):
    q, k, v, w, seg = inputs(length)
    out, grads = run_impl(fn, q, k, v, w, seg)
    want_out, want_grads = reference(q, k, v, w, seg)
    np.testing.assert_allclose(out, want_out, atol=2e-5, rtol=1e-5, err_msg='values')
    for name, got, want in zip('qkv', grads, want_grads):
        np.testing.assert_allclose(got, want, atol=2e-5, rtol=1e-5, err_msg=f'd{name}')


@pytest.mark.parametrize('implementation,block', [('xla', 0), ('chunked', 4), ('chunked', 8),
                                                  ('chunked', 64)])
def test_matches_numpy_reference(implementation, block):
    """Blocks of 4 and 8 leave a ragged tail of T=21; 64 is one block longer than T."""
    assert_matches_reference(lambda q, k, v, seg: attention.attend(
        q, k, v, seg, implementation=implementation, block=block))


def test_splash_in_interpret_mode_matches_reference():
    """The kernel 'flash' runs on TPU (splash attention), interpreted on CPU, through the same
    padding, GQA and zeroing of padding rows as on the accelerator. The GPU kernel (tokamax's
    Triton) runs only compiled: test_targets lowers it for cuda."""
    def fn(q, k, v, seg):
        out = attention.flash_attention(q, k, v, seg, kernel='tpu', interpret=True)
        return out * (seg > 0)[:, :, None, None]
    assert_matches_reference(fn)


def test_the_gpu_kernel_needs_tokamax_and_has_no_interpret_mode(monkeypatch):
    """Without tokamax (Python 3.11, or no [cuda] extra) 'auto' takes xla on GPU and 'flash'
    is a config error; with it, the kernel runs only compiled."""
    q, seg = jnp.zeros((1, 8, 2, 16), jnp.bfloat16), jnp.ones((1, 8), jnp.int32)
    with pytest.raises(ValueError, match='no interpret mode'):
        attention.flash_attention(q, q, q, seg, kernel='gpu', interpret=True)
    assert attention.flash_supported(q, 'gpu') == experts.tokamax_available()
    monkeypatch.setattr(experts, 'tokamax_available', lambda: False)
    assert not attention.flash_supported(q, 'gpu')
    with pytest.raises(ConfigError, match='needs tokamax'):
        attention.flash_attention(q, q, q, seg, kernel='gpu')


def test_splash_in_bfloat16_over_several_blocks():
    """bfloat16 inputs at T=320 (three 128-blocks, a ragged tail), packed documents crossing
    block edges, padding and GQA: the kernel's error against the float64 reference is at most
    that of XLA's path in bfloat16 (twice, plus a bfloat16 ulp of slack), values and gradients."""
    length = 320
    q, k, v, w, _ = inputs(length, seed=1)
    seg = np.ones((B, length), np.int32)
    seg[0, 100:250], seg[0, 250:] = 2, 0
    seg[1, 130:] = 2
    want_out, want_grads = reference(q, k, v, w, seg)
    mask = (seg > 0)[:, :, None, None]
    errors = {}
    for name, fn in (('xla', lambda q, k, v, s: attention.xla_attention(q, k, v, s)),
                     ('flash', lambda q, k, v, s: attention.flash_attention(
                         q, k, v, s, kernel='tpu', interpret=True))):
        bf16 = lambda x: jnp.asarray(x, jnp.bfloat16)
        out_fn = lambda q, k, v: fn(q, k, v, jnp.asarray(seg)) * mask
        loss = lambda q, k, v: jnp.sum(out_fn(q, k, v).astype(jnp.float32) * w)
        out = jax.jit(out_fn)(bf16(q), bf16(k), bf16(v))
        grads = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(bf16(q), bf16(k), bf16(v))
        errors[name] = [float(np.max(np.abs(np.asarray(got, np.float64) - want)))
                        / float(np.max(np.abs(want)))
                        for got, want in zip((out, *grads), (want_out, *want_grads))]
    for part, flash, xla in zip(('out', 'dq', 'dk', 'dv'), errors['flash'], errors['xla']):
        assert flash <= 2 * xla + 2 ** -8, (part, flash, xla)


def test_chunked_never_computes_future_key_blocks():
    """NaN keys/values in the last block poison any block that reads them, even masked
    (0 * NaN = NaN): queries before that block stay exact, in the forward and in dQ, only if
    it is skipped."""
    q, k, v, w, seg = inputs(length=24)
    seg[:] = 1
    k[:, 16:], v[:, 16:] = np.nan, np.nan
    w[:, 16:] = 0
    fn = lambda q, k, v, seg: attention.chunked_attention(q, k, v, seg, block=8)
    out, grads = run_impl(fn, q, k, v, w, seg)
    want_out, want_grads = reference(q[:, :16], k[:, :16], v[:, :16], w[:, :16], seg[:, :16])
    np.testing.assert_allclose(out[:, :16], want_out, atol=2e-5, rtol=1e-5)
    # dQ of the early queries too (dK, dV of early keys legitimately see the NaN rows' outputs).
    np.testing.assert_allclose(grads[0][:, :16], want_grads[0], atol=2e-5, rtol=1e-5)


def test_chunked_memory_is_linear_in_length():
    """Compiled forward+backward at T=2048: temporaries far below one [T, T] float32 score
    matrix per head, while the XLA path holds several."""
    Tl, Hs, Gs, Ks = 2048, 2, 1, 16
    q = jax.ShapeDtypeStruct((1, Tl, Hs, Ks), jnp.float32)
    kv = jax.ShapeDtypeStruct((1, Tl, Gs, Ks), jnp.float32)
    seg = jax.ShapeDtypeStruct((1, Tl), jnp.int32)

    def temp_bytes(implementation):
        loss = lambda q, k, v, s: jnp.sum(attention.attend(
            q, k, v, s, implementation=implementation, block=128))
        grad = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))
        return grad.lower(q, kv, kv, seg).compile().memory_analysis().temp_size_in_bytes

    scores = Tl * Tl * 4 * Hs
    assert temp_bytes('chunked') < scores / 8
    assert temp_bytes('xla') > scores


def test_auto_and_errors():
    """auto on CPU: chunked from CPU_CHUNKED_FROM tokens and two blocks, else xla; flash
    needs a GPU or TPU kernel."""
    short = jnp.zeros((1, 16, 2, 8))
    long = jnp.zeros((1, attention.CPU_CHUNKED_FROM, 2, 8))
    assert attention.resolve('auto', short) == 'xla'
    assert attention.resolve('auto', long, block=attention.CPU_CHUNKED_FROM // 2) == 'chunked'
    assert attention.resolve('auto', long, block=attention.CPU_CHUNKED_FROM) == 'xla'
    assert attention.resolve('chunked', short) == 'chunked'
    seg = jnp.ones((1, 16), jnp.int32)
    with pytest.raises(ConfigError, match='model.attention'):
        attention.attend(short, short, short, seg, implementation='flash')


@pytest.mark.parametrize('key,value', [('attention', 'fast'), ('attention_block', 0)])
def test_bad_attention_config_names_the_key(key, value):
    cfg = tiny_config()
    cfg.model[key] = value
    with pytest.raises(ConfigError, match=f'model.{key}'):
        validate.check(cfg, 1)


def test_flash_under_mesh_runs_per_shard():
    """On an 8-device mesh (batch over data x fsdp, heads over tensor) the kernel runs in
    shard_map on each device's rows and heads, and equals the reference."""
    mesh = jax.make_mesh((2, 2, 1, 2), ('data', 'fsdp', 'expert', 'tensor'),
                         axis_types=(AxisType.Auto,) * 4)
    q, k, v, w, _ = inputs()
    q, k, v, w = (np.concatenate([x, x]) for x in (q, k, v, w))  # batch 4: splits over 2x2
    seg = np.concatenate([packed_segments(B, T)] * 2)
    fn = lambda q, k, v, seg: attention.flash_attention(q, k, v, seg, kernel='tpu',
                                                        interpret=True) * (seg > 0)[..., None, None]
    with jax.set_mesh(mesh):
        assert 'shard_map' in str(jax.make_jaxpr(fn)(q, k, v, seg))
        out = jax.jit(fn)(*(jax.device_put(jnp.asarray(x, jnp.float32),
                                           NamedSharding(mesh, P(('data', 'fsdp'), None,
                                                                 'tensor')))
                            for x in (q, k, v)), jnp.asarray(seg))
    want, _ = reference(q, k, v, w, seg)
    np.testing.assert_allclose(out, want, atol=2e-5, rtol=1e-5)


def test_chunked_model_under_mesh_matches_one_device():
    """The tiny MoE model on data x expert x tensor with chunked attention (blocks of 8, heads
    split over tensor) trains like one device with XLA attention."""
    cfg = make_config({'data': 2, 'expert': 2, 'tensor': 2})
    cfg.model.update(attention='chunked', attention_block=8)
    history, *_ = run(cfg)
    assert_same_training(history, one_device())


@pytest.mark.slow
def test_cli_chunked_logs_the_same_losses_as_xla(trained_tiny_run, data_dir, tmp_path):
    """The attention keys reach the model from the command line: blocks of 16 over rows of 32
    tokens (two query blocks, the second reading two key blocks) log the losses of
    trained_tiny_run (XLA attention, the same command otherwise). More blocks and a ragged
    last one are checked in process (test_matches_numpy_reference)."""
    workdir = str(tmp_path / 'chunked')
    result = run_cli('train', *COMMAND, f'--workdir={workdir}',
                     '--config.model.attention=chunked', '--config.model.attention_block=16',
                     f'--config.data.data_dir={data_dir}')
    assert result.returncode == 0, result.stderr[-3000:]
    chunked, xla = ([r['loss'] for r in train_records(run)] for run in (workdir, trained_tiny_run))
    assert len(chunked) == 10
    np.testing.assert_allclose(chunked, xla, rtol=1e-5)
