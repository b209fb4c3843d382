"""What the benchmark scripts share: the repository on sys.path, the machine, configs by path."""
import importlib.util
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
