"""Dispatch tokens to experts, run the expert FFNs, and combine their outputs.

Three engines with one meaning for token-choice routing:
- 'einsum': GShard/Switch one-hot dispatch/combine tensors [G, S, E, C] (the reference).
- 'sort': the same capacity, the same dropped assignments, by a stable sort of (token, choice)
  pairs and gathers into [G, E, C, D] buffers; no O(S*E*C) tensors.
- 'dropless': no capacity; pairs sorted by expert run as one grouped matmul (ragged_dot).
Capacity priority (GShard): within a group all first choices come before any second choice,
and within a choice rank earlier tokens first. Expert-choice and soft routings run through any
engine without drops.
"""
from typing import NamedTuple

import jax
import jax.numpy as jnp

from moejax import sharding
from moejax.routing import Routing

ENGINES = ('einsum', 'sort', 'dropless')
GECD_NAMES = ('expert_group', 'act_exp', 'capacity', 'act_embed')


class ExpertWeights(NamedTuple):
    """Stacked weights of E experts."""
    w_in_EDF: jax.Array
    w_gate_EDF: jax.Array | None  # set for SwiGLU experts
    w_out_EFD: jax.Array


def _ffn(w: ExpertWeights, x, lhs: str):
    """Expert FFN on x laid out as `lhs` (e.g. 'gecd', 'ecd'): gelu MLP, or SwiGLU if gated."""
    mid = lhs.replace('d', 'f')
    h = jnp.einsum(f'{lhs},edf->{mid}', x, w.w_in_EDF.astype(x.dtype))
    if w.w_gate_EDF is None:
        h = jax.nn.gelu(h)
    else:
        h = jax.nn.silu(h) * jnp.einsum(f'{lhs},edf->{mid}', x, w.w_gate_EDF.astype(x.dtype))
    return jnp.einsum(f'{mid},efd->{lhs}', h, w.w_out_EFD.astype(x.dtype))


def expert_ffn(w: ExpertWeights, x_ECD: jax.Array) -> jax.Array:
    """Each expert's FFN on its own tokens, batched over experts; matmuls in x's dtype.

    act(x @ w_in) [* (x @ w_gate)] @ w_out, act = gelu (tanh form) without gate, silu with.
    """
    return _ffn(w, x_ECD, 'ecd')


def _ragged_ffn(w: ExpertWeights, x_ND, group_sizes_E):
    """Expert FFN on rows sorted by expert, as grouped matmuls (rows past the groups give 0)."""
    def mm(a, b):
        return jax.lax.ragged_dot(a, b.astype(a.dtype), group_sizes_E)
    h = mm(x_ND, w.w_in_EDF)
    h = jax.nn.gelu(h) if w.w_gate_EDF is None else jax.nn.silu(h) * mm(x_ND, w.w_gate_EDF)
    return mm(h, w.w_out_EFD)


def experts_on_buffers(w: ExpertWeights, x_GECD):
    """Experts on capacity buffers, with the expert-parallel sharding constraints around them.

    This is the default `experts` step of the capacity engines; the all_to_all path swaps in
    one that exchanges buffers between expert shards around the same FFN.
    """
    x_GECD = sharding.constrain(x_GECD, GECD_NAMES)
    return sharding.constrain(_ffn(w, x_GECD, 'gecd'), GECD_NAMES)


def _priority_GA(expert_GSK, mask_GS):
    """(token, choice) pairs flattened in GShard priority order a = k * S + s, with validity."""
    g, s, k = expert_GSK.shape
    expert_GA = jnp.swapaxes(expert_GSK, 1, 2).reshape(g, k * s)
    valid_GA = jnp.broadcast_to(mask_GS[:, None, :], (g, k, s)).reshape(g, k * s)
    return expert_GA, valid_GA


