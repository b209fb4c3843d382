"""Every test sees 8 CPU-simulated devices, so mesh layouts are tested without accelerators."""
import os

os.environ.setdefault('JAX_PLATFORMS', 'cpu')
import jax  # noqa: E402

jax.config.update('jax_num_cpu_devices', 8)
