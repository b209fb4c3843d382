"""Transformer building blocks: RMSNorm, embeddings, rotary causal attention.

Parameters are float32 and carry logical axis names (see sharding.py); matmuls run in the
model dtype. Attention is segment-aware: packed documents never attend to each other, and
rotary positions restart with each document.
"""
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from moejax import sharding
from moejax.model import attention
from moejax.sharding import param


class RMSNorm(nnx.Module):
    def __init__(self, dim: int, eps: float = 1e-6):
        self.scale = nnx.Param(jnp.ones((dim,), jnp.float32), out_sharding=('norm',))
        self.eps = eps

    def __call__(self, x_BTD):
        x = x_BTD.astype(jnp.float32)
        x = x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + self.eps)
        return (x * self.scale[...]).astype(x_BTD.dtype)


class Embed(nnx.Module):
    def __init__(self, vocab: int, dim: int, *, rngs: nnx.Rngs):
        self.table_VD = param(rngs, (vocab, dim), ('vocab', 'embed'), fan_in=1)

    def __call__(self, ids_BT, dtype):
        # The table whole along D (gathered over fsdp, as FSDP gathers any weight it uses): the
        # lookup's gradient, a scatter-add of the batch-sharded dx_BTD, then stays on each
        # device's rows and is reduce-scattered into the table's layout. With D split,
        # GSPMD could only reshard dx_BTD by replicating it whole ("involuntary full
        # rematerialization": [B, T, D] on every device, 4.3 GB for Mixtral's batch).
        table_VD = sharding.constrain(self.table_VD[...], ('vocab', None))
        x_BTD = jnp.take(table_VD, ids_BT, axis=0).astype(dtype)
        return sharding.constrain(x_BTD, ('batch', 'length', 'act_embed'))


def rotary(x_BTHK, positions_BT, base: float):
    """Rotate channel pairs by position-dependent angles (RoFormer), in float32."""
    half = x_BTHK.shape[-1] // 2
    freq_K = base ** (-jnp.arange(half, dtype=jnp.float32) / half)
    return rotary_by_freq(x_BTHK, positions_BT, freq_K)


def rotary_by_freq(x_BTHK, positions_BT, freq_K, scale: float = 1.0):
    """`rotary` with given angular frequencies per channel pair (YaRN rescales them) and cos/sin
    multiplied by `scale` (YaRN's attention factor); pairs are (k, k + K/2), as in HF's Llama."""
    angle_BTK = positions_BT[..., None].astype(jnp.float32) * freq_K
    sin, cos = jnp.sin(angle_BTK)[:, :, None], jnp.cos(angle_BTK)[:, :, None]
    if scale != 1.0:
        sin, cos = sin * scale, cos * scale
    x1, x2 = jnp.split(x_BTHK.astype(jnp.float32), 2, axis=-1)
    out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return out.astype(x_BTHK.dtype)


class KVCache(NamedTuple):
    """Keys and values of one attention layer for cached decoding: [B, S (max length), KV, K]."""
    k_BSHK: jax.Array
    v_BSHK: jax.Array


