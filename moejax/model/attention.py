"""Causal, segment-aware attention behind one function, `attend`, with four implementations.

  xla      jax.nn.dot_product_attention with an explicit [B,1,T,T] mask: XLA materialises the
           scores (O(T^2) memory); the fastest on CPU for short sequences.
  chunked  blockwise attention in plain JAX with a flash-style custom VJP: online softmax over
           key blocks, key blocks wholly in a query block's future are never computed, and
           both passes hold O(T * block) temporaries (runs everywhere; plans real-scale memory).
  flash    a fused kernel honouring segment ids: tokamax's Pallas Triton kernel on GPU, splash
           on TPU; under a mesh it runs per shard (shard_map over batch and heads).
  auto     flash where the accelerator kernel supports the dtype and head dim, else xla;
           on CPU chunked from CPU_CHUNKED_FROM tokens and two blocks, xla below.
All share layers' semantics: a query attends to keys of its own non-padding segment at or
before its position; each of the J key/value heads serves H / J query heads (GQA); softmax in
float32. Shapes: B batch, T tokens, H query heads, J key/value heads, K head dim.
Rows of padding (segment 0) attend to nothing and come out as zeros.
"""
import functools
import math

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from moejax import sharding, target
from moejax.errors import ConfigError
from moejax.moe import experts

IMPLEMENTATIONS = ('auto', 'xla', 'chunked', 'flash')
# auto on CPU: chunked from this many tokens, if they make two blocks or more. Measured by
# benchmarks/attention.py (forward+backward, 2-core CPU, blocks of 128): chunked/xla time is
# ~1.0 at T=128 (one block), ~0.7 at 256, ~0.3 at 512, ~0.15-0.3 at 1024.
CPU_CHUNKED_FROM = 256
DEFAULT_BLOCK = 128  # the fastest of 64..1024 on CPU at T=256..2048 (tiles stay in cache)


def attention_mask(segment_ids_BT, causal: bool = True):
    """[B, 1, T, T] mask: same (non-padding) segment and, if causal, not the future."""
    seg = segment_ids_BT
    mask = (seg[:, :, None] == seg[:, None, :]) & (seg[:, None, :] > 0)
    if causal:
        t = seg.shape[1]
        mask &= jnp.tril(jnp.ones((t, t), bool))
    return mask[:, None]


def attend(q_BTHK, k_BTJK, v_BTJK, segment_ids_BT, *, implementation: str = 'auto',
           block: int = DEFAULT_BLOCK):
    """Causal self-attention within segments: [B, T, H, K] from queries [B, T, H, K] and
    keys/values [B, T, J, K] (H a multiple of J); rotary is already applied."""
    impl = resolve(implementation, q_BTHK, block)
    if impl == 'xla':
        out = xla_attention(q_BTHK, k_BTJK, v_BTJK, segment_ids_BT)
    elif impl == 'chunked':
        out = chunked_attention(q_BTHK, k_BTJK, v_BTJK, segment_ids_BT, block=block)
    elif impl == 'flash':
        out = flash_attention(q_BTHK, k_BTJK, v_BTJK, segment_ids_BT)
    else:
        raise ConfigError('model.attention', implementation,
                          'allowed: ' + ', '.join(IMPLEMENTATIONS))
    return out * (segment_ids_BT > 0)[:, :, None, None].astype(out.dtype)


def resolve(implementation: str, q_BTHK, block: int = DEFAULT_BLOCK) -> str:
    """The implementation `auto` stands for on the target platform (moejax.target) and these
    shapes; where the kernel cannot take them, one line says so (once per shape)."""
    if implementation != 'auto':
        return implementation
    backend = target.platform()
    if backend in ('gpu', 'tpu'):
        if flash_supported(q_BTHK, backend):
            return 'flash'
        _say_fallback(backend, f'{q_BTHK.dtype.name}{list(q_BTHK.shape)}')
        return 'xla'
    T = q_BTHK.shape[1]
    return 'chunked' if T >= max(CPU_CHUNKED_FROM, 2 * block) else 'xla'


@functools.cache
def _say_fallback(backend: str, shape_dtype) -> None:
    print(f'moejax: attention on {backend}: no fused kernel for queries {shape_dtype}; '
          "using 'xla'", flush=True)


