"""Devices of an accelerator this host may not have, for the dry run and the planner's --target.

- TPU: libtpu (`pip install "moejax[tpu]"`) describes any slice's topology from a CPU host
  (jax.experimental.topologies, as MaxText's train_compile does): the train step compiles for
  it, and memory_analysis() reports the TPU program's bytes per chip.
- GPU: the CUDA plugin (`pip install "moejax[cuda]"`) builds compile-only devices from a GPU
  description (a GpuTargetConfigProto written here from each GPU's facts) with JAX_PLATFORMS=cpu:
  the step compiles to a CUDA executable, with its memory per GPU.
- Without the plugin the step is only lowered, for an abstract device of that kind: the plan
  names the kernels the program holds but has no compiled memory figures.
Implementation choices follow the traced mesh's devices (moejax.target.platform), so the program
planned is the program the accelerator would run.
"""
import contextlib
import dataclasses
import importlib.util
import math
import os

import jax
import numpy as np
from jax.sharding import AbstractDevice, AbstractMesh, Mesh

from moejax import errors, target, xla_flags
from moejax.config import MESH_AXES
from moejax.errors import ConfigError

# GPU facts beyond target.CHIPS that XLA's GPU compiler reads (from the vendors' spec sheets).
GPU_SPECS = {
    'gpu-h100': dict(name='NVIDIA H100 80GB HBM3', major=9, memory=84942979072,
                     l2=52428800, clock=1.98, bandwidth=3352320000000),
    'gpu-h200': dict(name='NVIDIA H200 141GB HBM3e', major=9, memory=151397597184,
                     l2=52428800, clock=1.98, bandwidth=4800000000000),
    'gpu-b200': dict(name='NVIDIA B200', major=10, memory=191514411008, l2=132644864,
                     clock=1.965, bandwidth=7672320000000),
}
GPUS_PER_HOST = 8
TPU_SLICE_CHIPS = {'v5p': 8960, 'v6e': 256, 'v5e': 256, 'v4': 4096}
KERNELS = {  # text in a lowered or compiled program -> what it is
    'triton': 'Pallas Triton (flash attention)', 'mosaic_gpu': "tokamax's Mosaic GPU ragged_dot",
    'tpu_custom_call': 'Pallas Mosaic TPU (splash attention, grouped matmul)',
    'ragged_all_to_all': 'ragged all-to-all (expert exchange)',
    'ragged-all-to-all': 'ragged all-to-all (expert exchange)',
}


@dataclasses.dataclass
class TargetDevices:
    chip: target.Chip
    devices: list | None  # compile-only devices; None: lower only, on an abstract device
    how: str              # what was built, or why only lowering is possible


def chip(name: str) -> target.Chip:
    if name not in target.CHIPS:
        raise ConfigError('--target', name, 'known: ' + ', '.join(sorted(target.CHIPS)))
    return target.CHIPS[name]


