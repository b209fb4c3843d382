"""Dispatch tokens to experts, run the expert FFNs, and combine their outputs.

Three engines with one meaning for token-choice routing:
- 'einsum': GShard/Switch one-hot dispatch/combine tensors [G, S, E, C] (the reference).
- 'sort': the same capacity, the same dropped assignments, by a stable sort of (token, choice)
  pairs and gathers into [G, E, C, D] buffers; no O(S*E*C) tensors.
- 'dropless': no capacity; pairs sorted by expert run as grouped matmuls (moejax.moe.experts:
  `moe.grouped_matmul` picks CPU block loops, jax.lax.ragged_dot or tokamax's kernels).
Capacity priority (GShard): within a group all first choices come before any second choice,
and within a choice rank earlier tokens first (with batch-prioritized routing: tokens with
higher router scores first, TokenChoice.priority_GS). Expert-choice and soft routings run through
any engine without drops.
"""
import functools

import jax
import jax.numpy as jnp

from moejax import sharding
from moejax.moe import dropless_cpu, grouped
from moejax.moe import experts as experts_lib
from moejax.moe.routing import ExpertChoice, Routing, Soft, TokenChoice

ENGINES = ('einsum', 'sort', 'dropless')
GECD_NAMES = ('expert_group', 'act_exp', 'capacity', 'act_embed')


def experts_on_buffers(w: experts_lib.ExpertWeights, x_GECD, backend: str = 'auto'):
    """Experts on capacity buffers, with the expert-parallel sharding constraints around them.

    This is the default `experts` step of the capacity engines; the all_to_all path swaps in
    one that exchanges buffers between expert shards around the same FFN. The buffers run with
    the expert dim leading ([G, E, C, D] -> [E, G*C, D] and back).
    """
    x_GECD = sharding.constrain(x_GECD, GECD_NAMES)
    g, e, c, d = x_GECD.shape
    x_ECD = jnp.swapaxes(x_GECD, 0, 1).reshape(e, g * c, d)
    y_ECD = experts_lib.expert_ffn(w, x_ECD, backend)
    y_GECD = jnp.swapaxes(y_ECD.reshape(e, g, c, -1), 0, 1)
    return sharding.constrain(y_GECD, GECD_NAMES)


def _token_order(priority_GS):
    """Batch-prioritized routing (V-MoE, flaxformer): the tokens of each group by descending
    priority, ties in position order (a stable sort); None keeps position order (GShard)."""
    if priority_GS is None:
        return None
    return jnp.argsort(-priority_GS, axis=-1, stable=True)


def _priority_GA(expert_GSK, mask_GS, order_GS=None):
    """(token, choice) pairs flattened in priority order a = k * S + r, with validity: all first
    choices before any second choice (GShard), and within a choice rank the token of rank r,
    which is token r, or token order_GS[r] under batch-prioritized routing."""
    if order_GS is not None:
        expert_GSK = jnp.take_along_axis(expert_GSK, order_GS[..., None], axis=1)
        mask_GS = jnp.take_along_axis(mask_GS, order_GS, axis=1)
    g, s, k = expert_GSK.shape
    expert_GA = jnp.swapaxes(expert_GSK, 1, 2).reshape(g, k * s)
    valid_GA = jnp.broadcast_to(mask_GS[:, None, :], (g, k, s)).reshape(g, k * s)
    return expert_GA, valid_GA


