"""A workdir's guards (moejax/run/workdir.py): one trainer per workdir (a lock file), and a
resume guard that refuses a config that does not fit the saved run and changes nothing (issue
12); the lock is written whole and a damaged or empty one does not block the workdir; --restart
checks the new run before it moves the old one; the resume guard names the ways out from what
was given (issue 24 findings 4, 5 and 8; issue 29 point 5)."""
import json
import os
import resource
import shutil
import signal
import socket
import subprocess
import sys

import pytest

from configs import default
from moejax.hf import convert
from moejax.run import workdir as workdir_lib
from tests import launcher
from tests.helpers import REPO, cli_env, snapshot, tiny_config, train_command
from tests.runs import error_lines, read_until, start, train, train_records

FIXTURE = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'fixtures', 'hf', 'mixtral',
                       'single')


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
    proc = launcher.run(train_command(workdir, f'--config=configs/saved.py:{workdir}',
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


# ------------------------------------------------- one trainer per workdir (issue 12)

def test_lock_is_exclusive_and_only_the_holder_releases_it(tmp_path):
    lock = workdir_lib.WorkdirLock(str(tmp_path))
    lock.acquire()
    with pytest.raises(workdir_lib.ConfigError, match=f'pid {os.getpid()}'):
        workdir_lib.WorkdirLock(str(tmp_path)).acquire()  # held by a live process
    lock.release()
    assert not os.path.exists(lock.path)
    # A lock of a process that has exited on this host is stale.
    dead = subprocess.run([sys.executable, '-c', 'import os; print(os.getpid())'],
                          capture_output=True, text=True).stdout.strip()
    with open(lock.path, 'w') as f:
        json.dump({'host': os.uname().nodename, 'pid': int(dead), 'started': 'then'}, f)
    lock.acquire()
    assert json.load(open(lock.path))['pid'] == os.getpid()
    lock.release()
    # One from another host cannot be checked from here: refused, naming the file to delete.
    with open(lock.path, 'w') as f:
        json.dump({'host': 'elsewhere', 'pid': 1, 'started': 'then'}, f)
    with pytest.raises(workdir_lib.ConfigError, match='delete the lock file'):
        lock.acquire()


@pytest.mark.slow
def test_second_trainer_is_refused_and_a_killed_runs_lock_does_not_block(data_dir,
                                                                         compile_cache,
                                                                         tmp_path):
    workdir = str(tmp_path / 'run')
    first = start(workdir, data_dir, compile_cache, '--config.train.num_steps=1000')
    try:
        read_until(first, lambda line: line.startswith('step'))
        holder = json.load(open(os.path.join(workdir, workdir_lib.LOCK)))
        assert holder['pid'] == first.pid
        second = train(workdir, data_dir, compile_cache, '--config.train.num_steps=1000')
        assert second.returncode == 2, second.stderr[-3000:]
        lines = error_lines(second)
        assert len(lines) == 1 and f'pid {first.pid}' in lines[0], lines
    finally:
        first.kill()
        first.wait(timeout=60)
        first.stdout.close()
        first.stderr.close()
    assert os.path.exists(os.path.join(workdir, workdir_lib.LOCK))  # left by the killed run
    third = train(workdir, data_dir, compile_cache)
    assert third.returncode == 0, third.stderr[-3000:]
    assert 'Removed a stale lock' in third.stdout
    assert not os.path.exists(os.path.join(workdir, workdir_lib.LOCK))  # released at exit
    steps = [r['step'] for r in train_records(workdir)]  # one record per step, in order
    assert steps == list(range(1, max(steps) + 1)) and max(steps) >= 10


# ---------------------------------------------------- the resume rule (issue 12)

@pytest.mark.slow
def test_config_that_changes_the_saved_state_is_refused_and_nothing_is_touched(
        trained_tiny_run, data_dir, compile_cache, tmp_path):
    workdir = str(tmp_path / 'run')
    shutil.copytree(trained_tiny_run, workdir)
    before = snapshot(workdir)
    for flag, expected in (('--config.model.d_model=64', 'model.d_model 32 -> 64'),
                           ('--config.opt.name=adafactor', "opt.name 'adamw' -> 'adafactor'")):
        result = train(workdir, data_dir, compile_cache, flag)
        assert result.returncode == 2, result.stderr[-3000:]
        lines = error_lines(result)
        assert len(lines) == 1 and expected in lines[0] and 'new --workdir' in lines[0], lines
        assert snapshot(workdir) == before  # checkpoints, config.json, metrics: byte-identical
    # clip_norm is an optimizer hyperparameter, but 0 removes a state entry: refused too.
    result = train(workdir, data_dir, compile_cache, '--config.opt.clip_norm=0')
    assert result.returncode == 2 and 'opt.clip_norm 1.0 -> 0' in result.stderr, result.stderr
    assert snapshot(workdir) == before

    # A steering key may change: the run resumes, and the change is recorded.
    result = train(workdir, data_dir, compile_cache, '--config.train.num_steps=12')
    assert result.returncode == 0, result.stderr[-3000:]
    assert 'Resumed from checkpoint at step 10.' in result.stdout
    assert 'train.num_steps 10 -> 12' in result.stdout
    with open(os.path.join(workdir, workdir_lib.CHANGES)) as f:
        records = [json.loads(line) for line in f]
    assert records[-1]['changes'] == {'train.num_steps': [10, 12]}
    assert records[-1]['resumed_from_step'] == 10
    assert train_records(workdir)[:10] == train_records(trained_tiny_run)  # history kept
    assert [r['step'] for r in train_records(workdir)] == list(range(1, 13))


def test_a_dense_run_resumes_whatever_the_unread_moe_keys_say():
    saved = tiny_config(moe_every=0)
    new = tiny_config(moe_every=0, dispatch='dropless', num_experts=16, group_size=64)
    assert workdir_lib.config_changes(saved, new) == {}
    new.model.moe_every = 2  # now the moe keys shape a layer: every change counts
    changes = workdir_lib.config_changes(saved, new)
    assert set(changes) == {'model.moe_every', 'moe.dispatch', 'moe.num_experts',
                            'moe.group_size'}
    assert changes['moe.dispatch'] == ('sort', 'dropless')


def test_resume_rule_allows_steering_keys_and_refuses_the_rest_and_unknown_keys():
    saved, new = tiny_config(), tiny_config()
    new.train.num_steps, new.mesh.expert, new.opt.lr = 99, 2, 1e-4
    new.model.d_model, new.moe.top_k = 64, 2
    new.model.brand_new_key = 'x'  # a key added later, absent from the saved config
    changes = workdir_lib.config_changes(saved, new)
    assert changes == {'train.num_steps': (10, 99), 'mesh.expert': (1, 2), 'opt.lr': (3e-3, 1e-4),
                       'model.d_model': (32, 64), 'moe.top_k': (1, 2),
                       'model.brand_new_key': (workdir_lib.ABSENT, 'x')}
    refused = sorted(k for k in changes if not workdir_lib.is_steering(k))
    assert refused == ['model.brand_new_key', 'model.d_model', 'moe.top_k']