def _from_priority(v_GA, num_tokens):
    """Inverse of _priority_GA's flattening: [G, K*S, ...] -> [G, S, K, ...]."""
    g, a, rest = v_GA.shape[0], v_GA.shape[1], v_GA.shape[2:]
    return jnp.swapaxes(v_GA.reshape(g, a // num_tokens, num_tokens, *rest), 1, 2)


def _dropped_fraction(keep_GSK, mask_GS):
    """Fraction of real tokens' (token, choice) assignments that found no slot."""
    routed = jnp.sum(mask_GS.astype(jnp.float32)) * keep_GSK.shape[-1]
    return 1.0 - jnp.sum(keep_GSK.astype(jnp.float32)) / jnp.maximum(routed, 1.0)


def _einsum_token_choice(x_GSD, mask_GS, routing: Routing, w, num_experts, cap, experts):
    """GShard reference: slot = running count of the expert in priority order (via cumsum)."""
    num_tokens = x_GSD.shape[1]
    expert_GA, valid_GA = _priority_GA(routing.expert_GSK, mask_GS)
    onehot_GAE = jax.nn.one_hot(expert_GA, num_experts, dtype=jnp.int32) * valid_GA[..., None]
    pos_GA = jnp.sum((jnp.cumsum(onehot_GAE, axis=1) - 1) * onehot_GAE, axis=-1)
    keep_GA = valid_GA & (pos_GA < cap)
    slot_GAEC = (onehot_GAE[..., None] * jax.nn.one_hot(pos_GA, cap, dtype=jnp.int32)[:, :, None]
                 * keep_GA[..., None, None])
    slot_GSKEC = _from_priority(slot_GAEC, num_tokens)
    dispatch_GSEC = jnp.sum(slot_GSKEC, axis=2).astype(x_GSD.dtype)
    combine_GSEC = jnp.einsum('gskec,gsk->gsec', slot_GSKEC.astype(jnp.float32), routing.gate_GSK)
    x_GECD = jnp.einsum('gsec,gsd->gecd', dispatch_GSEC, x_GSD)
    y_GECD = experts(w, x_GECD)
    y_GSD = jnp.einsum('gsec,gecd->gsd', combine_GSEC.astype(x_GSD.dtype), y_GECD)
    return y_GSD, _dropped_fraction(_from_priority(keep_GA, num_tokens), mask_GS)


def _sorted_slots(expert_GSK, mask_GS, num_experts, cap):
    """Slot layout by a stable sort of pairs by (expert, priority), all gathers.

    Returns pos_GSK (each pair's slot within its expert), keep_GSK (pair got a slot),
    token_GEC (the token filling slot c of expert e) and filled_GEC (slot is used).
    """
    num_tokens = expert_GSK.shape[1]
    expert_GA, valid_GA = _priority_GA(expert_GSK, mask_GS)
    key_GA = jnp.where(valid_GA, expert_GA, num_experts)  # padding sorts last
    order_GA = jnp.argsort(key_GA, axis=-1, stable=True)  # sorted index -> pair
    rank_GA = jnp.argsort(order_GA, axis=-1)  # pair -> sorted index
    counts_GE = jnp.sum(jax.nn.one_hot(key_GA, num_experts, dtype=jnp.int32), axis=1)
    starts_GE = jnp.cumsum(counts_GE, axis=-1) - counts_GE
    own_start_GA = jnp.take_along_axis(starts_GE, jnp.minimum(expert_GA, num_experts - 1), -1)
    pos_GA = rank_GA - own_start_GA
    keep_GA = valid_GA & (pos_GA < cap)
    c_C = jnp.arange(cap)
    filled_GEC = c_C < counts_GE[..., None]
    src_GEC = jnp.minimum(starts_GE[..., None] + c_C, key_GA.shape[1] - 1)
    pair_GEC = jnp.take_along_axis(order_GA, src_GEC.reshape(src_GEC.shape[0], -1), axis=-1)
    token_GEC = (pair_GEC % num_tokens).reshape(filled_GEC.shape)
    return (_from_priority(pos_GA, num_tokens), _from_priority(keep_GA, num_tokens),
            token_GEC, filled_GEC)


def _gather_GECD(x_GSD, token_GEC, use_GEC):
    """x rows of the tokens in each expert slot; zeros where the slot is unused."""
    g, e, c = token_GEC.shape
    x_GECD = jnp.take_along_axis(x_GSD, token_GEC.reshape(g, e * c, 1), axis=1)
    return x_GECD.reshape(g, e, c, -1) * use_GEC[..., None].astype(x_GSD.dtype)


def _sort_token_choice(x_GSD, mask_GS, routing: Routing, w, num_experts, cap, experts):
    """Capacity dispatch by sorting: same slots and drops as einsum, via gathers only."""
    g, s, k = routing.expert_GSK.shape
    pos_GSK, keep_GSK, token_GEC, filled_GEC = _sorted_slots(
        routing.expert_GSK, mask_GS, num_experts, cap)
    y_GECD = experts(w, _gather_GECD(x_GSD, token_GEC, filled_GEC))
    slot_GSK = routing.expert_GSK * cap + jnp.clip(pos_GSK, 0, cap - 1)
    y_GSKD = jnp.take_along_axis(y_GECD.reshape(g, num_experts * cap, -1),
                                 slot_GSK.reshape(g, s * k, 1), axis=1).reshape(g, s, k, -1)
    weight_GSK = (routing.gate_GSK * keep_GSK).astype(x_GSD.dtype)
    return jnp.einsum('gsk,gskd->gsd', weight_GSK, y_GSKD), _dropped_fraction(keep_GSK, mask_GS)


def _dropless_token_choice(x_GSD, mask_GS, routing: Routing, w, num_experts):
    """No capacity: all pairs of the batch sorted by expert, grouped matmul, unsorted back."""
    g, s, k = routing.expert_GSK.shape
    valid_N = jnp.broadcast_to(mask_GS[..., None], (g, s, k)).reshape(-1)
    key_N = jnp.where(valid_N, routing.expert_GSK.reshape(-1), num_experts)
    order_N = jnp.argsort(key_N, stable=True)
    group_sizes_E = jnp.sum(jax.nn.one_hot(key_N, num_experts, dtype=jnp.int32), axis=0)
    x_ND = x_GSD.reshape(g * s, -1)[order_N // k]
    y_ND = _ragged_ffn(w, x_ND, group_sizes_E)[jnp.argsort(order_N)]
    y_ND = jnp.where(valid_N[:, None], y_ND, 0)
    weight_N = (routing.gate_GSK.reshape(-1) * valid_N).astype(x_GSD.dtype)
    y_GSD = jnp.sum((weight_N[:, None] * y_ND).reshape(g, s, k, -1), axis=2)
    return y_GSD, jnp.zeros((), jnp.float32)


def _expert_choice(x_GSD, mask_GS, routing: Routing, w, engine, experts):
    """Expert-choice routing: experts already hold their C tokens; nothing is dropped."""
    g, s, d = x_GSD.shape
    token_GEC = routing.token_GEC
    real_GEC = jnp.take_along_axis(mask_GS[:, None, :], token_GEC, axis=-1)
    weight_GEC = (routing.gate_GEC * real_GEC).astype(x_GSD.dtype)
    if engine == 'einsum':
        dispatch_GECS = jax.nn.one_hot(token_GEC, s, dtype=x_GSD.dtype) * real_GEC[..., None]
        y_GECD = experts(w, jnp.einsum('gecs,gsd->gecd', dispatch_GECS, x_GSD))
        y_GSD = jnp.einsum('gecs,gec,gecd->gsd', dispatch_GECS, weight_GEC, y_GECD)
        return y_GSD, jnp.zeros((), jnp.float32)
    y_GECD = experts(w, _gather_GECD(x_GSD, token_GEC, real_GEC))
    rows_GEC = token_GEC + s * jnp.arange(g)[:, None, None]
    y_ND = jax.ops.segment_sum((weight_GEC[..., None] * y_GECD).reshape(-1, d),
                               rows_GEC.reshape(-1), num_segments=g * s)
    return y_ND.reshape(g, s, d), jnp.zeros((), jnp.float32)


def _soft(x_GSD, mask_GS, routing: Routing, w):
    """Soft mixture: every expert runs on every token; outputs weighted by the gates."""
    g, s, d = x_GSD.shape
    num_experts = routing.gate_GSE.shape[-1]
    x_END = jnp.broadcast_to(x_GSD.reshape(1, g * s, d), (num_experts, g * s, d))
    x_END = sharding.constrain(x_END, ('act_exp', None, 'act_embed'))
    y_END = sharding.constrain(expert_ffn(w, x_END), ('act_exp', None, 'act_embed'))
    gate_NE = (routing.gate_GSE * mask_GS[..., None]).reshape(g * s, num_experts)
    y_ND = jnp.einsum('ne,end->nd', gate_NE.astype(x_GSD.dtype), y_END)
    return y_ND.reshape(g, s, d), jnp.zeros((), jnp.float32)


def dispatch_combine(x_GSD, mask_GS, routing: Routing, w: ExpertWeights, *, engine: str,
                     capacity: int, experts=experts_on_buffers) -> tuple[jax.Array, jax.Array]:
    """Apply the routed experts to x_GSD; returns (y_GSD, dropped_fraction).

    capacity (slots per expert per group) is used by token-choice 'einsum' and 'sort' only;
    expert choice takes C from token_GEC. `experts(w, x_GECD) -> y_GECD` runs the experts on
    capacity buffers (einsum, sort, expert choice). dropped_fraction is the fraction of real tokens'
    (token, choice) assignments that found no slot (0 for dropless, expert choice and soft).
    """
    if engine not in ENGINES:
        raise ValueError(f'engine={engine!r}: allowed {ENGINES}')
    if mask_GS is None:
        mask_GS = jnp.ones(x_GSD.shape[:2], bool)
    if routing.gate_GSE is not None:
        return _soft(x_GSD, mask_GS, routing, w)
    if routing.token_GEC is not None:
        return _expert_choice(x_GSD, mask_GS, routing, w, engine, experts)
    num_experts = w.w_in_EDF.shape[0]
    if engine == 'einsum':
        return _einsum_token_choice(x_GSD, mask_GS, routing, w, num_experts, capacity,
                                    experts)
    if engine == 'sort':
        return _sort_token_choice(x_GSD, mask_GS, routing, w, num_experts, capacity, experts)
    return _dropless_token_choice(x_GSD, mask_GS, routing, w, num_experts)
