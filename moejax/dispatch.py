"""Dispatch tokens to experts, run the expert FFNs, and combine their outputs.

Three engines with one meaning for token-choice routing:
- 'einsum': GShard/Switch one-hot dispatch/combine tensors [G, S, E, C] (the reference).
- 'sort': the same capacity, the same dropped assignments, by a stable sort of (token, choice)
  pairs and gathers into [G, E, C, D] buffers; no O(S*E*C) tensors.
- 'dropless': no capacity; pairs sorted by expert run as grouped matmuls (moejax.grouped:
  ragged_dot on GPU/TPU, loops of dense blocks on CPU).
Capacity priority (GShard): within a group all first choices come before any second choice,
and within a choice rank earlier tokens first. Expert-choice and soft routings run through any
engine without drops.
"""
from typing import NamedTuple

import jax
import jax.numpy as jnp

from moejax import grouped, sharding
from moejax.routing import Routing

ENGINES = ('einsum', 'sort', 'dropless')
GECD_NAMES = ('expert_group', 'act_exp', 'capacity', 'act_embed')


class ExpertWeights(NamedTuple):
    """Stacked weights of E experts."""
    w_in_EDF: jax.Array
    w_gate_EDF: jax.Array | None  # set for SwiGLU experts
    w_out_EFD: jax.Array


def _ffn(w: ExpertWeights, x, lhs: str):
    """Expert FFN on x laid out as `lhs` (e.g. 'gecd', 'ecd'): gelu MLP, or SwiGLU if gated.

    Runs with the expert dim leading ('gecd' is transposed to 'e(gc)d' and back): XLA:CPU is
    slow at dots whose batch dim is not the leading one. On one CPU device the experts run as
    grouped.grouped_ffn's block loops, which beat XLA:CPU's batched dots.
    """
    if lhs == 'gecd':
        g, e, c, d = x.shape
        y_ECD = _ffn(w, jnp.swapaxes(x, 0, 1).reshape(e, g * c, d), 'ecd')
        return jnp.swapaxes(y_ECD.reshape(e, g, c, -1), 0, 1)
    blocks = grouped.ffn_blocks(x.shape[1], partitioned_ok=False) if lhs == 'ecd' else None
    if blocks:
        e, c, d = x.shape
        y_MD = grouped.grouped_ffn(x.reshape(e * c, d), w.w_in_EDF, w.w_gate_EDF, w.w_out_EFD,
                                   jnp.full((e,), c, jnp.int32), blocks)
        return y_MD.reshape(e, c, -1)
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


