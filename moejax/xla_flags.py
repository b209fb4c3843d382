"""XLA flags for GPU speed, as MaxText sets them for its GPU recipes, merged into XLA_FLAGS.

XLA reads XLA_FLAGS once, when the backend starts, and aborts on a flag it does not know, so
the set below holds only flags this jax range (0.10-0.12) accepts, is applied only when the
run targets a GPU, and never overrides a flag the user already put in XLA_FLAGS.
"""
import importlib.util
import os

import jax

# name -> value. Overlap communication with compute (latency-hiding scheduler, pipelined and
# double-buffered collectives), combine small collectives into large ones, use cuBLAS rather
# than Triton for GEMMs, and no command buffers (CUDA graphs) around the step.
# (MaxText also disables XLA's rematerialization pass; moejax leaves it on, so a step that does
# not fit is slowed down rather than failed: model.remat is the knob meant for memory.)
GPU_FLAGS = {
    'xla_gpu_enable_latency_hiding_scheduler': 'true',
    'xla_gpu_enable_triton_gemm': 'false',
    'xla_gpu_enable_command_buffer': '',
    'xla_gpu_enable_highest_priority_async_stream': 'true',
    'xla_gpu_all_reduce_combine_threshold_bytes': '1073741824',
    'xla_gpu_all_gather_combine_threshold_bytes': '134217728',
    'xla_gpu_reduce_scatter_combine_threshold_bytes': '134217728',
    'xla_gpu_enable_pipelined_all_gather': 'true',
    'xla_gpu_enable_pipelined_reduce_scatter': 'true',
    'xla_gpu_enable_pipelined_all_reduce': 'true',
    'xla_gpu_enable_while_loop_double_buffering': 'true',
    'xla_gpu_enable_all_gather_combine_by_dim': 'false',
    'xla_gpu_enable_reduce_scatter_combine_by_dim': 'false',
}
CUDA_PLUGINS = ('jax_cuda13_plugin', 'jax_cuda12_plugin')  # what jax[cuda13] / jax[cuda12] install


def _flag_name(token: str) -> str:
    return token.lstrip('-').split('=', 1)[0]


def merged(user_flags: str, defaults: dict[str, str]) -> str:
    """The user's flags, then every default whose flag the user did not set (any value)."""
    tokens = user_flags.split()
    given = {_flag_name(t) for t in tokens}
    tokens += [f'--{name}={value}' for name, value in defaults.items() if name not in given]
    return ' '.join(tokens)


def targets_gpu() -> bool:
    """Whether JAX will start on a GPU, decided without starting a backend: the platforms the
    user asked for (JAX_PLATFORMS / jax_platforms), else whether a CUDA plugin is installed."""
    platforms = jax.config.jax_platforms or os.environ.get('JAX_PLATFORMS', '')
    if platforms:
        first = platforms.split(',')[0].strip().lower()
        return first in ('cuda', 'gpu')
    return any(importlib.util.find_spec(p) is not None for p in CUDA_PLUGINS)


def set_gpu_flags(force: bool = False) -> bool:
    """Add GPU_FLAGS to XLA_FLAGS when the run targets a GPU (force: a plan for one, compiled
    on this host); call before the first JAX computation. Returns whether they were added."""
    if not (force or targets_gpu()):
        return False
    os.environ['XLA_FLAGS'] = merged(os.environ.get('XLA_FLAGS', ''), GPU_FLAGS)
    return True
