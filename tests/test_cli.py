"""The commands' entry points (moejax/cli.py): the flags a command parses itself are refused in
one line (exit 2)."""
import os
import sys

import pytest

from tests import launcher
from tests.helpers import REPO, assert_usage_error, fake_run, timed

TINY = '--config=configs/default.py:tiny'


@pytest.mark.parametrize('memory', ['1.2.3GB', '1e400'])
def test_plan_device_memory_that_is_no_size_is_one_line(memory):
    proc = launcher.run([sys.executable, os.path.join(REPO, 'launch', 'plan.py'), TINY,
                         '--devices=8', f'--device_memory={memory}'], cwd=REPO,
                        env=dict(os.environ, JAX_PLATFORMS='cpu'), capture_output=True,
                        text=True, timeout=120)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and lines == [
        f"moejax: error: --device_memory='{memory}': must be a finite size like 80GB, 80GiB or "
        '8e10'], proc.stderr[-2000:]


@pytest.mark.parametrize('flag,shown', [('--bogus=1', "'bogus'"),
                                        ('--step=abc', '--step=abc'),
                                        ('--config.model.d_model=3', '--config=FILE')])
def test_eval_without_config_names_the_bad_flag(tmp_path, flag, shown):
    workdir = fake_run(tmp_path / 'run', '{}')
    proc, seconds = timed('eval', f'--workdir={workdir}', flag)
    assert_usage_error(proc, shown, seconds=seconds)
    assert 'is required' not in proc.stderr


def test_stray_positional_argument_is_refused(tmp_path):
    proc, seconds = timed('eval', f'--workdir={tmp_path}', 'validation')
    assert_usage_error(proc, "['validation']", seconds=seconds)
