"""The accelerator a program is built for, and the chips moejax knows.

Every implementation choice (attention kernel, grouped matmul, tokamax kernel, XLA flags) asks
`platform()` rather than `jax.default_backend()`: it is the platform of the mesh being traced,
so a train step traced over a TPU topology or an abstract GPU device from a CPU host makes the
choices the accelerator will make (the dry run and the planner's `--target`), and a real run
makes the choices of its own devices.
"""
import dataclasses

import jax


@dataclasses.dataclass(frozen=True)
class Chip:
    """One accelerator's facts from its spec sheet (dense bf16 FLOP/s, HBM, links)."""
    name: str               # the --target name
    platform: str           # 'tpu' | 'gpu'
    device_kind: str        # as jax reports device_kind (a prefix of it)
    cores: int              # SMs (GPU) or TensorCores per device (TPU)
    hbm_bytes: float
    peak_flops: float       # dense bf16
    hbm_bytes_per_s: float
    link_bytes_per_s: float  # per chip: NVLink or ICI
    topology: str = ''      # TPU: the libtpu topology family ('v5p', 'v6e')


CHIPS = {c.name: c for c in (
    Chip('tpu-v5p', 'tpu', 'TPU v5', 2, 95e9, 459e12, 2.76e12, 600e9, 'v5p'),
    Chip('tpu-v5e', 'tpu', 'TPU v5 lite', 1, 16e9, 197e12, 0.82e12, 200e9, 'v5e'),
    Chip('tpu-v6e', 'tpu', 'TPU v6 lite', 1, 32e9, 918e12, 1.64e12, 448e9, 'v6e'),
    Chip('tpu-v4', 'tpu', 'TPU v4', 2, 32e9, 275e12, 1.2e12, 300e9, 'v4'),
    Chip('gpu-a100', 'gpu', 'NVIDIA A100', 108, 80e9, 312e12, 2.04e12, 300e9),
    Chip('gpu-h100', 'gpu', 'NVIDIA H100', 132, 80e9, 989e12, 3.35e12, 450e9),
    Chip('gpu-h200', 'gpu', 'NVIDIA H200', 132, 141e9, 989e12, 4.8e12, 450e9),
    Chip('gpu-b200', 'gpu', 'NVIDIA B200', 148, 180e9, 2250e12, 8e12, 900e9),
)}
# TPU v5p reports 'TPU v5' and v5e 'TPU v5 lite': the longest matching prefix wins.
_BY_KIND = sorted(CHIPS.values(), key=lambda c: -len(c.device_kind))


def chip_of(device_kind: str) -> Chip | None:
    """The chip behind a device kind ('NVIDIA H100 80GB HBM3' -> gpu-h100), or None (CPU)."""
    return next((c for c in _BY_KIND if device_kind.startswith(c.device_kind)), None)


def _traced_device():
    mesh = jax.sharding.get_abstract_mesh()
    return None if mesh.empty else mesh.abstract_device


def platform() -> str:
    """'cpu', 'gpu' or 'tpu': of the mesh being traced when it has devices, else the default
    backend's."""
    device = _traced_device()
    if device is not None and device.platform:
        return 'gpu' if device.platform in ('gpu', 'cuda', 'rocm') else device.platform
    return jax.default_backend()


def device_kind() -> str:
    """The device kind of the mesh being traced (else of the first local device)."""
    device = _traced_device()
    return device.device_kind if device is not None else jax.local_devices()[0].device_kind


def current_chip() -> Chip | None:
    return chip_of(device_kind())
