"""Two processes x 4 devices (launch/local_cluster.py) train exactly like one process x 8."""
import glob
import json
import os
import shutil
import subprocess
import sys
import sysconfig

import numpy as np
import pytest

from tests.helpers import REPO, run_cli

pytestmark = pytest.mark.slow

STEPS = 6


@pytest.fixture(scope='module')
def corpus(tmp_path_factory):
    """A small text corpus (some stdlib modules, a document per line) and its shared data_dir."""
    root = tmp_path_factory.mktemp('multihost')
    os.makedirs(root / 'corpus')
    for path in sorted(glob.glob(os.path.join(sysconfig.get_paths()['stdlib'], 'json', '*.py'))):
        shutil.copy(path, root / 'corpus')
    return root


def train_args(corpus, workdir):
    return ['--config=configs/default.py:tiny', f'--workdir={workdir}',
            '--config.data.name=text_files', '--config.data.text_format=lines',
            f'--config.data.text_glob={corpus}/corpus/*.py', f'--config.data.data_dir={corpus}/tfds',
            f'--config.train.num_steps={STEPS}', '--config.train.log_every=1',
            '--config.train.eval_every=0', f'--config.train.checkpoint_every={STEPS}',
            '--config.mesh.data=2', '--config.mesh.expert=4', '--config.moe.comm=all_to_all']


def losses(workdir):
    with open(os.path.join(workdir, 'metrics.jsonl')) as f:
        records = [json.loads(line) for line in f]
    return {r['step']: r['loss'] for r in records if 'loss' in r}


def test_two_processes_match_one(corpus, tmp_path):
    # One process x 8 devices first: it also prepares the data cache the cluster then reads.
    single = run_cli('train', *train_args(corpus, tmp_path / 'single'))
    assert single.returncode == 0, single.stderr[-3000:]
    cmd = [sys.executable, os.path.join(REPO, 'launch', 'local_cluster.py'),
           '--num_processes=2', '--devices_per_process=4', '--',
           sys.executable, os.path.join(REPO, 'launch', 'train.py'),
           *train_args(corpus, tmp_path / 'multi')]
    multi = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=900)
    assert multi.returncode == 0, multi.stdout[-3000:] + multi.stderr[-2000:]
    lines = multi.stdout.splitlines()
    assert any(line.startswith('[p0] ') for line in lines)
    assert any(line.startswith('[p1] ') for line in lines)
    want, got = losses(tmp_path / 'single'), losses(tmp_path / 'multi')
    assert sorted(got) == sorted(want) == list(range(1, STEPS + 1))
    np.testing.assert_allclose([got[s] for s in sorted(got)], [want[s] for s in sorted(want)],
                               rtol=1e-4)
    # One shared checkpoint, written by both processes together.
    assert os.listdir(tmp_path / 'multi' / 'checkpoints') == [str(STEPS)]


def test_local_cluster_stops_everything_when_one_process_fails():
    """Process 1 fails at once; process 0 would sleep for minutes: the launcher ends both."""
    script = ('import os, sys, time\n'
              'pid = int(os.environ["MOEJAX_PROCESS_ID"])\n'
              'assert os.environ["MOEJAX_COORDINATOR"].startswith("127.0.0.1:")\n'
              'print("devices", os.environ["XLA_FLAGS"], os.environ["MOEJAX_NUM_PROCESSES"])\n'
              'sys.stdout.flush()\n'
              'sys.exit(3) if pid == 1 else time.sleep(300)\n')
    cmd = [sys.executable, os.path.join(REPO, 'launch', 'local_cluster.py'),
           '--num_processes=2', '--devices_per_process=3', '--', sys.executable, '-c', script]
    result = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=60)
    assert result.returncode == 3
    p0 = [line for line in result.stdout.splitlines() if line.startswith('[p0] devices')]
    assert len(p0) == 1 and 'xla_force_host_platform_device_count=3 ' in p0[0], result.stdout
    assert p0[0].endswith(' 2') and '[p1] devices' in result.stdout
    assert 'process 1 exited with 3' in result.stderr
