"""Multi-head latent attention (MLA, DeepSeek-V2/V3) and YaRN rotary scaling.

Keys and values come from one compressed latent per token (kv_lora_rank channels, RMS-normed)
that every head expands; a small rotary key (qk_rope_head_dim) is shared by all heads, so the
cache for generation holds only the latent and that key (C + R numbers per token per layer,
against 2*H*K for standard attention). Queries may also pass through a low-rank bottleneck
(q_lora_rank). Each head's query/key is [no-rotary part (N); rotary part (R)] and its value has
U channels, with U != N + R in general: values are zero-padded to N + R for the shared
attention kernels (moejax/model/attention.py), whose outputs are cut back to U.

Dims: B batch, T tokens, S cached positions, D model, H heads, Q q_lora_rank, C kv_lora_rank,
N qk_nope_head_dim, R qk_rope_head_dim, K = N + R, U v_head_dim, M = C + R (the joint
down-projection), Z = N + U (the per-head up-projection). Rotary channel pairs are (r, r + R/2)
as in moejax's rotary; DeepSeek's published weights interleave them, which import permutes.
"""
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from moejax import sharding
from moejax.model import attention
from moejax.model.layers import RMSNorm, rotary_by_freq
from moejax.sharding import param

ROPE_SCALINGS = ('none', 'yarn')


def yarn_mscale(factor: float, mscale: float = 1.0) -> float:
    """YaRN's attention temperature 0.1 * mscale * ln(factor) + 1 (1 when not extending)."""
    return 1.0 if factor <= 1 else 0.1 * mscale * math.log(factor) + 1.0


