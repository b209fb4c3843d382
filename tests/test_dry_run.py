"""--dry_run plans a real-scale run on CPU-simulated devices without allocating it.

The full Mixtral 8x7B (32 layers) compiles in ~1 CPU-minute (~4 minutes wall on a busy 2-core
machine): the layer loop is unrolled, so compile time grows with the layers. The CLI test plans
4 of its layers at full width on 64 devices; the full model's size is checked from the config.
"""
import json
import os
import subprocess
import sys

import pytest

from configs import deepseek_v3_671b, mixtral_8x7b, switch_base_8, switch_base_128
from moejax.model import transformer as model_lib
from tests import launcher
from tests.helpers import REPO


@pytest.mark.parametrize('recipe,params,active', [
    (mixtral_8x7b, 46.7e9, 12.9e9),    # Jiang et al. 2024
    (switch_base_8, 0.62e9, 0.22e9),   # Fedus et al. 2021 (as a decoder-only LM)
    (switch_base_128, 7.4e9, 0.22e9),
])
def test_recipe_sizes(recipe, params, active):
    counts = model_lib.param_counts(recipe.get_config())
    assert counts['params'] == pytest.approx(params, rel=0.01)
    assert counts['active_params'] == pytest.approx(active, rel=0.01)


def plan_via_cli(*args, timeout=900):
    """Run launch/train.py --dry_run in a fresh process; (JSON result, its peak RSS in bytes)."""
    flags = [f for f in os.environ.get('XLA_FLAGS', '').split()
             if not f.startswith('--xla_force_host_platform_device_count')]
    env = dict(os.environ, XLA_FLAGS=' '.join(flags))  # the command simulates its own devices
    cmd = [sys.executable, os.path.join(REPO, 'launch', 'train.py'), '--dry_run', *args]
    proc = launcher.Popen(cmd, cwd=REPO, env=dict(env, JAX_PLATFORMS='cpu'),
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    out, err = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, err[-3000:]
    lines = [line for line in out.splitlines() if line.startswith('{')]
    assert len(lines) == 1, out
    return json.loads(lines[0])


@pytest.mark.slow
def test_mixtral_dry_run_on_64_simulated_devices():
    layers = 4
    result = plan_via_cli('--config=configs/mixtral_8x7b.py', '--simulated_devices=64',
                          f'--config.model.num_layers={layers}',
                          # The layout (the recipe itself uses fsdp to fit memory).
                          '--config.mesh.data=-1', '--config.mesh.fsdp=1')
    cfg = mixtral_8x7b.get_config()
    cfg.model.num_layers = layers
    counts = model_lib.param_counts(cfg)
    assert result['params'] == result['params_counted'] == counts['params']
    assert result['devices'] == 64
    assert result['mesh'] == {'data': 8, 'fsdp': 1, 'expert': 8, 'tensor': 1}
    # float32 parameters: the experts split 8 ways over 'expert', every other weight 8 ways over
    # its embed dim (fsdp x expert, sharding.DEFAULT_RULES), the RMSNorm scales replicated.
    norms = (2 * layers + 1) * cfg.model.d_model
    expected = 4 * ((counts['params'] - norms) // 8 + norms)
    assert result['params_bytes_per_device'] == expected
    # AdamW: two moments like the params, plus a step count or two.
    assert 0 <= result['opt_state_bytes_per_device'] - 2 * expected <= 64
    assert result['temp_bytes_per_device'] > 0
    tokens = cfg.data.batch_size * cfg.data.seq_len
    assert result['flops_per_step'] == pytest.approx(model_lib.flops_per_token(cfg) * tokens)
    # Not allocated: 64 devices' shards would be ~290 GB in a process that never holds one.
    # (ru_maxrss of waited-for children, in KiB on Linux; the largest child so far.)
    import resource
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024
    assert peak < expected, f'peak RSS {peak / 2**30:.1f} GiB'


@pytest.mark.slow
def test_deepseek_v3_plan_for_its_256_chips_scans_after_its_dense_layers():
    """The 671B recipe at full width for the 256 TPU chips it is laid out for, 5 of its layers:
    the 3 dense ones unrolled, 2 MoE layers scanned (the full 61 build the same way:
    docs/deepseek_v3.md). Without libtpu (CI) the step is lowered, not compiled: the program
    holds the real ragged exchange. Compiling it for 256 CPU devices instead (the docs' command)
    builds the CPU emulation of that exchange, which costs ~30 CPU s and proves no more here
    than the layout tests' 8-device exchange and Mixtral's compiled dry run."""
    layers = 5
    result = plan_via_cli('--config=configs/deepseek_v3_671b.py', '--target=tpu-v5p',
                          '--devices=256', f'--config.model.num_layers={layers}')
    cfg = deepseek_v3_671b.get_config()
    cfg.model.num_layers = layers
    assert result['params'] == result['params_counted'] == model_lib.param_counts(cfg)['params']
    assert result['devices'] == 256 and result['target'] == 'tpu-v5p'
    assert result['mesh'] == {'data': 1, 'fsdp': 4, 'expert': 64, 'tensor': 1}
    assert 'ragged all-to-all (expert exchange)' in result['kernels']
    assert 0 <= result['opt_state_bytes_per_device'] - 2 * result['params_bytes_per_device'] <= 64
