"""GPU XLA flags merge into the user's XLA_FLAGS without overriding any flag they set."""
import os
import subprocess
import sys

from moejax import xla_flags


def test_merge_keeps_every_user_flag_and_adds_the_rest():
    user = ('--xla_gpu_enable_triton_gemm=true --xla_dump_to=/tmp/d '
            '--xla_gpu_all_reduce_combine_threshold_bytes=1')
    defaults = {'xla_gpu_enable_triton_gemm': 'false',
                'xla_gpu_enable_latency_hiding_scheduler': 'true',
                'xla_gpu_all_reduce_combine_threshold_bytes': '1073741824',
                'xla_gpu_enable_command_buffer': ''}
    tokens = xla_flags.merged(user, defaults).split()
    assert tokens[:3] == user.split()  # the user's flags first, untouched
    assert tokens[3:] == ['--xla_gpu_enable_latency_hiding_scheduler=true',
                          '--xla_gpu_enable_command_buffer=']
    assert xla_flags.merged('', {'a': '1'}) == '--a=1'
    # A bare boolean flag (no '=value') counts as set, too.
    assert xla_flags.merged('--a', {'a': 'false', 'b': '2'}) == '--a --b=2'


def test_gpu_flags_only_when_the_run_targets_a_gpu(monkeypatch):
    monkeypatch.setenv('XLA_FLAGS', '--xla_gpu_enable_triton_gemm=true')
    assert not xla_flags.set_gpu_flags()  # tests run with JAX_PLATFORMS=cpu
    assert xla_flags.targets_gpu() is False
    assert os.environ['XLA_FLAGS'] == '--xla_gpu_enable_triton_gemm=true'
    monkeypatch.setattr(xla_flags, 'targets_gpu', lambda: True)
    assert xla_flags.set_gpu_flags()
    tokens = os.environ['XLA_FLAGS'].split()
    assert tokens[0] == '--xla_gpu_enable_triton_gemm=true'
    assert '--xla_gpu_enable_triton_gemm=false' not in tokens
    assert '--xla_gpu_enable_latency_hiding_scheduler=true' in tokens


def start_backend(flags: str) -> subprocess.CompletedProcess:
    """A fresh process that starts the CPU backend with these XLA_FLAGS (the installed jaxlib
    parses every flag, GPU ones included, and aborts on one it does not know)."""
    env = dict(os.environ, JAX_PLATFORMS='cpu', XLA_FLAGS=flags)
    return subprocess.run([sys.executable, '-c', 'import jax; jax.devices()'], env=env,
                          capture_output=True, text=True, timeout=120)


def test_the_installed_jaxlib_accepts_every_gpu_flag():
    assert start_backend(xla_flags.merged('', xla_flags.GPU_FLAGS)).returncode == 0
    made_up = start_backend('--xla_gpu_enable_made_up_speedup=true')
    assert made_up.returncode != 0 and 'xla_gpu_enable_made_up_speedup' in made_up.stderr
