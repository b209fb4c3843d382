"""Logical axis names -> mesh axes: one rules table, and shardings for whole pytrees.

Parameters and key activations carry logical names ('exp', 'embed', 'mlp', ...). Only this
module knows how those names map onto the mesh axes (data, fsdp, expert, tensor), so a layout
change is a change of rules, never of model code.
"""
from typing import Sequence

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import PartitionSpec as P

# Parameters carry logical names as metadata only; jit applies the shardings (moejax.run.state),
# so building a layer or a block alone needs no mesh.
nnx.use_eager_sharding(False)

# logical name -> mesh axis, tuple of mesh axes, or None (replicated).
# Parameter names first, then activation names (prefixed 'act_' where they differ from the
# parameter they meet, so that e.g. a weight's 'embed' can be fsdp-sharded while the
# activation's embed dim stays whole).
# As in MaxText, a non-expert weight is fully sharded over fsdp and expert together (outside the
# MoE block the expert axis is data parallelism); an array's dim gets only the mesh axes no
# earlier dim of it took (logical_to_spec), so expert weights [exp, embed, mlp] keep 'expert' on
# exp and 'fsdp' on embed, and MLA's [embed, q_lora] splits embed alone.
DEFAULT_RULES: tuple[tuple[str, str | tuple[str, ...] | None], ...] = (
    # parameters
    ('exp', 'expert'),
    ('embed', ('fsdp', 'expert')),
    ('q_lora', ('fsdp', 'expert')),  # MLA's low-rank dims (moejax/model/mla.py)
    ('kv_lora', ('fsdp', 'expert')),
    ('mlp', 'tensor'),
    ('heads', 'tensor'),
    ('kv_heads', 'tensor'),
    ('head_dim', None),
    ('vocab', 'tensor'),
    ('router', None),  # the router's expert dim: small, replicated
    ('layers', None),  # the stacked-layers axis of a scanned model (model.scan_layers)
    # activations
    ('batch', ('data', 'fsdp', 'expert')),
    ('length', None),
    ('act_embed', None),
    ('act_mlp', 'tensor'),
    ('act_heads', 'tensor'),
    ('act_vocab', 'tensor'),
    # inside the MoE block, after dispatch: experts over 'expert', groups over the rest
    ('act_exp', 'expert'),
    ('expert_group', ('data', 'fsdp')),
    ('capacity', None),
)


def logical_to_spec(logical: Sequence[str | None]) -> P:
    """PartitionSpec for a tuple of logical axis names; unknown names and None replicate.

    A mesh axis may appear once per spec: each dim keeps only the axes of its rule that no
    earlier dim took (None when none are left)."""
    table, used, entries = dict(DEFAULT_RULES), set(), []
    for name in logical:
        entry = table.get(name) if name is not None else None
        axes = () if entry is None else (entry,) if isinstance(entry, str) else entry
        free = tuple(a for a in axes if a not in used)
        used.update(free)
        entries.append(None if not free else free[0] if len(free) == 1 else free)
    return P(*entries)


def fit_spec(spec: P, shape, mesh_shape) -> P:
    """spec with each dim's mesh axes cut to the longest leading run whose product divides the
    dim, so a width too small for its rule is split over fewer axes (a tiny model's 12-channel
    MLA latent over fsdp 2 x expert 4 keeps fsdp) instead of failing."""
    entries = []
    for entry, size in zip(spec, shape):
        axes = () if entry is None else (entry,) if isinstance(entry, str) else tuple(entry)
        keep, prod = [], 1
        for axis in axes:
            prod *= mesh_shape.get(axis, 1)
            if size % prod:
                break
            keep.append(axis)
        entries.append(None if not keep else keep[0] if len(keep) == 1 else tuple(keep))
    return P(*entries)


def tree_specs(logical_tree):
    """Map a pytree of logical PartitionSpecs (as nnx.get_partition_spec gives) to mesh specs."""
    return jax.tree.map(lambda spec: logical_to_spec(tuple(spec)), logical_tree,
                        is_leaf=lambda x: isinstance(x, P))


def constrain(x: jax.Array, logical: Sequence[str | None]) -> jax.Array:
    """Sharding constraint by logical names; a no-op outside a mesh context (one device)."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or mesh.size == 1:
        return x
    spec = logical_to_spec(logical)
    # Drop mesh axes the current mesh lacks or has at size 1, so one rules table fits every mesh,
    # and axes that are manual here (inside shard_map, where each device sees its own shard).
    names = set(a for a in mesh.axis_names if mesh.shape[a] > 1 and a not in mesh.manual_axes)
    if not names:
        return x
    def keep(entry):
        if entry is None:
            return None
        axes = tuple(a for a in ((entry,) if isinstance(entry, str) else entry) if a in names)
        return axes or None
    return jax.lax.with_sharding_constraint(x, P(*(keep(e) for e in spec)))


def param(rngs: nnx.Rngs, shape, logical, fan_in: int, scale: float = 1.0) -> nnx.Param:
    """A float32 weight with its logical axis names, drawn from a truncated normal with std
    scale / sqrt(fan_in)."""
    init = nnx.initializers.truncated_normal(stddev=scale / fan_in ** 0.5)
    return nnx.Param(init(rngs.params(), shape, jnp.float32), out_sharding=logical)