def flash_supported(q_BTHK, backend: str) -> bool:
    """Whether the fused kernel runs these inputs exactly as the XLA path would.

    GPU (where tokamax imports): Triton computes float32 dots in TF32, so only 16-bit
    inputs qualify; head dims up to 256 fit the kernel's on-chip tiles. TPU: splash
    attention's lanes want head_dim % 128 == 0.
    """
    head_dim, dtype = q_BTHK.shape[-1], q_BTHK.dtype
    if backend == 'gpu':
        return (dtype in (jnp.bfloat16, jnp.float16) and head_dim <= 256
                and experts.tokamax_available())
    if backend == 'tpu':
        return dtype in (jnp.bfloat16, jnp.float32) and head_dim % 128 == 0
    return False


def xla_attention(q_BTHK, k_BTJK, v_BTJK, segment_ids_BT):
    """XLA's attention with the full mask (scores materialised)."""
    return jax.nn.dot_product_attention(q_BTHK, k_BTJK, v_BTJK,
                                        mask=attention_mask(segment_ids_BT))


# ------------------------------------------------------------------------------ chunked

def chunked_attention(q_BTHK, k_BTJK, v_BTJK, segment_ids_BT, *,
                      block: int = DEFAULT_BLOCK):
    """Blockwise attention with O(T * block) memory in the forward and backward passes.

    T is padded to whole blocks with segment 0 (masked as keys, dropped as queries). Blocks are
    laid out block-major ([N, B, b, ...]) so loops index them with a leading dynamic index.
    """
    B, T, H, K = q_BTHK.shape
    J = k_BTJK.shape[2]
    b = min(block, T)
    n = -(-T // b)
    pad = lambda x: jnp.pad(x, [(0, 0), (0, n * b - T)] + [(0, 0)] * (x.ndim - 2))
    blocks = lambda x: jnp.moveaxis(pad(x).reshape(B, n, b, *x.shape[2:]), 1, 0)
    q_NBbJRK = blocks(q_BTHK.reshape(B, T, J, H // J, K))
    out_NBbJRK = _blockwise(q_NBbJRK, blocks(k_BTJK), blocks(v_BTJK), blocks(segment_ids_BT))
    return jnp.moveaxis(out_NBbJRK, 0, 1).reshape(B, n * b, H, K)[:, :T]


def _scores(q_BbGRK, k_BbJK, qseg_Bb, kseg_Bb, i, j):
    """Scaled float32 scores of query block i against key block j [B,J,R,q,s], and the mask
    [B,1,1,q,s] of allowed pairs (same non-padding segment, key not in the future)."""
    b, K = q_BbGRK.shape[1], q_BbGRK.shape[-1]
    s = jnp.einsum('bqgrk,bsgk->bgrqs', q_BbGRK, k_BbJK,
                   preferred_element_type=jnp.float32) * (1.0 / math.sqrt(K))
    ok = (qseg_Bb[:, :, None] == kseg_Bb[:, None, :]) & (kseg_Bb[:, None, :] > 0)
    offsets = jnp.arange(b)
    ok &= (i * b + offsets)[:, None] >= (j * b + offsets)[None, :]
    return s, ok[:, None, None]


@jax.custom_vjp
def _blockwise(q_NBbJRK, k_NBbJK, v_NBbJK, seg_NBb):
    return _blockwise_fwd(q_NBbJRK, k_NBbJK, v_NBbJK, seg_NBb)[0]


def _blockwise_fwd(q_NBbJRK, k_NBbJK, v_NBbJK, seg_NBb):
    """Per query block i, an online softmax over key blocks 0..i (the causal ones only)."""
    n, B, b, J, R, K = q_NBbJRK.shape

    def query_block(i):
        q, qseg = q_NBbJRK[i], seg_NBb[i]

        def key_block(j, carry):
            m_BGRq, l_BGRq, acc_BGRqK = carry
            s, ok = _scores(q, k_NBbJK[j], qseg, seg_NBb[j], i, j)
            s = jnp.where(ok, s, -jnp.inf)
            m_new = jnp.maximum(m_BGRq, s.max(-1))
            base = jnp.where(jnp.isfinite(m_new), m_new, 0.0)  # rows with nothing allowed yet
            p = jnp.exp(s - base[..., None])
            rescale = jnp.exp(m_BGRq - base)
            pv = jnp.einsum('bgrqs,bsgk->bgrqk', p.astype(v_NBbJK.dtype), v_NBbJK[j],
                            preferred_element_type=jnp.float32)
            return m_new, l_BGRq * rescale + p.sum(-1), acc_BGRqK * rescale[..., None] + pv

        init = (jnp.full((B, J, R, b), -jnp.inf), jnp.zeros((B, J, R, b)),
                jnp.zeros((B, J, R, b, K)))
        m, l, acc = jax.lax.fori_loop(0, i + 1, key_block, init)
        out_BGRqK = acc / jnp.where(l > 0, l, 1.0)[..., None]
        # +inf for rows that attend to nothing: exp(s - lse) = 0 in the backward pass.
        lse_BGRq = jnp.where(l > 0, m + jnp.log(jnp.where(l > 0, l, 1.0)), jnp.inf)
        return jnp.einsum('bgrqk->bqgrk', out_BGRqK).astype(q.dtype), lse_BGRq

    out, lse = jax.lax.map(query_block, jnp.arange(n))
    return out, (q_NBbJRK, k_NBbJK, v_NBbJK, seg_NBb, out, lse)


def _blockwise_bwd(res, dout_N):
    """Per key block j, recompute the probabilities of query blocks j..n-1 and accumulate
    dK_j, dV_j in the loop carry and dQ into one [N, ...] buffer (FlashAttention-2's VJP)."""
    q_N, k_N, v_N, seg_N, out_N, lse_N = res
    n, B, b, J, R, K = q_N.shape
    scale = 1.0 / math.sqrt(K)
    dt = q_N.dtype
    delta_NBGRq = jnp.einsum('nbqgrk,nbqgrk->nbgrq', dout_N.astype(jnp.float32),
                             out_N.astype(jnp.float32))

    def key_block(dq_N, j):
        k, v, kseg = k_N[j], v_N[j], seg_N[j]

        def query_block(i, carry):
            dk, dv, dq_N = carry
            q, do = q_N[i], dout_N[i]
            s, ok = _scores(q, k, seg_N[i], kseg, i, j)
            p = jnp.where(ok, jnp.exp(s - lse_N[i][..., None]), 0.0)
            dv += jnp.einsum('bgrqs,bqgrk->bsgk', p.astype(dt), do,
                             preferred_element_type=jnp.float32)
            dp = jnp.einsum('bqgrk,bsgk->bgrqs', do, v, preferred_element_type=jnp.float32)
            ds = (p * (dp - delta_NBGRq[i][..., None]) * scale).astype(dt)
            dk += jnp.einsum('bgrqs,bqgrk->bsgk', ds, q, preferred_element_type=jnp.float32)
            dq_i = jnp.einsum('bgrqs,bsgk->bqgrk', ds, k, preferred_element_type=jnp.float32)
            return dk, dv, dq_N.at[i].add(dq_i)

        zeros = jnp.zeros((B, b, J, K), jnp.float32)
        dk, dv, dq_N = jax.lax.fori_loop(j, n, query_block, (zeros, zeros, dq_N))
        return dq_N, (dk.astype(k_N.dtype), dv.astype(v_N.dtype))

    dq_N, (dk_N, dv_N) = jax.lax.scan(key_block, jnp.zeros(q_N.shape, jnp.float32),
                                      jnp.arange(n))
    return dq_N.astype(dt), dk_N, dv_N, None


_blockwise.defvjp(_blockwise_fwd, _blockwise_bwd)


# ------------------------------------------------------------------------------ flash

def flash_attention(q_BTHK, k_BTJK, v_BTJK, segment_ids_BT, *, kernel: str | None = None,
                    interpret: bool = False):
    """The fused kernel of this backend ('gpu': tokamax's Pallas Triton, 'tpu': splash).

    `interpret=True` runs splash in interpret mode (on any backend; used by tests). tokamax
    runs its Triton kernel only compiled, so the GPU kernel is checked where a GPU is lent
    (benchmarks/accelerator.py) and lowered for cuda by the planner's tests.
    """
    kernel = kernel or target.platform()
    if kernel not in ('gpu', 'tpu'):
        raise ConfigError('model.attention', 'flash',
                          f'needs a GPU or TPU (backend is {kernel}); use auto, xla or chunked')
    if kernel == 'gpu' and not experts.tokamax_available():
        raise ConfigError('model.attention', 'flash', 'needs tokamax on GPU (pip install '
                          '"moejax[cuda]", Python >= 3.12); use auto, xla or chunked')
    if kernel == 'gpu' and interpret:
        raise ValueError("tokamax's GPU flash attention has no interpret mode")
    fn = _tokamax_gpu if kernel == 'gpu' else functools.partial(_splash_tpu, interpret=interpret)
    return _per_shard(fn, q_BTHK, k_BTJK, v_BTJK, segment_ids_BT)


def _per_shard(fn, q_BTHK, k_BTJK, v_BTJK, segment_ids_BT):
    """fn on each device's rows and heads: Pallas kernels cannot be partitioned by GSPMD.

    Batch over the rules' 'batch' axes and heads over 'act_heads' axes, each where it divides
    (query heads and K/V heads split alike keep every group on one device).
    """
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or mesh.size == 1 or mesh.manual_axes:
        return fn(q_BTHK, k_BTJK, v_BTJK, segment_ids_BT)
    B, _, H, _ = q_BTHK.shape
    J = k_BTJK.shape[2]
    batch = _dividing_axes(mesh, 'batch', B)
    heads = _dividing_axes(mesh, 'act_heads', math.gcd(H, J))
    spec_x = P(batch, None, heads, None)
    spec_seg = P(batch, None)
    return jax.shard_map(fn, mesh=mesh, in_specs=(spec_x, spec_x, spec_x, spec_seg),
                         out_specs=spec_x, check_vma=False)(q_BTHK, k_BTJK, v_BTJK,
                                                            segment_ids_BT)


def _dividing_axes(mesh, logical: str, size: int):
    """The mesh axes (> 1, in the mesh) the rules map `logical` to, if they divide `size`."""
    entry = sharding.logical_to_spec((logical,))[0]
    entry = () if entry is None else (entry,) if isinstance(entry, str) else tuple(entry)
    axes = tuple(a for a in entry if dict(mesh.shape).get(a, 1) > 1)
    if not axes or size % math.prod(mesh.shape[a] for a in axes):
        return None
    return axes


def _pad_to(x, multiple: int, axis: int = 1):
    extra = -x.shape[axis] % multiple
    return jnp.pad(x, [(0, extra if a == axis else 0) for a in range(x.ndim)])


def _tokamax_gpu(q_BTHK, k_BTJK, v_BTJK, segment_ids_BT):
    """tokamax's Pallas Triton flash attention (GQA, causal, a VJP of its own), which replaced
    jax.experimental.pallas.ops.gpu (removed in jax 0.12.1).

    The packed documents reach it as a boolean mask; a padding query attends to the padding
    keys before it (never a fully masked row), and its output is zeroed. The planner lowers it
    from a CPU host under tokamax's cross-compile switch (moejax.plan.targets.tracing_for).
    """
    import tokamax  # noqa: PLC0415 - imported where a GPU step is traced
    seg = segment_ids_BT
    same_segment_B1TT = (seg[:, :, None] == seg[:, None, :])[:, None]
    out = tokamax.dot_product_attention(q_BTHK, k_BTJK, v_BTJK, mask=same_segment_B1TT,
                                        is_causal=True,  # the kernel skips future key blocks
                                        scale=1.0 / math.sqrt(q_BTHK.shape[-1]),
                                        implementation='triton')
    return out * (seg > 0)[:, :, None, None].astype(out.dtype)


def _splash_tpu(q_BTHK, k_BTJK, v_BTJK, segment_ids_BT, *, interpret: bool):
    """jax.experimental.pallas.ops.tpu.splash_attention (segment ids, causal mask, GQA).

    Splash takes [heads, T, K] per example (vmapped over the batch) and unscaled logits, so
    queries are pre-scaled; T is padded to whole 128-blocks with segment 0.
    """
    from jax.experimental.pallas.ops.tpu import splash_attention as splash
    T, H, K = q_BTHK.shape[1:]
    block = 128
    Tp = T + (-T % block)
    mask = splash.MultiHeadMask([splash.CausalMask((Tp, Tp)) for _ in range(H)])
    sizes = splash.BlockSizes(block_q=block, block_kv=block, block_kv_compute=block,
                              block_q_dkv=block, block_kv_dkv=block,
                              block_kv_dkv_compute=block, block_q_dq=block, block_kv_dq=block)
    kernel = splash.make_splash_mha(mask, head_shards=1, q_seq_shards=1, block_sizes=sizes,
                                    interpret=interpret)
    heads_first = lambda x: jnp.swapaxes(_pad_to(x, block), 1, 2)
    # Splash takes no scale: scaled in float32, then rounded once to the queries' dtype.
    q = heads_first((q_BTHK.astype(jnp.float32) / math.sqrt(K)).astype(q_BTHK.dtype))
    seg = _pad_to(segment_ids_BT, block)
    one = lambda q, k, v, s: kernel(q, k, v, segment_ids=splash.SegmentIds(q=s, kv=s))
    out_BHTK = jax.vmap(one)(q, heads_first(k_BTJK), heads_first(v_BTJK), seg)
    return jnp.swapaxes(out_BHTK, 1, 2)[:, :T]
