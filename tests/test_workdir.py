"""A workdir's guards (moejax/run/workdir.py, issue 24 findings 4, 5 and 8; issue 29 point 5):
the lock is written whole and a damaged or empty one does not block the workdir; --restart
checks the new run before it moves the old one; the resume guard names the ways out from what
was given; metrics.jsonl lines without an integer step are skipped, not a traceback."""
import glob
import hashlib
import json
import os
import resource
import signal
import socket
import subprocess
import sys

import pytest

from configs import default
from moejax.hf import convert
from moejax.run import metrics
from moejax.run import workdir as workdir_lib
from tests.helpers import REPO, tiny_config

FIXTURE = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'fixtures', 'hf', 'mixtral',
                       'single')


def train_command(workdir, *args) -> list[str]:
    return [sys.executable, os.path.join(REPO, 'launch', 'train.py'), f'--workdir={workdir}',
            *args]


def cli_env() -> dict:
    return dict(os.environ, JAX_PLATFORMS='cpu', PYTHONUNBUFFERED='1',
                XLA_FLAGS='--xla_force_host_platform_device_count=8')


def snapshot(workdir) -> dict[str, str]:
    """{relative path: sha256} of every file under workdir."""
    out = {}
    for path in glob.glob(os.path.join(workdir, '**'), recursive=True):
        if os.path.isfile(path):
            with open(path, 'rb') as f:
                out[os.path.relpath(path, workdir)] = hashlib.sha256(f.read()).hexdigest()
    return out


# ----------------------------------------------------------------------------------- the lock


@pytest.mark.parametrize('content', [b'', b'[1, 2]', b'\xff\xfe\x00',
                                     json.dumps({'host': socket.gethostname(), 'pid': 'abc'}),
                                     json.dumps({'host': socket.gethostname(), 'pid': 2**40})],
                         ids=['empty', 'a list', 'binary', 'pid abc', 'pid 2**40'])
def test_a_lock_that_names_no_process_is_stale_with_one_line(tmp_path, capsys, content):
    lock = workdir_lib.WorkdirLock(str(tmp_path))
    with open(lock.path, 'wb') as f:
        f.write(content.encode() if isinstance(content, str) else content)
    lock.acquire()
    out = capsys.readouterr().out.splitlines()
    assert out == [f'Removed an unreadable lock file {lock.path} (it names no process that '
                   'could hold it).']
    with open(lock.path) as f:
        assert json.load(f)['pid'] == os.getpid()
    lock.release()
    assert os.listdir(tmp_path) == []  # nothing aside either


def _no_file_may_grow():
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (0, 0))  # a full disk: every write fails


def test_a_start_on_a_full_disk_leaves_no_lock(tmp_path):
    workdir = tmp_path / 'run'
    proc = subprocess.run(train_command(workdir, '--config=configs/default.py:tiny'), cwd=REPO,
                          env=cli_env(), capture_output=True, text=True, timeout=300,
                          preexec_fn=_no_file_may_grow)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 1 and len(lines) == 1, proc.stderr[-3000:]
    assert lines[0].startswith('moejax: the run stopped: File too large writing ')
    assert os.listdir(workdir) == []  # no lock, empty or whole: the workdir is not blocked
    workdir_lib.WorkdirLock(str(workdir)).acquire()


# ---------------------------------------------------------------------------------- --restart


def test_restart_of_an_imported_run_is_refused_before_anything_moves(tmp_path):
    """An import keeps its tokenizer in the workdir; --restart would set it aside with the old
    run, so a config that names no tokenizer elsewhere is refused first."""
    workdir = str(tmp_path / 'imported')
    base = default.get_config()
    base.data.data_dir = str(tmp_path / 'data')
    convert.import_hf(FIXTURE, workdir, base)
    before = snapshot(workdir)
    proc = subprocess.run(train_command(workdir, f'--config=configs/saved.py:{workdir}',
                                        '--restart'),
                          cwd=REPO, env=cli_env(), capture_output=True, text=True, timeout=300)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr[-3000:]
    assert 'data.tokenizer_path' in lines[0] and 'nothing was moved' in lines[0]
    assert snapshot(workdir) == before and 'previous_runs' not in os.listdir(workdir)


# ------------------------------------------------------------------------- the resume guard


def saved_run_dir(tmp_path, cfg) -> str:
    """A workdir as a run leaves it, as far as the resume guard reads it: config.json and a
    committed checkpoint's folder."""
    workdir = str(tmp_path / 'run')
    os.makedirs(os.path.join(workdir, 'checkpoints', '10'))
    with open(os.path.join(workdir, 'config.json'), 'w') as f:
        json.dump(cfg.to_dict(), f)
    return workdir


def refusal_of(workdir, cfg, argv) -> str:
    with pytest.raises(workdir_lib.ConfigError) as err:
        workdir_lib.check_resume(cfg, workdir, argv)
    return str(err.value)


def test_the_resume_guard_names_the_ways_out_from_what_was_given(tmp_path):
    saved = tiny_config(num_experts=8)  # trained with --config.moe.num_experts=8
    workdir = saved_run_dir(tmp_path, saved)
    # The flag was left out: add it back (with the saved value), or resume with saved.py.
    message = refusal_of(workdir, tiny_config(), ['train.py', '--config=configs/default.py:tiny'])
    assert 'moe.num_experts 8 -> 4' in message
    assert 'To resume it: add --config.moe.num_experts=8 (or use ' \
           f'--config=configs/saved.py:{workdir})' in message
    # A flag was given that changes the model: drop it.
    new = tiny_config(num_experts=8, d_model=64)
    message = refusal_of(workdir, new, ['train.py', '--config=configs/default.py:tiny',
                                        '--config.moe.num_experts=8',
                                        '--config.model.d_model=64'])
    assert 'To resume it: drop --config.model.d_model=64 (or use' in message
    assert 'add --config' not in message and 'use a new --workdir' in message
    assert 'pass --restart' in message


# ------------------------------------------------------------------------------ metrics.jsonl


def test_metrics_lines_without_an_integer_step_are_skipped_not_a_traceback(tmp_path, capsys):
    records = [{'step': 1, 'loss': 3.0}, {'step': 'abc', 'loss': 2.0}, {'step': 2, 'loss': 1.0},
               {'step': [3], 'loss': 0.5}]
    path = tmp_path / 'metrics.jsonl'
    path.write_text(''.join(json.dumps(r) + '\n' for r in records))
    assert metrics.read_jsonl(str(path)) == [records[0], records[2]]
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and 'skipped 2 unreadable line(s), the first is line 2' in err[0]
    writer = metrics.MetricWriter(str(tmp_path), tensorboard=False)
    writer.truncate_after(1)  # a resume from step 1
    assert path.read_text() == json.dumps(records[0]) + '\n'