def _from_priority(v_GA, num_tokens, order_GS=None):
    """Inverse of _priority_GA's flattening: [G, K*S, ...] -> [G, S, K, ...] in token order."""
    g, a, rest = v_GA.shape[0], v_GA.shape[1], v_GA.shape[2:]
    v_GSK = jnp.swapaxes(v_GA.reshape(g, a // num_tokens, num_tokens, *rest), 1, 2)
    if order_GS is None:
        return v_GSK
    rank_GS = jax.vmap(grouped.inverse_permutation)(order_GS)  # token -> its rank
    return jax.vmap(lambda v, r: v[r])(v_GSK, rank_GS)


def _dropped_fraction(keep_GSK, mask_GS):
    """Fraction of real tokens' (token, choice) assignments that found no slot."""
    routed = jnp.sum(mask_GS.astype(jnp.float32)) * keep_GSK.shape[-1]
    return 1.0 - jnp.sum(keep_GSK.astype(jnp.float32)) / jnp.maximum(routed, 1.0)


def drop_stats(keep_GSK, mask_GS) -> tuple[jax.Array, jax.Array]:
    """(dropped_fraction, tokens_left_behind) of the pairs that found no place (keep_GSK)."""
    real_GS = mask_GS.astype(bool)
    reached = jnp.sum((jnp.any(keep_GSK, axis=-1) & real_GS).astype(jnp.float32))
    real = jnp.sum(real_GS.astype(jnp.float32))
    return _dropped_fraction(keep_GSK, mask_GS), (real - reached) / jnp.maximum(real, 1.0)


def tokens_left_behind(mask_GS, routing: Routing, *, engine: str, capacity: int,
                       num_experts: int) -> jax.Array:
    """Fraction of real tokens that reached no expert at all (flaxformer's
    fraction_tokens_left_behind): all k choices dropped at capacity, or, under expert choice,
    picked by no expert. dropped_fraction counts (token, choice) assignments instead.

    Computed from the routing with the engines' own slot rule (_sorted_slots), so one device,
    GSPMD and the all_to_all path (where it runs outside the shard_map) give the same number.
    """
    real_GS = mask_GS.astype(bool)
    if isinstance(routing, Soft) or (isinstance(routing, TokenChoice) and engine == 'dropless'):
        return jnp.zeros((), jnp.float32)
    if isinstance(routing, ExpertChoice):
        g, s = real_GS.shape
        real_GEC = jnp.take_along_axis(real_GS[:, None, :], routing.token_GEC, axis=-1)
        reached_GS = jax.vmap(lambda t, r: jnp.zeros(s, bool).at[t].max(r))(
            routing.token_GEC.reshape(g, -1), real_GEC.reshape(g, -1))
    else:
        _, keep_GSK, *_ = _sorted_slots(routing.expert_GSK, real_GS, num_experts, capacity,
                                        routing.priority_GS)
        reached_GS = jnp.any(keep_GSK, axis=-1)
    real = jnp.sum(real_GS.astype(jnp.float32))
    reached = jnp.sum((reached_GS & real_GS).astype(jnp.float32))
    return (real - reached) / jnp.maximum(real, 1.0)


def _einsum_token_choice(x_GSD, mask_GS, routing: TokenChoice, w, num_experts, cap, experts):
    """GShard reference: slot = running count of the expert in priority order (via cumsum)."""
    num_tokens = x_GSD.shape[1]
    order_GS = _token_order(routing.priority_GS)
    expert_GA, valid_GA = _priority_GA(routing.expert_GSK, mask_GS, order_GS)
    onehot_GAE = jax.nn.one_hot(expert_GA, num_experts, dtype=jnp.int32) * valid_GA[..., None]
    pos_GA = jnp.sum((jnp.cumsum(onehot_GAE, axis=1) - 1) * onehot_GAE, axis=-1)
    keep_GA = valid_GA & (pos_GA < cap)
    slot_GAEC = (onehot_GAE[..., None] * jax.nn.one_hot(pos_GA, cap, dtype=jnp.int32)[:, :, None]
                 * keep_GA[..., None, None])
    slot_GSKEC = _from_priority(slot_GAEC, num_tokens, order_GS)
    dispatch_GSEC = jnp.sum(slot_GSKEC, axis=2).astype(x_GSD.dtype)
    combine_GSEC = jnp.einsum('gskec,gsk->gsec', slot_GSKEC.astype(jnp.float32), routing.gate_GSK)
    x_GECD = jnp.einsum('gsec,gsd->gecd', dispatch_GSEC, x_GSD)
    y_GECD = experts(w, x_GECD)
    y_GSD = jnp.einsum('gsec,gecd->gsd', combine_GSEC.astype(x_GSD.dtype), y_GECD)
    return y_GSD, _dropped_fraction(_from_priority(keep_GA, num_tokens, order_GS), mask_GS)


def _sorted_slots(expert_GSK, mask_GS, num_experts, cap, priority_GS=None):
    """Slot layout by one stable argsort of pairs by (expert, priority); the rest is gathers.

    Returns pos_GSK (each pair's slot within its expert), keep_GSK (pair got a slot),
    token_GEC (the token filling slot c of expert e), choice_GEC (which of its k choices) and
    filled_GEC (slot is used). priority_GS: batch-prioritized routing's token scores, or None.
    """
    num_tokens = expert_GSK.shape[1]
    order_GS = _token_order(priority_GS)
    expert_GA, valid_GA = _priority_GA(expert_GSK, mask_GS, order_GS)
    key_GA = jnp.where(valid_GA, expert_GA, num_experts)  # padding sorts last
    order_GA = jnp.argsort(key_GA, axis=-1, stable=True)  # sorted index -> pair
    rank_GA = jax.vmap(grouped.inverse_permutation)(order_GA)  # pair -> sorted index
    g = key_GA.shape[0]
    counts_GE = jnp.zeros((g, num_experts + 1), jnp.int32).at[
        jnp.arange(g)[:, None], key_GA].add(1)[:, :num_experts]
    starts_GE = jnp.cumsum(counts_GE, axis=-1) - counts_GE
    own_start_GA = jnp.take_along_axis(starts_GE, jnp.minimum(expert_GA, num_experts - 1), -1)
    pos_GA = rank_GA - own_start_GA
    keep_GA = valid_GA & (pos_GA < cap)
    c_C = jnp.arange(cap)
    filled_GEC = c_C < counts_GE[..., None]
    src_GEC = jnp.minimum(starts_GE[..., None] + c_C, key_GA.shape[1] - 1)
    pair_GEC = jnp.take_along_axis(order_GA, src_GEC.reshape(src_GEC.shape[0], -1), axis=-1)
    pair_GEC = pair_GEC.reshape(filled_GEC.shape)
    token_GEC = pair_GEC % num_tokens  # the token's rank; its index when ranks are positions
    if order_GS is not None:
        token_GEC = jnp.take_along_axis(order_GS, token_GEC.reshape(token_GEC.shape[0], -1),
                                        axis=-1).reshape(token_GEC.shape)
    return (_from_priority(pos_GA, num_tokens, order_GS),
            _from_priority(keep_GA, num_tokens, order_GS),
            token_GEC, pair_GEC // num_tokens, filled_GEC)


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


def _sort_token_choice(x_GSD, mask_GS, routing: TokenChoice, w, num_experts, cap, experts):
    """Capacity dispatch by sorting: same slots and drops as einsum; gathers both ways."""
    g, s, k = routing.expert_GSK.shape
    d = x_GSD.shape[-1]
    pos_GSK, keep_GSK, token_GEC, choice_GEC, filled_GEC = _sorted_slots(
        routing.expert_GSK, mask_GS, num_experts, cap, routing.priority_GS)
    slot_GSK = routing.expert_GSK * cap + jnp.clip(pos_GSK, 0, cap - 1)
    y_GECD = experts(w, _gather_GECD(x_GSD, token_GEC, filled_GEC, slot_GSK, keep_GSK))
    offset_G11 = jnp.arange(g)[:, None, None]
    slot_N = (slot_GSK + num_experts * cap * offset_G11).reshape(-1)
    pair_M1 = ((token_GEC + s * offset_G11) * k + choice_GEC).reshape(-1, 1)
    y_GSKD = grouped.gather_rows(y_GECD.reshape(-1, d), slot_N, keep_GSK.reshape(-1), pair_M1,
                                 filled_GEC.reshape(-1, 1)).reshape(g, s, k, d)
    weight_GSK = (routing.gate_GSK * keep_GSK).astype(x_GSD.dtype)
    return jnp.einsum('gsk,gskd->gsd', weight_GSK, y_GSKD), _dropped_fraction(keep_GSK, mask_GS)


def _dropless_token_choice(x_GSD, mask_GS, routing: TokenChoice, w, num_experts, backend):
    """No capacity: all pairs of the batch sorted by expert, grouped matmul, gathered back.

    Tokens reach the layout rows and results return to their pairs by gathers (with gathers as
    gradients); the grouped matmul does each real pair's work once, plus block padding on CPU.
    On CPU ('blocks') the block loops also do the return and the weighted sum themselves
    (moejax.moe.dropless_cpu: fewer [rows, D] buffers).
    """
    g, s, k = routing.expert_GSK.shape
    d = x_GSD.shape[-1]
    valid_NK = jnp.broadcast_to(mask_GS.reshape(g * s, 1), (g * s, k))
    blocks = experts_lib.layout_blocks(backend)
    lay = grouped.sorted_layout(routing.expert_GSK.reshape(-1), valid_NK.reshape(-1),
                                num_experts, blocks[-1] if blocks else 1)
    if blocks:
        return _dropless_blocks(x_GSD, routing.gate_GSK, valid_NK, lay, w, blocks)
    x_PD = grouped.gather_rows(x_GSD.reshape(g * s, d), lay.pair_P // k, lay.filled_P,
                               lay.row_N.reshape(g * s, k), valid_NK)
    y_PD = experts_lib.grouped_ffn(w, x_PD, lay.group_sizes_E, backend)
    y_AD = grouped.gather_rows(y_PD, lay.row_N, valid_NK.reshape(-1), lay.pair_P[:, None],
                               lay.filled_P[:, None])
    weight_NK = (routing.gate_GSK.reshape(g * s, k) * valid_NK).astype(x_GSD.dtype)
    y_ND = jnp.einsum('nk,nkd->nd', weight_NK, y_AD.reshape(g * s, k, d))
    return y_ND.reshape(g, s, d), jnp.zeros((), jnp.float32)


def _dropless_blocks(x_GSD, gate_GSK, valid_NK, lay: grouped.Layout, w, blocks):
    """The dropless engine on the CPU block loops: rows gathered from the tokens by the layout,
    outputs scatter-added back with their gates (padding rows: gate 0, token 0)."""
    g, s, k = gate_GSK.shape
    dt = x_GSD.dtype
    gate_N = (gate_GSK.reshape(-1) * valid_NK.reshape(-1)).astype(dt)
    gate_P = jnp.where(lay.filled_P, gate_N[lay.pair_P], 0)
    token_P = jnp.where(lay.filled_P, lay.pair_P // k, 0)
    w_gate = None if w.w_gate_EDF is None else w.w_gate_EDF.astype(dt)
    y_ND = dropless_cpu.blocked_dropless_ffn(
        x_GSD.reshape(g * s, -1), token_P, gate_P, w.w_in_EDF.astype(dt), w_gate,
        w.w_out_EFD.astype(dt), lay.group_sizes_E, blocks, experts_lib.activate)
    return y_ND.reshape(x_GSD.shape), jnp.zeros((), jnp.float32)


def _expert_choice(x_GSD, mask_GS, routing: ExpertChoice, w, engine, experts):
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


def _soft(x_GSD, mask_GS, routing: Soft, w, backend):
    """Soft mixture: every expert runs on every token; outputs weighted by the gates."""
    g, s, d = x_GSD.shape
    num_experts = routing.gate_GSE.shape[-1]
    x_END = jnp.broadcast_to(x_GSD.reshape(1, g * s, d), (num_experts, g * s, d))
    x_END = sharding.constrain(x_END, ('act_exp', None, 'act_embed'))
    y_END = experts_lib.expert_ffn(w, x_END, backend)
    y_END = sharding.constrain(y_END, ('act_exp', None, 'act_embed'))
    gate_NE = (routing.gate_GSE * mask_GS[..., None]).reshape(g * s, num_experts)
    y_ND = jnp.einsum('ne,end->nd', gate_NE.astype(x_GSD.dtype), y_END)
    return y_ND.reshape(g, s, d), jnp.zeros((), jnp.float32)


def dispatch_combine(x_GSD, mask_GS, routing: Routing, w: experts_lib.ExpertWeights, *, engine: str,
                     capacity: int, experts=None, num_experts: int | None = None,
                     grouped_matmul: str = 'auto') -> tuple[jax.Array, jax.Array]:
    """Apply the routed experts to x_GSD; returns (y_GSD, dropped_fraction).

    capacity (slots per expert per group) is used by token-choice 'einsum' and 'sort' only;
    expert choice takes C from token_GEC. `experts(w, x_GECD) -> y_GECD` runs the experts on
    capacity buffers (einsum, sort, expert choice). dropped_fraction is the fraction of real tokens'
    (token, choice) assignments that found no slot (0 for dropless, expert choice and soft).
    num_experts: the buffers' E when w holds only this device's experts (the all_to_all path,
    whose `experts` exchanges buffers between expert shards); default w's own count.
    grouped_matmul: `moe.grouped_matmul` (moejax.moe.experts.BACKENDS) for dropless groups and,
    with 'blocks', for the default `experts` on buffers.
    """
    if engine not in ENGINES:
        raise ValueError(f'engine={engine!r}: allowed {ENGINES}')
    if mask_GS is None:
        mask_GS = jnp.ones(x_GSD.shape[:2], bool)
    experts = experts or functools.partial(experts_on_buffers, backend=grouped_matmul)
    if isinstance(routing, Soft):
        return _soft(x_GSD, mask_GS, routing, w, grouped_matmul)
    if isinstance(routing, ExpertChoice):
        return _expert_choice(x_GSD, mask_GS, routing, w, engine, experts)
    num_experts = num_experts or w.w_in_EDF.shape[0]
    if engine == 'einsum':
        return _einsum_token_choice(x_GSD, mask_GS, routing, w, num_experts, capacity,
                                    experts)
    if engine == 'sort':
        return _sort_token_choice(x_GSD, mask_GS, routing, w, num_experts, capacity, experts)
    return _dropless_token_choice(x_GSD, mask_GS, routing, w, num_experts, grouped_matmul)
