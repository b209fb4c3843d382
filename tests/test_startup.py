"""What every command does before its work (moejax/startup.py): bad configs, config files and
flags are refused before anything compiles: exit 2, one line on stderr naming the key, the bad
value and what is allowed, no traceback, within seconds."""
import concurrent.futures
import os
import subprocess
import sys
import time

import pytest

from tests.helpers import REPO, assert_usage_error, cli_env, timed

TINY = '--config=configs/default.py:tiny'


# (what is wrong, arguments after --workdir, the key the message must name, text it must show):
# one per way a command can meet it (validation, flag parsing, devices, data, the config file);
# every validation message itself is checked in process by test_validate.
BAD = [
    ('unknown router', [TINY, '--config.moe.router=topk'], 'moe.router', 'expert_choice'),
    ('wrong type', [TINY, '--config.model.d_model=abc'], 'model.d_model', 'int'),
    ('mesh over devices', [TINY, '--config.mesh.data=3'], 'mesh', '8 devices'),
    ('unknown dataset', [TINY, '--config.data.name=no_such_corpus'], 'data.name',
     'python_stdlib'),
    ('glob matching nothing', [TINY, '--config.data.name=text_files',
                               '--config.data.text_glob=/nonexistent/**/*.txt'],
     'data.text_glob', '/nonexistent/**/*.txt'),
    ('unknown key', [TINY, '--config.model.d_modle=64'], '--config.model.d_modle', 'd_model'),
    ('no such config file', ['--config=configs/no_such_file.py'], '--config',
     'configs/no_such_file.py'),
    ('unknown config variant', ['--config=configs/default.py:huge'], '--config', 'tiny'),
]


def run_train(args, workdir, data_dir):
    """launch/train.py with its workdir and data_dir; returns (CompletedProcess, seconds)."""
    env = cli_env()
    cmd = [sys.executable, os.path.join(REPO, 'launch', 'train.py'), f'--workdir={workdir}',
           *args]
    if any(a.startswith('--config=') for a in args):
        cmd.append(f'--config.data.data_dir={data_dir}')
    start = time.time()
    result = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    return result, time.time() - start


def assert_one_line_error(result, seconds, key, shown, what=''):
    lines = result.stderr.splitlines()
    assert result.returncode == 2, f'{what}: exit {result.returncode}\n{result.stderr[-2000:]}'
    assert len(lines) == 1 and lines[0].startswith('moejax: error: '), f'{what}: {lines}'
    assert key in lines[0] and shown in lines[0], f'{what}: {lines[0]}'
    assert 'Traceback' not in result.stderr and not result.stdout.strip(), what
    assert seconds < 30, f'{what}: took {seconds:.0f}s'


def test_bad_configs_exit_2_with_one_line_naming_the_key(tmp_path):
    """Each kind of mistake, in its own process (a few at a time: they mostly wait on imports)."""
    data_dir = str(tmp_path / 'data')
    jobs = {what: (args, str(tmp_path / f'run{i}')) for i, (what, args, _, _) in enumerate(BAD)}
    with concurrent.futures.ThreadPoolExecutor(3) as pool:
        results = {what: pool.submit(run_train, args, workdir, data_dir)
                   for what, (args, workdir) in jobs.items()}
        for what, _, key, shown in BAD:
            result, seconds = results[what].result()
            assert_one_line_error(result, seconds, key, shown, what)
    assert not os.path.exists(data_dir), 'nothing may be prepared for a bad config'


def test_workdir_that_is_a_file_is_refused(tmp_path):
    path = tmp_path / 'not_a_dir'
    path.write_text('precious')
    result, seconds = run_train([TINY], str(path), str(tmp_path / 'data'))
    assert_one_line_error(result, seconds, '--workdir', str(path), 'workdir is a file')
    assert path.read_text() == 'precious'


@pytest.mark.parametrize('args,message', ids=['type', 'not_a_group', 'unknown_group', 'list'], argvalues=[
    (['--config.model.d_model=abc'], "--config.model.d_model='abc': must be of type int"),
    (['--config.model.d_model.x=1'], 'model.d_model is not a group'),
    (['--config.modle.d_model=64'], "unknown config key 'modle'; known: data, mesh, model"),
    (['--config.model.dense_layers=zero'], "--config.model.dense_layers='zero': must be of type "
     'list'),
])
def test_override_errors_are_explained_without_a_process(args, message, capsys):
    """The flag-error explanations, in process (fast): they name the key and what is allowed."""
    from moejax import startup
    argv = ['train', TINY, *args]
    with pytest.raises(Exception) as err:
        flags_under_test(argv)
    assert message in startup.explain_flag_error(err.value, argv)


def flags_under_test(argv):
    """Parse argv with a private FlagValues, as the command line would."""
    from absl import flags
    from ml_collections import config_flags
    fresh = flags.FlagValues()
    config_flags.DEFINE_config_file('config', flag_values=fresh, sys_argv=argv)
    fresh(argv)
    return fresh.config


@pytest.mark.parametrize('value,expected', [('[0,1]', [0, 1]), ('0,2', [0, 2]), ('3', [3]),
                                            ('[]', [])])
def test_a_list_key_is_set_from_the_command_line(value, expected):
    """model.dense_layers, a list, in each form startup.ListParser reads (ml_collections
    itself refuses lists); a list it stays, as config.json saves it."""
    from moejax import startup  # noqa: F401 - registers the parser, as every command does
    cfg = flags_under_test(['train', TINY, f'--config.model.dense_layers={value}'])
    assert cfg.model.dense_layers == expected and isinstance(cfg.model.dense_layers, list)


def test_saved_config_of_a_workdir_without_a_readable_config_json_is_one_line(tmp_path):
    """configs/saved.py raises a ConfigError; config_flags re-raises it with one argument."""
    (tmp_path / 'bad').mkdir()
    (tmp_path / 'bad' / 'config.json').write_text('[1, 2]')
    for workdir, shown in ((tmp_path / 'missing', 'config.json is not readable'),
                           (tmp_path / 'bad', 'config.json is not a run config')):
        result, seconds = run_train([f'--config=configs/saved.py:{workdir}'], str(workdir),
                                    str(tmp_path / 'data'))
        assert_one_line_error(result, seconds, '--config', shown, str(workdir))


@pytest.mark.parametrize('flags,shown', [
    (('--simulated_devices=0',), '--simulated_devices=0'),  # was: silently the real devices
    (('--num_processes=2', '--process_id=5', '--coordinator=localhost:1'), '--process_id=5'),
    (('--num_processes=0',), '--num_processes=0'),
])
def test_bad_device_and_process_flags(tmp_path, flags, shown):
    proc, seconds = timed('train', TINY, f'--workdir={tmp_path / "run"}', *flags)
    assert_usage_error(proc, shown, seconds=seconds)
    assert not os.path.exists(tmp_path / 'run')
