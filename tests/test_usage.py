"""--help, -h and --helpfull of every command (moejax/usage.py): each flag the command takes,
one line each, from the launch scripts and from setup.cfg's console scripts."""
import concurrent.futures
import configparser
import os
import subprocess
import sys

from tests.helpers import REPO

# Each command's flags, as DESIGN.md's contract lists them (the truth --help must show).
COMMAND_FLAGS = {
    'train': ['config', 'workdir', 'restart', 'dry_run', 'simulated_devices'],
    'eval': ['config', 'workdir', 'split', 'step', 'tokens', 'out_dir'],
    'generate': ['workdir', 'prompt', 'max_new_tokens', 'temperature', 'top_k', 'seed'],
    'analyze': ['workdir', 'text', 'step', 'out_dir'],
    'forward': ['workdir', 'step', 'tokens', 'out'],
    'convert': ['from_hf', 'to_hf', 'upcycle_from', 'workdir', 'config', 'step', 'max_shard_mb'],
    'plan': ['config', 'devices', 'device_memory', 'remat', 'grad_accum', 'meshes'],
}


def run_help(program: list[str], flag: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, JAX_PLATFORMS='cpu')
    return subprocess.run([*program, flag], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=120)


def console_scripts() -> dict[str, str]:
    """{command: 'module:function'} of setup.cfg's moejax-* console scripts."""
    parser = configparser.ConfigParser()
    parser.read(os.path.join(REPO, 'setup.cfg'))
    lines = parser['options.entry_points']['console_scripts'].strip().splitlines()
    return {name.strip().removeprefix('moejax-'): target.strip()
            for name, target in (line.split('=') for line in lines)}


def help_runs():
    """(what, program, flag, expected flags) for every command: its launch script with every
    help flag, and setup.cfg's console script as it runs (the function it names, under its
    name)."""
    scripts = console_scripts()
    assert sorted(scripts) == sorted(COMMAND_FLAGS)
    for command, expected in COMMAND_FLAGS.items():
        module, function = scripts[command].split(':')
        console = [sys.executable, '-c', f'import sys; sys.argv[0] = "moejax-{command}"; '
                   f'import {module}; {module}.{function}()']
        launch = [sys.executable, os.path.join('launch', f'{command}.py')]
        for flag in ('--help', '-h', '--helpfull'):
            yield f'launch {command} {flag}', launch, flag, expected
        yield f'console {command} --help', console, '--help', expected


def test_every_command_answers_help_with_its_flags():
    runs = list(help_runs())
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        results = list(pool.map(lambda run: run_help(run[1], run[2]), runs))
    for (what, _, flag, expected), proc in zip(runs, results):
        assert proc.returncode == 0 and not proc.stderr.strip(), (what, proc.stderr[-2000:])
        lines = proc.stdout.splitlines()
        assert lines[0].startswith('usage: '), (what, lines[:3])
        for name in expected:
            assert sum(line.startswith(f'  --{name}: ') for line in lines) == 1, (what, name)
        if flag == '--helpfull':
            assert '  --verbosity: ' in proc.stdout, what  # absl's own flags too
            if 'config' in expected:
                assert '  --config.model.d_model=' in proc.stdout, what
    cluster = run_help([sys.executable, 'launch/local_cluster.py'], '--help')
    assert cluster.returncode == 0 and '--num_processes' in cluster.stdout, cluster.stderr
