"""Command-line entry points (launch/*.py and the moejax-* console scripts call these).

Exit codes: 0 done; 2 a config or usage error, printed as one line naming key, value and what
is allowed; 1 anything else, with its traceback.
"""
import json
import os
import sys

from absl import flags
from ml_collections import config_flags

from moejax.errors import ConfigError

FLAGS = flags.FLAGS


def _define_common():
    config_flags.DEFINE_config_file(
        'config', None, 'Config file, e.g. configs/default.py[:variant]; override any key with '
        '--config.group.key=value.', lock_config=True)
    flags.DEFINE_string('workdir', None, 'Directory for checkpoints, metrics and the tokenizer.')
    flags.DEFINE_string('coordinator', None, 'Multi-host: coordinator address host:port.')
    flags.DEFINE_integer('num_processes', None, 'Multi-host: number of processes.')
    flags.DEFINE_integer('process_id', None, 'Multi-host: this process index.')


def _parse(argv) -> None:
    """Parse flags; any flag or config-file problem is a usage error (exit 2)."""
    try:
        FLAGS(argv)
    except (flags.Error, Exception) as err:  # config_flags raises plain errors for bad files
        _usage_error(str(err).splitlines()[0] if str(err) else type(err).__name__)
    if not FLAGS.workdir:
        _usage_error('--workdir is required: the directory for checkpoints and metrics')


def _usage_error(message: str):
    print(f'moejax: error: {message}', file=sys.stderr, flush=True)
    sys.exit(2)


def _start(argv):
    """Parse flags, then initialise jax.distributed before any other JAX call."""
    _parse(argv)
    from moejax import mesh
    mesh.init_distributed(FLAGS.coordinator, FLAGS.num_processes, FLAGS.process_id)


def _run(fn):
    try:
        fn()
    except ConfigError as err:
        _usage_error(str(err))
    except KeyboardInterrupt:
        sys.exit(130)


def train_main(argv=None):
    _define_common()
    flags.DEFINE_boolean('dry_run', False, 'Compile the train step ahead of time for the config '
                         'and mesh, print memory and FLOPs as JSON, and exit (nothing allocated).')
    _start(argv or sys.argv)
    if FLAGS.config is None:
        _usage_error('--config is required, e.g. --config=configs/default.py')

    def train():
        from moejax import train
        if FLAGS.dry_run:
            from moejax import dry_run
            print(json.dumps(dry_run.plan(FLAGS.config)), flush=True)
            return
        try:
            train.train_and_evaluate(FLAGS.config, FLAGS.workdir)
        except train.NonFiniteError as err:
            print(f'moejax: {err}', file=sys.stderr, flush=True)
            sys.exit(1)
    _run(train)


def eval_main(argv=None):
    _define_common()
    flags.DEFINE_string('split', 'validation', 'Dataset split to evaluate.')
    flags.DEFINE_integer('step', None, 'Checkpoint step; default: the latest.')
    _start(argv or sys.argv)

    def evaluate():
        from moejax import config as config_lib, train
        cfg = FLAGS.config
        saved = os.path.join(FLAGS.workdir, 'config.json')
        if cfg is None:
            if not os.path.exists(saved):
                raise ConfigError('--config', None, f'is required: {saved} does not exist')
            cfg = config_lib.from_json(saved)
        result = train.evaluate_checkpoint(cfg, FLAGS.workdir, FLAGS.split, FLAGS.step)
        print(json.dumps(result), flush=True)
    _run(evaluate)