def tpu_topology(family: str, count: int) -> tuple[str, int]:
    """(libtpu topology string, slices) for `count` chips: 3-D tori for v4/v5p (2x2x1, 2x2x2,
    2x2x4, 2x4x4, 4x4x4, ...), 2-D for v5e/v6e (2x2, 2x4, 4x4, ...), whole slices beyond one."""
    if count < 4 or count & (count - 1):
        raise ConfigError('--devices', count, f'a {family} slice has a power of 2 chips >= 4')
    slices = max(1, count // TPU_SLICE_CHIPS[family])
    per_slice = count // slices
    dims = [1, 1, 1] if family in ('v4', 'v5p') else [1, 1]
    dims[0] = dims[1] = 2
    while math.prod(dims) < per_slice:
        dims[dims.index(min(dims))] *= 2
    return f'{family}:{"x".join(map(str, sorted(dims)))}', slices


def gpu_target_config(name: str) -> str:
    """A GpuTargetConfigProto (text) describing one GPU of `name`, for XLA's GPU compiler."""
    c, s = target.CHIPS[name], GPU_SPECS[name]
    return f'''gpu_device_info {{
  threads_per_block_limit: 1024 threads_per_warp: 32 shared_memory_per_block: 49152
  shared_memory_per_core: 233472 threads_per_core_limit: 2048 core_count: {c.cores}
  fpus_per_core: 128 block_dim_limit_x: 2147483647 block_dim_limit_y: 65535
  block_dim_limit_z: 65535 memory_bandwidth: {s['bandwidth']} l2_cache_size: {s['l2']}
  clock_rate_ghz: {s['clock']} device_memory_size: {s['memory']}
  shared_memory_per_block_optin: 232448
  cuda_compute_capability {{ major: {s['major']} feature_extension: ACCELERATED_FEATURES }}
  registers_per_core_limit: 65536 registers_per_block_limit: 65536 thread_dim_limit_x: 1024
  thread_dim_limit_y: 1024 thread_dim_limit_z: 64 device_vendor: "NVIDIA Corporation"
  platform_version: "Compute Capability {s['major']}.0a" device_address_bits: 64
  ecc_enabled: true name: "{s['name']}" collective_memory_granularity: 2097152
}}
platform_name: "CUDA"
dnn_version_info {{ major: 9 minor: 7 }}
device_description_str: "{s['name']}"
'''


def target_devices(name: str, count: int) -> TargetDevices:
    """Compile-only devices of `count` chips of the target, or why there are none."""
    c = chip(name)
    from jax.experimental import topologies
    try:
        if c.platform == 'tpu':
            topology, slices = tpu_topology(c.topology, count)
            desc = topologies.get_topology_desc(topology, 'tpu', num_slices=slices)
            how = f'compiled for TPU topology {topology}' + (f' x {slices} slices' * (slices > 1))
        else:
            if name not in GPU_SPECS:
                raise RuntimeError(f'moejax has no compile-only description of {c.device_kind} '
                                   f'(only {", ".join(GPU_SPECS)})')
            if not any(importlib.util.find_spec(p) for p in xla_flags.CUDA_PLUGINS):
                raise RuntimeError('the CUDA plugin is not installed')
            if (jax.config.jax_platforms or os.environ.get('JAX_PLATFORMS', '')) != 'cpu':
                raise RuntimeError('the CUDA plugin builds compile-only GPUs only when the '
                                   'host backend is the CPU (JAX_PLATFORMS=cpu)')
            hosts = max(1, count // GPUS_PER_HOST)
            desc = topologies.get_topology_desc(
                '', 'cuda', target_config=gpu_target_config(name),
                topology=f'1x{hosts}x{count // hosts}')
            how = f'compiled for {hosts} x {count // hosts} {c.device_kind} (CUDA plugin)'
    except ConfigError:
        raise
    except Exception as err:  # noqa: BLE001 - no libtpu / CUDA plugin: lower only
        extra = 'tpu' if c.platform == 'tpu' else 'cuda'
        reason = str(err).strip().splitlines()[0][:160] if str(err).strip() else type(err).__name__
        return TargetDevices(c, None, f'lowered only (no compile for {name} on this host: '
                             f'{reason}; pip install "moejax[{extra}]" to compile)')
    if len(desc.devices) != count:
        raise ConfigError('--devices', count, f'{name} gives {len(desc.devices)} devices here')
    return TargetDevices(c, list(desc.devices), how)


def abstract_mesh(mesh_shape: dict, c: target.Chip) -> AbstractMesh:
    """A mesh of abstract devices of the chip (for lowering where nothing can compile)."""
    device = AbstractDevice(GPU_SPECS.get(c.name, {}).get('name', c.device_kind), c.cores,
                            c.platform)
    sizes = tuple(mesh_shape[a] for a in MESH_AXES)
    return AbstractMesh(sizes, MESH_AXES, axis_types=(jax.sharding.AxisType.Auto,) * len(sizes),
                        abstract_device=device)


def concrete_mesh(mesh_shape: dict, devices: list) -> Mesh:
    sizes = tuple(mesh_shape[a] for a in MESH_AXES)
    return Mesh(np.asarray(devices).reshape(sizes), MESH_AXES,
                axis_types=(jax.sharding.AxisType.Auto,) * len(sizes))


@contextlib.contextmanager
def tracing_for(found: TargetDevices):
    """What the kernels' own device checks need while the step is traced: tokamax picks its
    GPU kernel from the default device (a compile-only GPU here), and its kernels need its
    cross-compile switch when the host is not of the target's kind (the checks run again when
    the backward pass is traced, so the switch stays on for the whole step)."""
    with contextlib.ExitStack() as stack:
        # tokamax logs every autotuning-cache miss (no tuned configs for a chip not here)
        stack.enter_context(errors.quiet('absl'))
        if found.chip.platform == 'gpu' and found.devices:
            stack.enter_context(jax.default_device(found.devices[0]))
        tokamax = _tokamax_config()  # every target is a TPU or a GPU
        if tokamax is not None:
            stack.enter_context(tokamax.cross_compile(True))
        yield


def _tokamax_config():
    try:
        from tokamax import config  # noqa: PLC0415 - optional
        return config
    except Exception:  # noqa: BLE001
        return None


def kernels_in(text: str) -> list[str]:
    """The kernels and custom collectives a program's text holds."""
    return sorted({what for key, what in KERNELS.items() if key in text})