def rope_frequencies(m, dim: int) -> tuple[np.ndarray, float, float]:
    """(angular frequency per channel pair [dim/2], cos/sin scale, softmax scale multiplier).

    'none': base^(-2i/dim). 'yarn' (Peng et al. 2023, as DeepSeek-V3's config uses it):
    wavelengths shorter than the original context / beta_fast rotations are kept, longer than
    / beta_slow are interpolated by 1/factor, with a linear ramp between (bounds floored/ceiled
    as transformers does); cos/sin scale mscale(factor, mscale) / mscale(factor, mscale_all_dim),
    and the softmax scale times mscale(factor, mscale_all_dim)^2 when mscale_all_dim is set.
    """
    base = float(m.rope_base)
    pos_freqs = base ** (np.arange(0, dim, 2, dtype=np.float64) / dim)
    if m.rope_scaling != 'yarn':
        return (1.0 / pos_freqs).astype(np.float32), 1.0, 1.0
    factor, orig = float(m.rope_factor), float(m.rope_original_max_len)
    correction = lambda rotations: (dim * math.log(orig / (rotations * 2 * math.pi))
                                    / (2 * math.log(base)))
    low = max(math.floor(correction(m.rope_beta_fast)), 0)
    high = min(math.ceil(correction(m.rope_beta_slow)), dim - 1)
    ramp = np.clip((np.arange(dim // 2) - low) / max(high - low, 1e-3), 0, 1)
    keep = 1 - ramp  # 1: extrapolate (keep the frequency), 0: interpolate (divide by factor)
    freq = (1 / (factor * pos_freqs)) * (1 - keep) + (1 / pos_freqs) * keep
    all_dim = float(m.rope_mscale_all_dim)
    if m.rope_mscale and all_dim:
        cos_scale = yarn_mscale(factor, m.rope_mscale) / yarn_mscale(factor, all_dim)
    else:
        cos_scale = yarn_mscale(factor)
    softmax = yarn_mscale(factor, all_dim) ** 2 if all_dim else 1.0
    return freq.astype(np.float32), float(cos_scale), float(softmax)


class LatentCache(NamedTuple):
    """One MLA layer's cache for decoding: the normed latent [B, S, C] and rotated key [B, S, R]."""
    latent_BSC: jax.Array
    k_rope_BSR: jax.Array


class MLA(nnx.Module):
    """Multi-head latent attention, causal within segments, by any attention implementation."""

    def __init__(self, cfg, *, rngs: nnx.Rngs):
        m = cfg.model
        D, H = m.d_model, m.num_heads
        self.q_lora, C = m.q_lora_rank, m.kv_lora_rank
        N, R, U = m.qk_nope_head_dim, m.qk_rope_head_dim, m.v_head_dim
        self.dims = (C, N, R, U)
        self.implementation, self.block = m.attention, m.attention_block
        freq_R, self.cos_scale, self.softmax_scale = rope_frequencies(m, R)
        self.freq_R = tuple(float(f) for f in freq_R)  # static: not a parameter
        eps = m.norm_eps
        if self.q_lora:
            self.wq_a_DQ = param(rngs, (D, self.q_lora), ('embed', 'q_lora'), D)
            self.q_norm = RMSNorm(self.q_lora, eps)
            self.wq_b_QHK = param(rngs, (self.q_lora, H, N + R), ('q_lora', 'heads', 'head_dim'),
                                  self.q_lora)
        else:
            self.wq_DHK = param(rngs, (D, H, N + R), ('embed', 'heads', 'head_dim'), D)
        self.wkv_a_DM = param(rngs, (D, C + R), ('embed', 'kv_lora'), D)
        self.kv_norm = RMSNorm(C, eps)
        self.wkv_b_CHZ = param(rngs, (C, H, N + U), ('kv_lora', 'heads', 'head_dim'), C)
        self.wo_HUD = param(rngs, (H, U, D), ('heads', 'head_dim', 'embed'), H * U)

    def _rotate(self, x_BTHR, positions_BT):
        freq_R = jnp.asarray(self.freq_R, jnp.float32)
        return rotary_by_freq(x_BTHR, positions_BT, freq_R, self.cos_scale)

    def queries(self, x_BTD, positions_BT):
        """[B, T, H, K]: the no-rotary part, then the rotated part, times the softmax scale
        correction (so the kernels' 1/sqrt(K) gives DeepSeek's softmax scale)."""
        dt = x_BTD.dtype
        if self.q_lora:
            c_BTQ = self.q_norm(jnp.einsum('btd,dq->btq', x_BTD, self.wq_a_DQ[...].astype(dt)))
            q_BTHK = jnp.einsum('btq,qhk->bthk', c_BTQ, self.wq_b_QHK[...].astype(dt))
        else:
            q_BTHK = jnp.einsum('btd,dhk->bthk', x_BTD, self.wq_DHK[...].astype(dt))
        N = self.dims[1]
        q_BTHK = jnp.concatenate(
            [q_BTHK[..., :N], self._rotate(q_BTHK[..., N:], positions_BT)], axis=-1)
        if self.softmax_scale != 1.0:
            q_BTHK = q_BTHK * jnp.asarray(self.softmax_scale, dt)
        return sharding.constrain(q_BTHK, ('batch', 'length', 'act_heads', None))

    def latent(self, x_BTD, positions_BT):
        """The cached quantities: the normed latent [B, T, C] and the rotated key [B, T, R]."""
        C = self.dims[0]
        kv_BTM = jnp.einsum('btd,dm->btm', x_BTD, self.wkv_a_DM[...].astype(x_BTD.dtype))
        k_rope_BTR = self._rotate(kv_BTM[:, :, None, C:], positions_BT)[:, :, 0]
        return self.kv_norm(kv_BTM[..., :C]), k_rope_BTR

    def expand(self, latent_BTC, k_rope_BTR):
        """Keys [B, T, H, K] (the rotary key repeated per head) and values [B, T, H, U]."""
        _, N, R, _ = self.dims
        kv_BTHZ = jnp.einsum('btc,chz->bthz', latent_BTC,
                             self.wkv_b_CHZ[...].astype(latent_BTC.dtype))
        H = kv_BTHZ.shape[2]
        k_rope_BTHR = jnp.broadcast_to(k_rope_BTR[:, :, None], k_rope_BTR.shape[:2] + (H, R))
        k_BTHK = jnp.concatenate([kv_BTHZ[..., :N], k_rope_BTHR.astype(kv_BTHZ.dtype)], axis=-1)
        return k_BTHK, kv_BTHZ[..., N:]

    def project_out(self, out_BTHU):
        return jnp.einsum('bthu,hud->btd', out_BTHU, self.wo_HUD[...].astype(out_BTHU.dtype))

    def __call__(self, x_BTD, segment_ids_BT, positions_BT):
        """Causal attention within segments, by the configured implementation."""
        q_BTHK = self.queries(x_BTD, positions_BT)
        k_BTHK, v_BTHU = self.expand(*self.latent(x_BTD, positions_BT))
        K, U = q_BTHK.shape[-1], v_BTHU.shape[-1]
        v_BTHK = jnp.pad(v_BTHU, [(0, 0)] * 3 + [(0, K - U)]) if U < K else v_BTHU
        out_BTHK = attention.attend(q_BTHK, k_BTHK, v_BTHK, segment_ids_BT,
                                    implementation=self.implementation, block=self.block)
        return self.project_out(out_BTHK[..., :U])

    def empty_cache(self, batch: int, max_len: int, dtype) -> LatentCache:
        C, _, R, _ = self.dims
        return LatentCache(jnp.zeros((batch, max_len, C), dtype),
                           jnp.zeros((batch, max_len, R), dtype))

    def cached(self, x_BTD, cache: LatentCache, start):
        """Attention for T new tokens at positions start.. against the latent cache.

        The key up-projection is absorbed into the queries and the value up-projection applied
        after the weighted sum (DeepSeek-V2 section 2.1.2), so keys and values per head are never
        materialised for the S cached positions: scores = (q_nope W_k^T) . latent + q_rope . k_rope.
        """
        B, T, _ = x_BTD.shape
        positions_T = start + jnp.arange(T, dtype=jnp.int32)
        positions_BT = jnp.broadcast_to(positions_T, (B, T))
        q_BTHK = self.queries(x_BTD, positions_BT)
        latent_BTC, k_rope_BTR = self.latent(x_BTD, positions_BT)
        write = lambda buf, new: jax.lax.dynamic_update_slice_in_dim(
            buf, new.astype(buf.dtype), start, axis=1)
        cache = LatentCache(write(cache.latent_BSC, latent_BTC),
                            write(cache.k_rope_BSR, k_rope_BTR))
        _, N, _, _ = self.dims
        dt = q_BTHK.dtype
        w_CHZ = self.wkv_b_CHZ[...].astype(jnp.float32)
        q_lat_BTHC = jnp.einsum('bthn,chn->bthc', q_BTHK[..., :N].astype(jnp.float32),
                                w_CHZ[..., :N])
        latent_BSC = cache.latent_BSC.astype(jnp.float32)
        scores_BHTS = (jnp.einsum('bthc,bsc->bhts', q_lat_BTHC, latent_BSC)
                       + jnp.einsum('bthr,bsr->bhts', q_BTHK[..., N:].astype(jnp.float32),
                                    cache.k_rope_BSR.astype(jnp.float32)))
        scores_BHTS = scores_BHTS / math.sqrt(q_BTHK.shape[-1])
        S = latent_BSC.shape[1]
        allowed_TS = jnp.arange(S)[None, :] <= positions_T[:, None]
        probs_BHTS = jax.nn.softmax(jnp.where(allowed_TS, scores_BHTS, -jnp.inf), axis=-1)
        out_BTHC = jnp.einsum('bhts,bsc->bthc', probs_BHTS, latent_BSC)
        out_BTHU = jnp.einsum('bthc,chu->bthu', out_BTHC, w_CHZ[..., N:]).astype(dt)
        return self.project_out(out_BTHU), cache