def _ragged_ffn(w: ExpertWeights, x_PD, group_sizes_E, blocks):
    """Expert FFN on rows grouped by expert (a grouped.sorted_layout); rows past the groups give 0."""
    return grouped.grouped_ffn(x_PD, w.w_in_EDF, w.w_gate_EDF, w.w_out_EFD, group_sizes_E, blocks)


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
    """Slot layout by one stable argsort of pairs by (expert, priority); the rest is gathers.

    Returns pos_GSK (each pair's slot within its expert), keep_GSK (pair got a slot),
    token_GEC (the token filling slot c of expert e), choice_GEC (which of its k choices) and
    filled_GEC (slot is used).
    """
    num_tokens = expert_GSK.shape[1]
    expert_GA, valid_GA = _priority_GA(expert_GSK, mask_GS)
    key_GA = jnp.where(valid_GA, expert_GA, num_experts)  # padding sorts last
    order_GA = jnp.argsort(key_GA, axis=-1, stable=True)  # sorted index -> pair
    rank_GA = jax.vmap(grouped.inverse_permutation)(order_GA)  # pair -> sorted index
    counts_GE = jnp.sum(jax.nn.one_hot(key_GA, num_experts, dtype=jnp.int32), axis=1)
    starts_GE = jnp.cumsum(counts_GE, axis=-1) - counts_GE
    own_start_GA = jnp.take_along_axis(starts_GE, jnp.minimum(expert_GA, num_experts - 1), -1)
    pos_GA = rank_GA - own_start_GA
    keep_GA = valid_GA & (pos_GA < cap)
    c_C = jnp.arange(cap)
    filled_GEC = c_C < counts_GE[..., None]
    src_GEC = jnp.minimum(starts_GE[..., None] + c_C, key_GA.shape[1] - 1)
    pair_GEC = jnp.take_along_axis(order_GA, src_GEC.reshape(src_GEC.shape[0], -1), axis=-1)
    pair_GEC = pair_GEC.reshape(filled_GEC.shape)
    return (_from_priority(pos_GA, num_tokens), _from_priority(keep_GA, num_tokens),
            pair_GEC % num_tokens, pair_GEC // num_tokens, filled_GEC)


def _gather_GECD(x_GSD, token_GEC, use_GEC, inverse_GSJ=None, inverse_use_GSJ=None):
    """x rows of the tokens in each expert slot; zeros where the slot is unused.

    inverse_GSJ (optional) lists each token's J slots (flat e * C + c; inverse_use_GSJ marks the
    real ones): with it the gradient is a gather too, not a scatter-add.
    """
    g, e, c = token_GEC.shape
    s, d = x_GSD.shape[1:]
    if inverse_GSJ is None:
        x_GECD = jnp.take_along_axis(x_GSD, token_GEC.reshape(g, e * c, 1), axis=1)
        return x_GECD.reshape(g, e, c, d) * use_GEC[..., None].astype(x_GSD.dtype)
    token_N = (token_GEC + s * jnp.arange(g)[:, None, None]).reshape(-1)
    inverse_NJ = (inverse_GSJ + e * c * jnp.arange(g)[:, None, None]).reshape(g * s, -1)
    x_GECD = grouped.gather_rows(x_GSD.reshape(g * s, d), token_N, use_GEC.reshape(-1),
                                 inverse_NJ, inverse_use_GSJ.reshape(g * s, -1))
    return x_GECD.reshape(g, e, c, d)


def _sort_token_choice(x_GSD, mask_GS, routing: Routing, w, num_experts, cap, experts):
    """Capacity dispatch by sorting: same slots and drops as einsum; gathers both ways."""
    g, s, k = routing.expert_GSK.shape
    d = x_GSD.shape[-1]
    pos_GSK, keep_GSK, token_GEC, choice_GEC, filled_GEC = _sorted_slots(
        routing.expert_GSK, mask_GS, num_experts, cap)
    slot_GSK = routing.expert_GSK * cap + jnp.clip(pos_GSK, 0, cap - 1)
    y_GECD = experts(w, _gather_GECD(x_GSD, token_GEC, filled_GEC, slot_GSK, keep_GSK))
    offset_G11 = jnp.arange(g)[:, None, None]
    slot_N = (slot_GSK + num_experts * cap * offset_G11).reshape(-1)
    pair_M1 = ((token_GEC + s * offset_G11) * k + choice_GEC).reshape(-1, 1)
    y_GSKD = grouped.gather_rows(y_GECD.reshape(-1, d), slot_N, keep_GSK.reshape(-1), pair_M1,
                                 filled_GEC.reshape(-1, 1)).reshape(g, s, k, d)
    weight_GSK = (routing.gate_GSK * keep_GSK).astype(x_GSD.dtype)
    return jnp.einsum('gsk,gskd->gsd', weight_GSK, y_GSKD), _dropped_fraction(keep_GSK, mask_GS)


def _dropless_token_choice(x_GSD, mask_GS, routing: Routing, w, num_experts):
    """No capacity: all pairs of the batch sorted by expert, grouped matmul, gathered back.

    Tokens reach the layout rows and results return to their pairs by gathers (with gathers as
    gradients); the grouped matmul does each real pair's work once, plus block padding on CPU.
    """
    g, s, k = routing.expert_GSK.shape
    d = x_GSD.shape[-1]
    valid_NK = jnp.broadcast_to(mask_GS.reshape(g * s, 1), (g * s, k))
    blocks = grouped.ffn_blocks()
    lay = grouped.sorted_layout(routing.expert_GSK.reshape(-1), valid_NK.reshape(-1),
                                num_experts, blocks[-1] if blocks else 1)
    x_PD = grouped.gather_rows(x_GSD.reshape(g * s, d), lay.pair_P // k, lay.filled_P,
                               lay.row_N.reshape(g * s, k), valid_NK)
    y_PD = _ragged_ffn(w, x_PD, lay.group_sizes_E, blocks)
    y_AD = grouped.gather_rows(y_PD, lay.row_N, valid_NK.reshape(-1), lay.pair_P[:, None],
                               lay.filled_P[:, None])
    weight_NK = (routing.gate_GSK.reshape(g * s, k) * valid_NK).astype(x_GSD.dtype)
    y_ND = jnp.einsum('nk,nkd->nd', weight_NK, y_AD.reshape(g * s, k, d))
    return y_ND.reshape(g, s, d), jnp.zeros((), jnp.float32)


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
                     capacity: int, experts=experts_on_buffers,
                     num_experts: int | None = None) -> tuple[jax.Array, jax.Array]:
    """Apply the routed experts to x_GSD; returns (y_GSD, dropped_fraction).

    capacity (slots per expert per group) is used by token-choice 'einsum' and 'sort' only;
    expert choice takes C from token_GEC. `experts(w, x_GECD) -> y_GECD` runs the experts on
    capacity buffers (einsum, sort, expert choice). dropped_fraction is the fraction of real tokens'
    (token, choice) assignments that found no slot (0 for dropless, expert choice and soft).
    num_experts: the buffers' E when w holds only this device's experts (the all_to_all path,
    whose `experts` exchanges buffers between expert shards); default w's own count.
    """
    if engine not in ENGINES:
        raise ValueError(f'engine={engine!r}: allowed {ENGINES}')
    if mask_GS is None:
        mask_GS = jnp.ones(x_GSD.shape[:2], bool)
    if routing.gate_GSE is not None:
        return _soft(x_GSD, mask_GS, routing, w)
    if routing.token_GEC is not None:
        return _expert_choice(x_GSD, mask_GS, routing, w, engine, experts)
    num_experts = num_experts or w.w_in_EDF.shape[0]
    if engine == 'einsum':
        return _einsum_token_choice(x_GSD, mask_GS, routing, w, num_experts, capacity,
                                    experts)
    if engine == 'sort':
        return _sort_token_choice(x_GSD, mask_GS, routing, w, num_experts, capacity, experts)
    return _dropless_token_choice(x_GSD, mask_GS, routing, w, num_experts)
