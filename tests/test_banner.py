"""What a training run says about itself (moejax/run/banner.py): the start banner, and on a
finished run the command that extends it (issue 29)."""
import shlex
import shutil
import sys

import pytest

from moejax.data import stdlib_corpus
from tests import launcher
from tests.helpers import REPO, cli_env
from tests.runs import train, train_records


@pytest.mark.slow
def test_a_finished_run_says_so_and_names_the_command_that_extends_it(trained_tiny_run, data_dir,
                                                                      compile_cache, tmp_path):
    """Issue 29: the start banner says what runs; rerunning a finished run says it is finished
    and gives the command that extends it, and that command does."""
    workdir = str(tmp_path / 'run')
    shutil.copytree(trained_tiny_run, workdir)
    result = train(workdir, data_dir, compile_cache)
    assert result.returncode == 0, result.stderr[-3000:]
    lines = result.stdout.splitlines()
    assert lines[0] == (f'moejax: training configs/default.py:tiny with 2 override(s) in '
                        f'{workdir} (already finished)')
    assert lines[1].startswith('  model: 2 layers, d_model 32, 1 MoE layer(s) of 4 experts')
    assert lines[2] == '  devices: 8 x cpu in 1 process(es); mesh data=8 fsdp=1 expert=1 tensor=1'
    digest = stdlib_corpus.stdlib_manifest().digest[:16]
    assert lines[3] == (f'  data: python_stdlib (digest {digest}), byte tokenizer of 259 ids; '
                        '8 x 32 = 256 tokens per step')
    assert lines[4].startswith('  steps: 10 -> 10; adamw')
    finished_line = 'The run is finished: step 10 of train.num_steps=10, checkpoint saved. To ' \
                    'train further, raise train.num_steps: '
    assert lines[-1].startswith(finished_line)
    command = shlex.split(lines[-1][len(finished_line):])
    assert command[:2] == ['python', 'launch/train.py'] and command[-1] == \
        '--config.train.num_steps=20'
    extended = launcher.run([sys.executable, *command[1:]], cwd=REPO, env=cli_env(compile_cache),
                            capture_output=True, text=True, timeout=300)
    assert extended.returncode == 0, extended.stderr[-3000:]
    assert f'moejax: training configs/default.py:tiny with 3 override(s) in {workdir} ' \
           '(resuming from step 10)' in extended.stdout.splitlines()
    assert [r['step'] for r in train_records(workdir)] == list(range(1, 21))