class Attention(nnx.Module):
    """Multi-head causal self-attention with rotary positions and grouped-query K/V.

    Options of the Hugging Face families: head_dim != d_model / num_heads (Qwen3), biases on the
    q/k/v projections (Qwen2), and an RMSNorm over each head's q and k before rotary (Qwen3's QK-norm).
    """

    def __init__(self, d_model: int, num_heads: int, num_kv_heads: int, rope_base: float,
                 *, implementation: str = 'auto', block: int = attention.DEFAULT_BLOCK,
                 head_dim: int = 0, qkv_bias: bool = False, qk_norm: bool = False,
                 norm_eps: float = 1e-6, rngs: nnx.Rngs):
        self.head_dim = head_dim or d_model // num_heads
        self.rope_base = rope_base
        self.implementation = implementation  # model.attention (see moejax/model/attention.py)
        self.block = block  # model.attention_block: keys/queries per block of 'chunked'
        k = self.head_dim
        self.wq_DHK = param(rngs, (d_model, num_heads, k), ('embed', 'heads', 'head_dim'), d_model)
        self.wk_DHK = param(rngs, (d_model, num_kv_heads, k), ('embed', 'kv_heads', 'head_dim'),
                            d_model)
        self.wv_DHK = param(rngs, (d_model, num_kv_heads, k), ('embed', 'kv_heads', 'head_dim'),
                            d_model)
        self.wo_HKD = param(rngs, (num_heads, k, d_model), ('heads', 'head_dim', 'embed'),
                            num_heads * k)
        zeros = lambda heads, axis: nnx.Param(jnp.zeros((heads, k), jnp.float32),
                                              out_sharding=(axis, 'head_dim'))
        self.bq_HK = zeros(num_heads, 'heads') if qkv_bias else None
        self.bk_HK = zeros(num_kv_heads, 'kv_heads') if qkv_bias else None
        self.bv_HK = zeros(num_kv_heads, 'kv_heads') if qkv_bias else None
        self.q_norm = RMSNorm(k, norm_eps) if qk_norm else None
        self.k_norm = RMSNorm(k, norm_eps) if qk_norm else None

    def project_qkv(self, x_BTD, positions_BT):
        dt = x_BTD.dtype

        def project(w_DHK, b_HK):
            y_BTHK = jnp.einsum('btd,dhk->bthk', x_BTD, w_DHK[...].astype(dt))
            return y_BTHK if b_HK is None else y_BTHK + b_HK[...].astype(dt)
        q = project(self.wq_DHK, self.bq_HK)
        k = project(self.wk_DHK, self.bk_HK)
        v = project(self.wv_DHK, self.bv_HK)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q = sharding.constrain(q, ('batch', 'length', 'act_heads', None))
        return rotary(q, positions_BT, self.rope_base), rotary(k, positions_BT, self.rope_base), v

    def project_out(self, out_BTHK):
        return jnp.einsum('bthk,hkd->btd', out_BTHK, self.wo_HKD[...].astype(out_BTHK.dtype))

    def __call__(self, x_BTD, segment_ids_BT, positions_BT):
        """Causal attention within segments, by the configured implementation."""
        q, k, v = self.project_qkv(x_BTD, positions_BT)
        out_BTHK = attention.attend(q, k, v, segment_ids_BT, implementation=self.implementation,
                                    block=self.block)
        return self.project_out(out_BTHK)

    def empty_cache(self, batch: int, max_len: int, dtype) -> KVCache:
        shape = (batch, max_len, self.wk_DHK.shape[1], self.head_dim)
        return KVCache(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype))

    def cached(self, x_BTD, cache: KVCache, start):
        """Attention for T new tokens at positions start..start+T-1 (one document per row).

        Their keys/values are written into the cache at those positions, and each token attends
        to every cached position up to its own: prefill is T = prompt length at start 0, decoding
        is T = 1. Positions past the current one are masked, so stale cache slots never matter.
        """
        B, T, _ = x_BTD.shape
        positions_T = start + jnp.arange(T, dtype=jnp.int32)
        q, k, v = self.project_qkv(x_BTD, jnp.broadcast_to(positions_T, (B, T)))
        write = lambda buf, new: jax.lax.dynamic_update_slice_in_dim(
            buf, new.astype(buf.dtype), start, axis=1)
        cache = KVCache(write(cache.k_BSHK, k), write(cache.v_BSHK, v))
        S = cache.k_BSHK.shape[1]
        mask_11TS = (jnp.arange(S)[None, :] <= positions_T[:, None])[None, None]
        # XLA's path whatever model.attention says: T new tokens against S cached ones is small.
        out_BTHK = jax.nn.dot_product_attention(q, cache.k_BSHK.astype(q.dtype),
                                                cache.v_BSHK.astype(q.dtype), mask=mask_11TS)
        return self.project_out(out_BTHK), cache
