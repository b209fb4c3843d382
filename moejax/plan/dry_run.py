"""Plan a run without allocating it: build the train step ahead of time for the config's mesh.

Where: the devices present (or CPU-simulated ones, `--simulated_devices=64`), or a target
accelerator (`--target=tpu-v5p`, moejax.plan.targets): a TPU slice or GPUs compiled from this
host where libtpu or the CUDA plugin is installed, else lowered for an abstract device of that
kind. Nothing is allocated: the state and the batch are ShapeDtypeStructs with their shardings.
"""
import contextlib
import dataclasses
import math
import time

import jax
import jax.numpy as jnp
import numpy as np

from moejax import config as config_lib
from moejax import mesh as mesh_lib
from moejax import target, validate
from moejax.model import transformer as model_lib
from moejax.plan import targets
from moejax.run import state as state_lib
from moejax.run import step as step_lib


@dataclasses.dataclass
class Where:
    """Where a step is built: `count` concrete devices (compiled), or a chip's abstract device
    (devices None: lowered only). found: the target's devices, None for the devices present."""
    devices: list | None
    count: int
    chip: target.Chip | None
    how: str
    found: targets.TargetDevices | None = None


def where(target_name: str | None = None, count: int | None = None) -> Where:
    """The devices present, or `count` devices of the target (see moejax.plan.targets)."""
    if not target_name:
        devices = jax.devices()
        kind = devices[0].device_kind
        return Where(devices, len(devices), target.chip_of(kind),
                     f'compiled for {len(devices)} x {kind}')
    count = count or jax.device_count()
    found = targets.target_devices(target_name, count)
    return Where(found.devices, count, found.chip, found.how, found)


@dataclasses.dataclass
class Built:
    setup: state_lib.Setup
    compiled: object | None  # None where the step was only lowered
    text: str


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


def make_setup(cfg, at: Where | None = None):
    """Validate cfg for the devices and trace its model abstractly (nothing compiled)."""
    at = at or where()
    validate.check(cfg, at.count)
    shape = config_lib.mesh_shape(cfg.mesh, at.count)
    if at.found is None:
        mesh = mesh_lib.make_mesh(cfg.mesh, at.devices)
    elif at.devices:
        mesh = targets.concrete_mesh(shape, at.devices)
    else:
        mesh = targets.abstract_mesh(shape, at.chip)
    return state_lib.make_setup(cfg, mesh)


def build_step(setup, at: Where | None = None) -> Built:
    """The train step training would run, compiled (or, with no devices, lowered) with abstract
    (sharded, unallocated) state and batch."""
    step, _ = step_lib.compile_steps(setup)
    found = at.found if at else None
    with targets.tracing_for(found) if found else contextlib.nullcontext():
        traced = step.trace(setup.abstract_state, abstract_batch(setup))
        if found is None or found.devices:
            compiled = traced.lower().compile()
            return Built(setup, compiled, compiled.as_text())
        platform = 'cuda' if found.chip.platform == 'gpu' else 'tpu'
        return Built(setup, None, traced.lower(lowering_platforms=(platform,)).as_text())


def compile_step(setup):
    """The train step compiled for the devices present (the planner's CPU-simulated path)."""
    return build_step(setup).compiled


def state_bytes(setup) -> dict:
    """Bytes per device of the parameters and the optimizer state (known before compiling)."""
    state = setup.abstract_state
    return {'params_bytes_per_device': bytes_per_device(state.params),
            'opt_state_bytes_per_device': bytes_per_device(state.opt_state)}


def memory(setup, compiled) -> dict:
    """Bytes per device: parameters, optimizer state, the step's temporaries, and their total
    (temporaries unknown, None, for a step that was only lowered)."""
    figures = state_bytes(setup)
    analysis = compiled.memory_analysis() if compiled is not None else None
    temp = int(analysis.temp_size_in_bytes) if analysis else None
    figures['temp_bytes_per_device'] = temp
    figures['total_bytes_per_device'] = (sum(figures.values()) if temp is not None else None)
    return figures


def plan(cfg, target_name: str | None = None, count: int | None = None) -> dict:
    """Build the train step for cfg where asked; return sizes per device, FLOPs, the kernels
    it holds and what was compiled or only lowered."""
    start = time.time()
    at = where(target_name, count)
    setup = make_setup(cfg, at)
    built = build_step(setup, at)
    counts = model_lib.param_counts(cfg)
    tokens = cfg.data.batch_size * cfg.data.seq_len
    figures = memory(setup, built.compiled)
    total = figures['total_bytes_per_device']
    hbm = at.chip.hbm_bytes if at.chip else None
    return {
        'target': target_name or (at.chip.name if at.chip else jax.default_backend()),
        'built': at.how, 'kernels': targets.kernels_in(built.text),
        'params': counts['params'], 'active_params': counts['active_params'],
        'params_counted': int(sum(np.prod(x.shape)
                                  for x in jax.tree.leaves(setup.abstract_state.params))),
        'devices': at.count, 'mesh': config_lib.mesh_shape(cfg.mesh, at.count), **figures,
        'device_memory_bytes': hbm,
        'fits': None if total is None or hbm is None else total <= hbm,
        'flops_per_step': model_lib.flops_per_token(cfg) * tokens,
        'compiled_flops_per_device': _compiled_flops(built.compiled),
        'compile_seconds': round(time.time() - start, 1),
    }


def _compiled_flops(compiled) -> float | None:
    """XLA's own FLOP count of one device's program, where the backend reports it."""
    cost = compiled.cost_analysis() if compiled is not None else None
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    return float(cost['flops']) if cost and 'flops' in cost else None
