"""Plan a run without allocating it: compile the train step ahead of time for the config's mesh.

Works on CPU-simulated devices (`--simulated_devices=64`), so a team can check that a real-scale
layout compiles and fits before renting the hardware. Nothing is allocated: the state and the
batch are ShapeDtypeStructs carrying their shardings.
"""
import math
import time

import jax
import jax.numpy as jnp
import numpy as np

from moejax import config as config_lib
from moejax import mesh as mesh_lib
from moejax.model import transformer as model_lib
from moejax.run import state as state_lib
from moejax.run import step as step_lib


def bytes_per_device(tree) -> int:
    """Bytes of one device's shard of every array in an abstract, sharded pytree (the max)."""
    total = 0
    for leaf in jax.tree.leaves(tree):
        shard = leaf.sharding.shard_shape(leaf.shape)
        total += math.prod(shard) * jnp.dtype(leaf.dtype).itemsize
    return total


def abstract_batch(setup) -> dict:
    d = setup.cfg.data
    spec = jax.ShapeDtypeStruct((d.batch_size, d.seq_len), jnp.int32, sharding=setup.batch_sharding)
    return {k: spec for k in ('inputs', 'targets', 'segment_ids', 'positions')}


def make_setup(cfg):
    """Validate cfg for the current devices and trace its model abstractly (nothing compiled)."""
    config_lib.validate(cfg, jax.device_count())
    return state_lib.make_setup(cfg, mesh_lib.make_mesh(cfg.mesh))


def compile_step(setup):
    """The train step training would run, compiled with abstract (sharded, unallocated) state
    and batch."""
    step, _ = step_lib.compile_steps(setup)
    return step.lower(setup.abstract_state, abstract_batch(setup)).compile()


def state_bytes(setup) -> dict:
    """Bytes per device of the parameters and the optimizer state (known before compiling)."""
    state = setup.abstract_state
    return {'params_bytes_per_device': bytes_per_device(state.params),
            'opt_state_bytes_per_device': bytes_per_device(state.opt_state)}


def memory(setup, compiled) -> dict:
    """Bytes per device: parameters, optimizer state, the step's temporaries, and their total."""
    figures = state_bytes(setup)
    analysis = compiled.memory_analysis()
    temp = int(analysis.temp_size_in_bytes) if analysis else None
    figures['temp_bytes_per_device'] = temp
    figures['total_bytes_per_device'] = (sum(figures.values()) if temp is not None else None)
    return figures


def plan(cfg) -> dict:
    """Compile the train step for cfg on the current devices; return sizes and FLOPs."""
    start = time.time()
    setup = make_setup(cfg)
    compiled = compile_step(setup)
    counts = model_lib.param_counts(cfg)
    tokens = cfg.data.batch_size * cfg.data.seq_len
    return {
        'params': counts['params'],
        'active_params': counts['active_params'],
        'params_counted': int(sum(np.prod(x.shape)
                                  for x in jax.tree.leaves(setup.abstract_state.params))),
        'devices': jax.device_count(),
        'mesh': config_lib.mesh_shape(cfg.mesh, jax.device_count()),
        **memory(setup, compiled),
        'flops_per_step': model_lib.flops_per_token(cfg) * tokens,
        'compiled_flops_per_device': _compiled_flops(compiled),
        'compile_seconds': round(time.time() - start, 1),
    }


def _compiled_flops(compiled) -> float | None:
    """XLA's own FLOP count of one device's program, where the backend reports it."""
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    return float(cost['flops']) if cost and 'flops' in cost else None
