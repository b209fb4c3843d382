"""Small shared helpers for the tests: tiny configs and running the command line."""
import contextlib
import os
import shutil
import subprocess
import sys

import jax.numpy as jnp
import pytest
from flax import nnx

from configs import default
from moejax.moe import routing

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODEL_KEYS = ('d_model', 'num_layers', 'num_heads', 'num_kv_heads', 'd_ff', 'max_len', 'dtype',
              'moe_every', 'activation', 'head_dim', 'qkv_bias', 'qk_norm', 'norm_eps',
              'dense_layers')


def tiny_config(**overrides):
    """configs/default.py:tiny, with flat overrides routed to model.* or moe.* by name."""
    cfg = default.get_config('tiny')
    for key, value in overrides.items():
        group = cfg.model if key in MODEL_KEYS else cfg.moe
        setattr(group, key, value)
    return cfg


def moe_cfg(**overrides):
    """A complete moe group (configs/default.py's) made small, for routing tests."""
    cfg = default.get_config().moe
    cfg.update(dict(num_experts=4, router='top_k', top_k=1, capacity_factor=1.0,
                    eval_capacity_factor=2.0, balance='aux_loss', aux_loss_weight=0.01,
                    z_loss_weight=1e-3, jitter=0.0, bias_update_rate=1e-3))
    cfg.update(overrides)
    return cfg


def route(logits, *, k, mask=None, **conv):
    """top_k routing of chosen logits [G, S, E] through a Router whose w_DE is the identity."""
    logits = jnp.asarray(logits, jnp.float32)
    router = routing.Router(logits.shape[-1], moe_cfg(num_experts=logits.shape[-1], top_k=k,
                                                      **conv), rngs=nnx.Rngs(0))
    router.w_DE[...] = jnp.eye(logits.shape[-1])
    return router(logits, mask, train=False, rng=None)


def run_cli(script: str, *args, env=None, timeout=600):
    """Run launch/<script>.py in a fresh process with 8 CPU devices; returns CompletedProcess."""
    full_env = dict(os.environ, JAX_PLATFORMS='cpu', PYTHONUNBUFFERED='1',
                    XLA_FLAGS='--xla_force_host_platform_device_count=8', **(env or {}))
    cmd = [sys.executable, os.path.join(REPO, 'launch', f'{script}.py'), *args]
    return subprocess.run(cmd, cwd=REPO, env=full_env, capture_output=True, text=True,
                          timeout=timeout)


@contextlib.contextmanager
def mounted_tmpfs(path, size: str = '64k', read_only: bool = False):
    """A small (or read-only) filesystem at path: a tmpfs, where root may mount one; else the
    test is skipped (permission bits do not bind root, and RLIMIT_FSIZE only binds a child)."""
    os.makedirs(path)
    options = f'size={size}' + (',ro' if read_only else '')
    if os.geteuid() != 0 or not shutil.which('mount') or subprocess.run(
            ['mount', '-t', 'tmpfs', '-o', options, 'tmpfs', str(path)],
            capture_output=True).returncode:
        pytest.skip('needs root and a mountable tmpfs')
    try:
        yield path
    finally:
        subprocess.run(['umount', str(path)], check=False)
