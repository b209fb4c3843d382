"""The device mesh from cfg.mesh, and multi-host initialisation of jax.distributed."""
import functools
import os

import jax
import numpy as np
from jax.sharding import AxisType, Mesh

from moejax import config as config_lib
from moejax.config import MESH_AXES


def make_mesh(mesh_cfg, devices=None) -> Mesh:
    """A (data, fsdp, expert, tensor) mesh with Auto axes, so GSPMD propagates shardings."""
    devices = jax.devices() if devices is None else devices
    shape = config_lib.mesh_shape(mesh_cfg, len(devices))
    sizes = tuple(shape[a] for a in MESH_AXES)
    if devices is jax.devices() or len(devices) == jax.device_count():
        # Lets JAX order devices for the physical topology (ICI rings on TPU, NVLink on GPU).
        return jax.make_mesh(sizes, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES),
                             devices=devices)
    return Mesh(np.asarray(devices).reshape(sizes), MESH_AXES,
                axis_types=(AxisType.Auto,) * len(MESH_AXES))


def init_distributed(coordinator: str | None = None, num_processes: int | None = None,
                     process_id: int | None = None) -> None:
    """Start jax.distributed when this is one process of many.

    Explicit flags win; otherwise MOEJAX_COORDINATOR/MOEJAX_NUM_PROCESSES/MOEJAX_PROCESS_ID
    (set by launch/local_cluster.py), then JAX's own cluster detection (SLURM with several
    tasks, TPU pods; MOEJAX_DISTRIBUTED=auto forces it, as launch/tpu_pod_train.sh does).
    A single process with nothing set does nothing.
    """
    coordinator = coordinator or os.environ.get('MOEJAX_COORDINATOR')
    if num_processes is None and 'MOEJAX_NUM_PROCESSES' in os.environ:
        num_processes = int(os.environ['MOEJAX_NUM_PROCESSES'])
    if process_id is None and 'MOEJAX_PROCESS_ID' in os.environ:
        process_id = int(os.environ['MOEJAX_PROCESS_ID'])
    if coordinator:
        # Collectives between CPU processes (simulated clusters); other backends ignore it.
        # Querying the backend here would start it too early, so set it unconditionally.
        jax.config.update('jax_cpu_collectives_implementation', 'gloo')
        jax.distributed.initialize(coordinator, num_processes=num_processes,
                                   process_id=process_id)
    elif _in_managed_cluster():
        jax.distributed.initialize()


def _in_managed_cluster() -> bool:
    """SLURM with several tasks, or a multi-host TPU pod: JAX can auto-detect these."""
    if os.environ.get('MOEJAX_DISTRIBUTED') == 'auto':
        return True
    if int(os.environ.get('SLURM_NTASKS', '1')) > 1:
        return True
    return bool(os.environ.get('TPU_WORKER_HOSTNAMES', '').count(','))


def traced_in(mesh: Mesh, fn):
    """fn, traced with `mesh` as the context mesh: sharding constraints and the all_to_all
    shard_map need it, and jit does not set it from in_shardings (use jit(traced_in(mesh, f)))."""
    @functools.wraps(fn)
    def traced(*args, **kwargs):
        with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
            return fn(*args, **kwargs)
    return traced
