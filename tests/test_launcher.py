"""tests/launcher.py against the truth it stands in for: a command forked from the server
gives what the same command gives in a fresh interpreter (subprocess), and what a fork could
not reproduce goes to a fresh interpreter."""
import os
import signal
import subprocess
import sys

import pytest

from tests import launcher
from tests.helpers import REPO, TINY, cli_env

pytestmark = pytest.mark.slow


def both_ways(*args) -> tuple:
    """(forked, fresh) CompletedProcess of launch/<args>."""
    command = [sys.executable, os.path.join('launch', args[0]), *args[1:]]
    env = cli_env()
    forked = launcher.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    fresh = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True,
                           timeout=120)
    return forked, fresh


@pytest.mark.parametrize('args', [
    ('eval.py', '--help'),  # usage text, exit 0
    ('eval.py', '--workdir=/nonexistent/run'),  # a usage error: one line, exit 2
    ('train.py', TINY, '--workdir=/nonexistent/w',
     '--config.model.d_model=0'),  # refused by validation after the config file is read
], ids=['help', 'usage_error', 'bad_config'])
def test_a_forked_command_gives_what_a_fresh_interpreter_gives(args):
    assert launcher._forkable([sys.executable, os.path.join('launch', args[0])], REPO,
                              cli_env(), {})
    forked, fresh = both_ways(*args)
    assert (forked.returncode, forked.stdout, forked.stderr) == (
        fresh.returncode, fresh.stdout, fresh.stderr)


def test_a_signal_reaches_the_forked_command_and_its_status_tells_it(tmp_path):
    train = [sys.executable, os.path.join(REPO, 'launch', 'train.py')]
    helped = launcher.Popen([*train, '--help'], cwd=REPO, env=cli_env(),
                            stdout=subprocess.PIPE, text=True)
    assert isinstance(helped, launcher.Forked) and helped.pid != os.getpid()
    assert '--config' in helped.stdout.read() and helped.wait(timeout=120) == 0
    killed = launcher.Popen([*train, TINY, f'--workdir={tmp_path / "w"}',
                             f'--config.data.data_dir={tmp_path / "data"}'], cwd=REPO,
                            env=cli_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    killed.kill()
    assert killed.wait(timeout=60) == -signal.SIGKILL


def test_what_a_fork_cannot_reproduce_runs_fresh():
    script = [sys.executable, os.path.join(REPO, 'launch', 'eval.py')]
    env = cli_env()
    assert launcher._forkable(script, REPO, env, {})
    assert not launcher._forkable([sys.executable, '-c', 'pass'], REPO, env, {})
    assert not launcher._forkable(script, REPO, env, {'preexec_fn': os.getpid})
    assert not launcher._forkable(script, REPO, dict(env, PYTHONHASHSEED='1'), {})
    assert not launcher._forkable(script, REPO, dict(env, JAX_NOT_AN_OPTION='1'), {})
    without = {k: v for k, v in env.items() if k != 'JAX_PLATFORMS'}
    assert not launcher._forkable(script, REPO, without, {})  # JAX cannot take a value back
