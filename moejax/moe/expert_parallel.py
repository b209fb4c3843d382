"""Expert parallelism by hand: shard_map over the mesh, tokens moved to their experts' devices.

After routing, each device takes its own groups (split over the batch axes data, fsdp, expert)
and the experts' weights of its 'expert' shard. Two exchanges over the 'expert' axis:
- buffers (capacity engines 'einsum', 'sort' under moe.comm='all_to_all'): each device
  dispatches its groups into capacity buffers x_gECD; an all_to_all splits E and concatenates
  groups ([n*g, E/n, C, D]), so every device holds the slots of its own E/n experts from the n
  devices of its expert row; the local FFNs run; an all_to_all brings them back to combine.
- ragged (dropless, moe.comm 'auto' or 'all_to_all'): each device sorts its (token, choice)
  pairs by expert and sends each pair's row to the device of its expert with a ragged
  all-to-all (moejax.moe.ragged) into a buffer of moe.ep_buffer_factor x the rows a balanced
  router sends (<= 0: the worst case, nothing drops); the local experts' grouped matmul runs on
  the received rows only, and the results come back the same way. Rows past a full buffer are
  dropped and counted (dropped_fraction, tokens_left_behind).
The router runs outside, under GSPMD, on the global batch: routing losses, statistics and router
noise are then exactly those of one device. F may be split over 'tensor': each shard holds a
partial sum of w_out, added up (psum) before the rows go back.
"""
import functools
import math

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from moejax import sharding
from moejax.errors import ConfigError
from moejax.moe import dispatch, experts, grouped, ragged
from moejax.moe.routing import Routing, Soft, TokenChoice

EXPERT_AXIS = 'expert'
COMMS = ('auto', 'gspmd', 'all_to_all')


