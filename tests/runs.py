"""Training through the command line, for the tests of what keeps a run safe (test_checkpoint,
test_guards, test_workdir, test_banner): start a run, interrupt or refuse it, resume it, and
read back what it wrote.

The truth each of them compares against is an independent run: conftest's trained_tiny_run
(COMMAND, uninterrupted), or a run that used the changed setting from the resumed step on.
"""
import glob
import json
import os
import subprocess

from tests import launcher
from tests.helpers import REPO, TINY, cli_env, train_command

NUM_STEPS = 10  # configs/default.py:tiny's
COMMAND = (TINY, '--config.train.log_every=1')  # conftest.TINY_RUN_FLAGS: trained_tiny_run's
EVERY_2 = (*COMMAND, '--config.train.checkpoint_every=2')  # more moments to resume from
TIMING_KEYS = ('tokens_per_sec', 'mfu')  # differ between runs by nature; all else must not
# lr 1e6 without clipping: step 2's update ruins the weights, step 3's loss is ~1e18 (a spike),
# every later one a spike or non-finite. A constant schedule, so num_steps does not change lr.
DIVERGING = ('--config.opt.lr=1e6', '--config.opt.clip_norm=0', '--config.opt.schedule=constant',
             '--config.train.checkpoint_every=1', '--config.train.keep_checkpoints=1',
             '--config.train.max_skipped_steps=3')


# ------------------------------------------------------------------- COMMAND, and its output


def command(workdir, data_dir, *extra):
    return train_command(workdir, *COMMAND, f'--config.data.data_dir={data_dir}', *extra)


def train(workdir, data_dir, cache_dir, *extra, **kwargs) -> subprocess.CompletedProcess:
    return launcher.run(command(workdir, data_dir, *extra), cwd=REPO, env=cli_env(cache_dir),
                        capture_output=True, text=True, timeout=300, **kwargs)


def start(workdir, data_dir, cache_dir, *extra) -> launcher.Forked:
    return launcher.Popen(command(workdir, data_dir, *extra), cwd=REPO, env=cli_env(cache_dir),
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def read_until(proc, predicate) -> list[str]:
    seen = []
    for line in proc.stdout:
        seen.append(line)
        if predicate(line):
            break
    return seen


def error_lines(result) -> list[str]:
    return [line for line in result.stderr.splitlines() if line.strip()]


def records(workdir) -> list[dict]:
    """metrics.jsonl without the throughput figures, which no two runs share."""
    with open(os.path.join(workdir, 'metrics.jsonl')) as f:
        rows = [json.loads(line) for line in f]
    return [{k: v for k, v in row.items() if k not in TIMING_KEYS} for row in rows]


def train_records(workdir) -> list[dict]:
    """The training steps' records (not the evaluations') of metrics.jsonl."""
    return [r for r in records(workdir) if 'loss' in r]


# ------------------------------------------------- EVERY_2: checkpoints at every other step


def run_training(workdir, data_dir, *extra, cache_dir=None) -> subprocess.CompletedProcess:
    return launcher.run(train_command(workdir, *EVERY_2, f'--config.data.data_dir={data_dir}',
                                      *extra),
                        cwd=REPO, env=cli_env(cache_dir), capture_output=True, text=True,
                        timeout=300)


def start_training(workdir, data_dir, stderr_path, cache_dir) -> launcher.Forked:
    """A training process whose stdout we read line by line (stderr to a file: no deadlock)."""
    with open(stderr_path, 'a') as stderr:
        return launcher.Popen(train_command(workdir, *EVERY_2,
                                            f'--config.data.data_dir={data_dir}'),
                              cwd=REPO, env=cli_env(cache_dir), stdout=subprocess.PIPE,
                              stderr=stderr, text=True)


def read_until_step(proc: launcher.Forked, step: int, seen: list) -> bool:
    """Read stdout until a progress line for `step` or later; False if the process ended."""
    for line in proc.stdout:
        seen.append(line)
        if line.startswith('step') and int(line.split()[1].split('/')[0]) >= step:
            return True
    return False


def train_losses(workdir) -> list[tuple[int, float]]:
    return [(r['step'], r['loss']) for r in records(workdir) if 'loss' in r]


def assert_same_run(workdir, reference, context=''):
    """Per-step losses (exact float32 values) and every other logged number equal the
    reference's, each step logged once."""
    assert train_losses(workdir) == train_losses(reference), context
    assert [r['step'] for r in records(workdir) if 'loss' in r] == list(range(1, NUM_STEPS + 1))
    assert records(workdir) == records(reference), context


def saved_steps(workdir) -> list[int]:
    """Committed checkpoints: Orbax renames a finished save to its step number."""
    return sorted(int(s) for s in os.listdir(os.path.join(workdir, 'checkpoints')) if s.isdigit())


def tmp_dirs(workdir) -> list[str]:
    return glob.glob(os.path.join(workdir, 'checkpoints', '*.orbax-checkpoint-tmp*'))
