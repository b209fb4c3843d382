"""Small shared helpers for the tests: tiny configs, running the command line, and what a run
leaves in its workdir."""
import contextlib
import glob
import hashlib
import json
import os
import shutil
import subprocess
import sys
import time

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from configs import default
from moejax.moe import routing
from tests import launcher

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = '--config=configs/default.py:tiny'
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
    return jitted(train=False, rng=None)(router, logits, mask)


def jitted(method: str = '__call__', **fixed):
    """module.method(*args, **kwargs, **fixed) as one compiled program, the module an argument
    (nnx.jit: its state updates come back). Eager, JAX compiles every primitive on its own (the
    tiny Transformer's forward: 3.9 s eager, 0.74 s jitted). `fixed`: the Python values that
    must stay static (train=False). A fresh jit per call of jitted(), so that no trace outlives
    a test's mock.patch or decisions.record; keep the result to reuse its programs (one per
    input shape)."""
    return nnx.jit(lambda module, *args, **kwargs: getattr(module, method)(*args, **kwargs,
                                                                           **fixed))


def cli_env(cache_dir=None) -> dict:
    """A command's environment: 8 CPU devices (beside the session's XLA_FLAGS, conftest.py),
    unbuffered output, and (cache_dir) a persistent XLA cache that keeps even the smallest
    program."""
    flags = f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count=8"
    env = dict(os.environ, JAX_PLATFORMS='cpu', PYTHONUNBUFFERED='1', XLA_FLAGS=flags.strip())
    if cache_dir:
        env.update(JAX_COMPILATION_CACHE_DIR=cache_dir,
                   JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES='0',
                   JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS='0')
    return env


def run_cli(script: str, *args, env=None, timeout=600):
    """Run launch/<script>.py in a process of its own (tests/launcher.py) with 8 CPU devices;
    returns CompletedProcess."""
    cmd = [sys.executable, os.path.join(REPO, 'launch', f'{script}.py'), *args]
    return launcher.run(cmd, cwd=REPO, env=dict(cli_env(), **(env or {})), capture_output=True,
                        text=True, timeout=timeout)


def train_command(workdir, *args) -> list[str]:
    return [sys.executable, os.path.join(REPO, 'launch', 'train.py'), f'--workdir={workdir}',
            *args]


def assert_usage_error(proc, *shown, seconds=None):
    """Exit 2, exactly one stderr line `moejax: error: ...` holding each of `shown`."""
    lines = proc.stderr.splitlines()
    assert proc.returncode == 2, f'exit {proc.returncode}\n{proc.stderr[-3000:]}'
    assert 'Traceback' not in proc.stderr
    assert len(lines) == 1 and lines[0].startswith('moejax: error: '), lines
    for text in shown:
        assert text in lines[0], (text, lines[0])
    if seconds is not None:
        assert seconds < 30, f'took {seconds:.0f}s'


def timed(script, *args):
    """run_cli(script, *args), and the seconds it took."""
    start = time.time()
    proc = run_cli(script, *args, timeout=120)
    return proc, time.time() - start


# ------------------------------------------------------------------------- a run's workdir


def snapshot(workdir, skip=()) -> dict[str, str]:
    """{relative path: sha256} of every file in the workdir (but those under `skip`)."""
    out = {}
    for path in glob.glob(os.path.join(workdir, '**'), recursive=True):
        if os.path.isfile(path) and not os.path.relpath(path, workdir).startswith(skip):
            with open(path, 'rb') as f:
                out[os.path.relpath(path, workdir)] = hashlib.sha256(f.read()).hexdigest()
    return out


def fake_run(path, config_text: str | None = None):
    """A workdir shaped like a run (config.json, checkpoints/, metrics.jsonl), nothing trained:
    the errors of the readers must come before anything is restored."""
    os.makedirs(path / 'checkpoints')
    if config_text is not None:
        (path / 'config.json').write_text(config_text)
    write_records(path / 'metrics.jsonl', load_records(3))
    return path


def load_records(num: int) -> list[dict]:
    """num metrics.jsonl records of a run with 2 MoE layers of 4 experts."""
    rng = np.random.default_rng(num)
    return [{'step': 10 * (i + 1), 'loss': 3.0 - i,
             'expert_load': rng.dirichlet(np.ones(4), size=2).tolist()} for i in range(num)]


def write_records(path, records, tail: str = '') -> None:
    """A metrics.jsonl of records, then tail (e.g. a line cut short)."""
    with open(path, 'w') as f:
        f.writelines(json.dumps(r) + '\n' for r in records)
        f.write(tail)


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