def expert_axis_size() -> int:
    """The size of the 'expert' axis of the mesh being traced (1 without a mesh, or inside a
    shard_map already)."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or mesh.manual_axes:
        return 1
    return dict(mesh.shape).get(EXPERT_AXIS, 1)


def path(moe_cfg, route: Routing, expert_axis: int | None = None) -> str:
    """How the experts meet their tokens: 'gspmd' (sharding constraints; XLA inserts the
    collectives), 'buffers' or 'ragged' (this module). Soft routing sends every token to every
    expert and stays on GSPMD; dropless needs the ragged exchange on an expert axis > 1, since
    GSPMD cannot split a grouped matmul by expert and would gather every expert's weights to
    each device (2.7 TB for Mixtral) instead of moving the tokens."""
    expert_axis = expert_axis_size() if expert_axis is None else expert_axis
    if expert_axis <= 1 or isinstance(route, Soft):
        return 'gspmd'
    if moe_cfg.dispatch == 'dropless':
        if moe_cfg.comm == 'gspmd':
            raise ConfigError('moe.comm', 'gspmd', "dropless routing on mesh.expert > 1 needs "
                              "the ragged exchange (GSPMD would gather every expert's weights "
                              "to each device): use 'auto' or 'all_to_all'")
        return 'ragged'
    return 'buffers' if moe_cfg.comm == 'all_to_all' else 'gspmd'


def _mesh_axes(mesh, logical: str) -> tuple[str, ...]:
    """The mesh axes (present in `mesh`) that the rules table maps a logical name to."""
    entry = sharding.logical_to_spec((logical,))[0]
    entry = () if entry is None else (entry,) if isinstance(entry, str) else tuple(entry)
    return tuple(a for a in entry if a in mesh.axis_names)


def _sharded(local, x_GSD, mask_GS, route: Routing, w: experts.ExpertWeights, out_specs):
    """local(x_gSD, mask_gS, route_g, w_local, batch_axes, tensor_axes) in shard_map: each
    device's groups and its expert shard's weights (F split over 'tensor' when it is)."""
    mesh = jax.sharding.get_abstract_mesh()
    batch_axes, tensor_axes = _mesh_axes(mesh, 'batch'), _mesh_axes(mesh, 'mlp')
    shards = math.prod(mesh.shape[a] for a in batch_axes)
    if x_GSD.shape[0] % shards:
        raise ConfigError('moe.group_size', x_GSD.shape[1], (
            f'expert parallelism: the {x_GSD.shape[0]} routing groups must divide by the '
            f'data-parallel size {shards} ({"*".join(batch_axes)}); change moe.group_size or '
            'data.batch_size'))
    if EXPERT_AXIS not in batch_axes:
        raise ValueError(f"expert parallelism needs the batch sharded over '{EXPERT_AXIS}'")
    groups, mlp = P(batch_axes), tensor_axes or None
    w_specs = experts.ExpertWeights(P(EXPERT_AXIS, None, mlp),
                                    None if w.w_gate_EDF is None else P(EXPERT_AXIS, None, mlp),
                                    P(EXPERT_AXIS, mlp, None))
    # Losses and statistics stay outside: they were computed on the global batch.
    route = route._replace(losses={}, stats={})
    body = functools.partial(local, batch_axes=batch_axes, tensor_axes=tensor_axes)
    return jax.shard_map(body, mesh=mesh, in_specs=(groups, groups, groups, w_specs),
                         out_specs=out_specs(groups))(x_GSD, mask_GS, route, w)


# ---- capacity buffers -------------------------------------------------------------------------

def dispatch_combine(x_GSD, mask_GS, route: Routing, w: experts.ExpertWeights, *,
                     engine: str, capacity: int,
                     grouped_matmul: str = 'auto') -> tuple[jax.Array, jax.Array]:
    """dispatch.dispatch_combine's result for a capacity engine, with its buffers exchanged
    by all_to_all over 'expert'; returns (y_GSD, dropped_fraction)."""
    num_experts = w.w_in_EDF.shape[0]
    k = route.expert_GSK.shape[-1] if isinstance(route, TokenChoice) else 1

    def local(x_gSD, mask_gS, route_g, w_local, *, batch_axes, tensor_axes):
        run = functools.partial(_exchange_buffers, tensor_axes=tensor_axes,
                                backend=grouped_matmul)
        y_gSD, dropped = dispatch.dispatch_combine(
            x_gSD, mask_gS, route_g, w_local, engine=engine, capacity=capacity,
            experts=run, num_experts=num_experts, grouped_matmul=grouped_matmul)
        # Global fraction = sum of dropped assignments / sum of routed ones (not a mean of means).
        routed = jnp.sum(mask_gS.astype(jnp.float32)) * k
        totals = jax.lax.psum(jnp.stack([dropped * routed, routed]), batch_axes)
        return y_gSD, totals[0] / jnp.maximum(totals[1], 1.0)
    return _sharded(local, x_GSD, mask_GS, route, w, lambda groups: (groups, P()))


def _exchange_buffers(w_local: experts.ExpertWeights, x_gECD, *, tensor_axes, backend):
    """The `experts` step inside shard_map: send slots to their experts' devices, run, return."""
    x_nLCD = jax.lax.all_to_all(x_gECD, EXPERT_AXIS, split_axis=1, concat_axis=0, tiled=True)
    n, l, c, d = x_nLCD.shape
    x_LMD = jnp.swapaxes(x_nLCD, 0, 1).reshape(l, n * c, d)  # the E/n local experts (L)
    y_LMD = experts.expert_ffn(w_local, x_LMD, backend)
    y_nLCD = jnp.swapaxes(y_LMD.reshape(l, n, c, d), 0, 1)
    if tensor_axes:
        y_nLCD = jax.lax.psum(y_nLCD, tensor_axes)
    return jax.lax.all_to_all(y_nLCD, EXPERT_AXIS, split_axis=0, concat_axis=1, tiled=True)


# ---- ragged rows ------------------------------------------------------------------------------

