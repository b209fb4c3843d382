"""The accelerator benchmark runs end to end (--smoke: tiny shapes on the CPU), so the one
command meant for a rented GPU or TPU never rots between the times one is lent."""
import json
import os
import subprocess
import sys

import pytest

from tests.helpers import REPO

pytestmark = pytest.mark.slow


def test_accelerator_smoke(tmp_path):
    done = subprocess.run([sys.executable, os.path.join(REPO, 'benchmarks', 'accelerator.py'),
                           '--smoke', f'--out_dir={tmp_path}'], capture_output=True, text=True,
                          timeout=900, env=dict(os.environ, JAX_PLATFORMS='cpu'))
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    summary = json.loads((tmp_path / 'accelerator_cpu.json').read_text())
    assert summary['platform'] == 'cpu' and summary['versions']['jax']
    assert all(run['ok'] for run in summary['runs'].values())
    step = summary['runs']['train_step']['result']
    assert set(step['models']) == {'dense', 'moe_dropless'}
    assert set(summary['runs']['moe_layer']['result']['moe_ms']) == {'sort', 'dropless'}
    assert all(m['tokens_per_sec'] > 0 for m in step['models'].values())
    [attention] = summary['runs']['attention']['result']['results']
    assert attention['error_to_xla']['xla'] == 0 and attention['error_to_xla']['chunked'] < 1e-4
