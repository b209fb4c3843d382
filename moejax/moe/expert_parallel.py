"""Expert parallelism by hand (moe.comm='all_to_all'): shard_map + all_to_all on capacity buffers.

After routing, each device takes its own groups (split over the batch axes data, fsdp, expert)
and the experts' weights of its 'expert' shard, then:
  dispatch   its groups into capacity buffers x_gECD (g local groups, all E experts);
  all_to_all over 'expert': split E, concatenate groups -> [n*g, E/n, C, D], so every device
             holds the slots of its own E/n experts from all n devices of its expert row;
  experts    its E/n local FFNs (F may be split over 'tensor': partial sums, psum after w_out);
  all_to_all back (split groups, concatenate E) -> [g, E, C, D], and combine locally.
The router runs outside, under GSPMD, on the global batch: routing losses, statistics and router
noise are then exactly those of one device. Routing is per group, so dispatch and combine are
exact on each device's groups; the dropped fraction is reduced as a global sum / global count.

Engines: 'einsum' and 'sort' as configured. 'dropless' has no fixed-shape buffer to exchange, so
here it runs the sort engine with capacity = group size: a token's k choices are distinct
experts, so no expert can get more than S assignments from a group and nothing drops (the same
outputs as dropless, at the cost of E/k-times larger buffers). Soft routing sends every token to
every expert and stays on the GSPMD path. (jax.lax.ragged_all_to_all would avoid the padding on
GPU/TPU, but XLA:CPU does not implement it, so this padded path is the one that runs everywhere.)
"""
import functools
import math

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from moejax import sharding
from moejax.moe import dispatch, experts
from moejax.moe.routing import Routing

EXPERT_AXIS = 'expert'


def applies(moe_cfg, route: Routing) -> bool:
    """The all_to_all path runs on a mesh whose expert axis is > 1 for comm='all_to_all', and
    for dropless under any comm: GSPMD cannot shard a ragged grouped matmul by expert, so it
    would gather every expert's weights to each device (2.7 TB for Mixtral) instead of moving
    the tokens."""
    if moe_cfg.comm != 'all_to_all' and moe_cfg.dispatch != 'dropless':
        return False
    if route.gate_GSE is not None:
        return False
    mesh = jax.sharding.get_abstract_mesh()
    return (not mesh.empty and not mesh.manual_axes
            and dict(mesh.shape).get(EXPERT_AXIS, 1) > 1)


def _mesh_axes(mesh, logical: str) -> tuple[str, ...]:
    """The mesh axes (present in `mesh`) that the rules table maps a logical name to."""
    entry = sharding.logical_to_spec((logical,))[0]
    entry = () if entry is None else (entry,) if isinstance(entry, str) else tuple(entry)
    return tuple(a for a in entry if a in mesh.axis_names)


def dispatch_combine(x_GSD, mask_GS, route: Routing, w: dispatch.ExpertWeights, *,
                     engine: str, capacity: int,
                     grouped_matmul: str = 'auto') -> tuple[jax.Array, jax.Array]:
    """dispatch.dispatch_combine's result, computed with explicit all_to_all over 'expert'."""
    mesh = jax.sharding.get_abstract_mesh()
    batch_axes = _mesh_axes(mesh, 'batch')
    tensor_axes = _mesh_axes(mesh, 'mlp')
    num_groups, group_size = x_GSD.shape[:2]
    shards = math.prod(mesh.shape[a] for a in batch_axes)
    if num_groups % shards:
        raise ValueError(f'moe.comm=all_to_all: {num_groups} routing groups must divide by the '
                         f'data-parallel size {shards} ({"*".join(batch_axes)}); change '
                         f'moe.group_size or data.batch_size')
    if EXPERT_AXIS not in batch_axes:
        raise ValueError(f"moe.comm=all_to_all needs the batch sharded over '{EXPERT_AXIS}'")
    if engine == 'dropless':
        engine, capacity = 'sort', group_size  # capacity = S: nothing can drop
    num_experts = w.w_in_EDF.shape[0]
    k = route.expert_GSK.shape[-1] if route.expert_GSK is not None else 1

    def local(x_gSD, mask_gS, route_g, w_local):
        experts = functools.partial(_exchange_and_run, tensor_axes=tensor_axes,
                                    backend=grouped_matmul)
        y_gSD, dropped = dispatch.dispatch_combine(
            x_gSD, mask_gS, route_g, w_local, engine=engine, capacity=capacity,
            experts=experts, num_experts=num_experts, grouped_matmul=grouped_matmul)
        # Global fraction = sum of dropped assignments / sum of routed ones (not a mean of means).
        routed = jnp.sum(mask_gS.astype(jnp.float32)) * k
        totals = jax.lax.psum(jnp.stack([dropped * routed, routed]), batch_axes)
        return y_gSD, totals[0] / jnp.maximum(totals[1], 1.0)

    groups = P(batch_axes)
    mlp = tensor_axes or None
    w_specs = dispatch.ExpertWeights(P(EXPERT_AXIS, None, mlp),
                                     None if w.w_gate_EDF is None else P(EXPERT_AXIS, None, mlp),
                                     P(EXPERT_AXIS, mlp, None))
    # Losses and statistics stay outside: they were computed on the global batch.
    route = route._replace(losses={}, stats={})
    return jax.shard_map(local, mesh=mesh, in_specs=(groups, groups, groups, w_specs),
                         out_specs=(groups, P()))(x_GSD, mask_GS, route, w)


def _exchange_and_run(w_local: dispatch.ExpertWeights, x_gECD, *, tensor_axes, backend):
    """The `experts` step inside shard_map: send slots to their experts' devices, run, return."""
    x_nLCD = jax.lax.all_to_all(x_gECD, EXPERT_AXIS, split_axis=1, concat_axis=0, tiled=True)
    y_nLCD = _local_experts(w_local, x_nLCD, backend)  # the E/n local experts (L)
    if tensor_axes:  # F split over 'tensor': each shard holds a partial sum of w_out
        y_nLCD = jax.lax.psum(y_nLCD, tensor_axes)
    return jax.lax.all_to_all(y_nLCD, EXPERT_AXIS, split_axis=0, concat_axis=1, tiled=True)


def _local_experts(w: dispatch.ExpertWeights, x_nLCD, backend):
    """The local experts' FFN (moejax.moe.experts, as on the GSPMD path) on the slots that all n
    devices of the expert row sent them, expert dim leading."""
    n, l, c, d = x_nLCD.shape
    x_LMD = jnp.swapaxes(x_nLCD, 0, 1).reshape(l, n * c, d)
    y_LMD = experts.expert_ffn(w, x_LMD, backend)
    return jnp.swapaxes(y_LMD.reshape(l, n, c, d), 0, 1)