def buffer_rows(pairs: int, num_experts: int, top_k: int, devices: int, factor: float) -> int:
    """Receive-buffer rows per device: factor x the `pairs` a device sends (what it receives
    when routing is balanced); factor <= 0, or more than that: the worst case, every device's
    pairs for this device's experts (a token's k choices are distinct experts, so at most
    min(k, E/n) of them land on one device)."""
    worst = devices * (pairs // top_k) * min(top_k, num_experts // devices)
    return worst if factor <= 0 else min(worst, math.ceil(round(factor * pairs, 6)))


def ragged_dispatch_combine(x_GSD, mask_GS, route: Routing, w: experts.ExpertWeights, *,
                            buffer_factor: float,
                            grouped_matmul: str = 'auto') -> tuple[jax.Array, jax.Array]:
    """Dropless routing under expert parallelism; returns (y_GSD, keep_GSK): which (token,
    choice) pairs reached their expert (False where a full buffer dropped them, or padding)."""
    num_experts = w.w_in_EDF.shape[0]

    def local(x_gSD, mask_gS, route_g, w_local, *, batch_axes, tensor_axes):
        del batch_axes
        g, s, k = route_g.expert_GSK.shape
        d = x_gSD.shape[-1]
        valid_NK = jnp.broadcast_to(mask_gS.reshape(g * s, 1), (g * s, k))
        # This device's pairs in rows sorted by global expert (block 1: no padding).
        lay = grouped.sorted_layout(route_g.expert_GSK.reshape(-1), valid_NK.reshape(-1),
                                    num_experts, 1)
        x_RD = grouped.gather_rows(x_gSD.reshape(g * s, d), lay.pair_P // k, lay.filled_P,
                                   lay.row_N.reshape(g * s, k), valid_NK)
        devices = jax.lax.axis_size(EXPERT_AXIS)
        rows = buffer_rows(g * s * k, num_experts, k, devices, buffer_factor)
        x_BD, sizes_L, exchange = ragged.send_rows(x_RD, lay.group_sizes_E, buffer_rows=rows,
                                                   axis_name=EXPERT_AXIS)
        y_BD = _local_grouped_ffn(w_local, x_BD, sizes_L, grouped_matmul)
        if tensor_axes:
            y_BD = jax.lax.psum(y_BD, tensor_axes)
        y_RD = ragged.return_rows(y_BD, exchange, num_rows=x_RD.shape[0], axis_name=EXPERT_AXIS)
        kept_R = lay.filled_P & ~exchange.dropped_R
        keep_N = valid_NK.reshape(-1) & kept_R[lay.row_N]
        y_AD = grouped.gather_rows(y_RD, lay.row_N, keep_N, lay.pair_P[:, None],
                                   kept_R[:, None])
        weight_NK = (route_g.gate_GSK.reshape(g * s, k) * keep_N.reshape(g * s, k)).astype(
            x_gSD.dtype)
        y_ND = jnp.einsum('nk,nkd->nd', weight_NK, y_AD.reshape(g * s, k, d))
        return y_ND.reshape(g, s, d), keep_N.reshape(g, s, k)
    return _sharded(local, x_GSD, mask_GS, route, w, lambda groups: (groups, groups))


def _local_grouped_ffn(w_local: experts.ExpertWeights, x_BD, sizes_L, backend: str):
    """The local experts' FFN on the received rows (expert-major, the empty tail last). The
    kernels take the groups as they are; the CPU block loops need each group padded to a
    multiple of their block, so there the rows go through a padded layout and back."""
    blocks = experts.layout_blocks(backend)
    if not blocks:
        return experts.grouped_ffn(w_local, x_BD, sizes_L, backend)
    num_local, num_rows = sizes_L.shape[0], x_BD.shape[0]
    ends_L = jnp.cumsum(sizes_L)
    row_B = jnp.arange(num_rows, dtype=jnp.int32)
    label_B = jnp.searchsorted(ends_L, row_B, side='right').astype(jnp.int32)
    used_B = row_B < ends_L[-1]
    lay = grouped.sorted_layout(jnp.minimum(label_B, num_local - 1), used_B, num_local,
                                blocks[-1])
    x_PD = grouped.gather_rows(x_BD, lay.pair_P, lay.filled_P, lay.row_N[:, None],
                               used_B[:, None])
    y_PD = experts.grouped_ffn(w_local, x_PD, lay.group_sizes_E, backend)
    return grouped.gather_rows(y_PD, lay.row_N, used_B, lay.pair_P[:, None],
                               lay.filled_P[:, None])
