"""What the benchmark scripts share: the repository on sys.path, the machine, configs by path."""
import importlib.util
import json
import os
import platform
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)  # moejax from this checkout; recipes import each other as configs.*


def machine() -> str:
    """The CPU model and core count (the accelerator is reported separately)."""
    try:
        with open('/proc/cpuinfo') as f:
            name = next(line.split(':', 1)[1].strip() for line in f if line.startswith('model name'))
    except (OSError, StopIteration):
        name = platform.processor() or platform.machine()
    return f'{name}, {os.cpu_count()} cores'


def load_config(spec: str):
    """get_config(variant) from a config file given as PATH[:VARIANT]."""
    path, _, variant = spec.partition(':')
    module_spec = importlib.util.spec_from_file_location('benchmark_config', path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module.get_config(variant or None)


def gpu_flags() -> bool:
    """MaxText's XLA flags when this run targets a GPU (as the train command sets them); call
    before the first JAX computation."""
    from moejax import xla_flags
    return xla_flags.set_gpu_flags()


def matmul_peak(dtype, n: int = 0):
    """A function timing one jitted n x n x n matmul in `dtype`, returning its FLOP/s: the
    measured peak of this machine (n: 2048 on CPU, 8192 on accelerators by default)."""
    import time

    import jax
    n = n or (2048 if jax.default_backend() == 'cpu' else 8192)
    a = jax.random.normal(jax.random.key(0), (n, n), dtype)
    b = jax.random.normal(jax.random.key(1), (n, n), dtype)
    fn = jax.jit(lambda a, b: a @ b)
    jax.block_until_ready(fn(a, b))

    def run() -> float:
        t0 = time.perf_counter()
        jax.block_until_ready(fn(a, b))
        return 2 * n ** 3 / (time.perf_counter() - t0)
    return run


def spec_peak() -> float | None:
    """The chip's dense bf16 FLOP/s from its spec sheet (H100/H200 989T, A100 312T, TPU v5p
    459T, v5e 197T: moejax.target.CHIPS); None where unknown (CPU)."""
    import jax

    from moejax.run import metrics
    return metrics.peak_flops(jax.devices()[0])


def save_json(result: dict, path: str, indent: int | None = None) -> None:
    """Print the result as one JSON line and write it to `path` (folders made as needed)."""
    print(json.dumps(result), flush=True)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, 'w') as f:
        f.write(json.dumps(result, indent=indent) + '\n')
