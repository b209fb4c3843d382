"""What every command does before its work: define and parse the flags, load the config file,
start jax.distributed, and turn a config or usage error into one line and exit code 2.

Exit codes: 0 done; 2 a config or usage error, printed as one line naming key, value and what
is allowed; 1 anything else, with its traceback; 130 interrupted.
"""
import ast
import os
import re
import signal
import sys

import ml_collections
from absl import flags
from ml_collections import config_flags

from moejax import usage
from moejax.errors import ConfigError

FLAGS = flags.FLAGS


class ListParser(flags.ArgumentParser):
    """A list-valued config key from the command line (ml_collections parses no lists):
    `--config.model.dense_layers=[0,1,2]`, `=0,1,2` or `=[]`. Saved configs keep their lists."""

    def parse(self, argument):
        if isinstance(argument, (list, tuple)):
            return list(argument)
        text = argument.strip()
        try:
            value = ast.literal_eval(text if text.startswith(('[', '(')) else f'[{text}]')
        except (SyntaxError, ValueError):
            value = None
        if not isinstance(value, (list, tuple)):
            raise ValueError(f'{argument!r} is not a list like [0, 1, 2]')
        return list(value)

    def flag_type(self):
        return 'list'


config_flags.register_flag_parser_for_type(list, ListParser())


def define_common(argv):
    config_flags.DEFINE_config_file(
        'config', None, 'Config file, e.g. configs/default.py[:variant]; override any key with '
        '--config.group.key=value.', lock_config=True, sys_argv=argv)
    flags.DEFINE_string('workdir', None, 'Directory for checkpoints, metrics and the tokenizer.')
    flags.DEFINE_string('coordinator', None, 'Multi-host: coordinator address host:port.')
    flags.DEFINE_integer('num_processes', None, 'Multi-host: number of processes.')
    flags.DEFINE_integer('process_id', None, 'Multi-host: this process index.')


def parse(argv) -> None:
    """Parse flags; any flag or config-file problem is a usage error (exit 2)."""
    recipes_importable(argv)
    usage.exit_if_help(argv, load_config)
    try:
        extra = FLAGS(argv)[1:]
        if FLAGS.config is not None and not isinstance(FLAGS.config, ml_collections.ConfigDict):
            FLAGS.config.keys()  # a config file that failed to load raises its error here
    except Exception as err:  # noqa: BLE001 - config_flags raises plain errors for bad files
        usage_error(explain_flag_error(err, argv))
    if extra:
        usage_error(f'unexpected arguments: {extra}; flags take the form --name=value')
    if not FLAGS.workdir and not getattr(FLAGS, 'dry_run', False):
        usage_error('--workdir is required: the directory for checkpoints and metrics')


def recipes_importable(argv) -> None:
    """Recipes import their siblings (`from configs import default`): put the directory that
    holds the config's package on sys.path, as running from the repository root would."""
    for arg in argv:
        if arg.startswith('--config='):
            path = os.path.abspath(arg.split('=', 1)[1].split(':', 1)[0])
            root = os.path.dirname(os.path.dirname(path))
            if root not in sys.path:
                sys.path.insert(0, root)


def explain_flag_error(err: Exception, argv) -> str:
    """One line naming the flag or config key at fault, its value and what is allowed."""
    path = config_path(argv)
    if path is None:  # eval without --config: the fault is in another flag
        return first_line(err) + (' (--config.KEY overrides need --config=FILE)'
                                   if "flag 'config." in str(err) else '')
    base, problem = load_config(path)
    if problem:
        return f'--config={path!r}: {problem}'
    for key, value in overrides(argv):
        group, shown = base, f'--config.{key}' + ('' if value is None else f'={value}')
        for name in key.split('.'):
            if not isinstance(group, ml_collections.ConfigDict):
                return f'{shown}: unknown config key; {key.rsplit(".", 1)[0]} is not a group'
            if name not in group:
                return f'{shown}: unknown config key {name!r}; known: {", ".join(sorted(group))}'
            group = group[name]
        if isinstance(err, flags.IllegalFlagValueError) and f'--config.{key}=' in str(err):
            kind = type(group).__name__
            return (f'--config.{key}={value!r}: must be of type {kind} '
                    f'(like its value in {path}: {group!r})')
    return first_line(err)


def first_line(err: Exception) -> str:
    lines = [line for line in str(err).splitlines() if line.strip()]
    return lines[0] if lines else type(err).__name__


def config_path(argv) -> str | None:
    """The --config=PATH[:variant] argument, as given."""
    for i, arg in enumerate(argv):
        if arg.startswith('--config='):
            return arg.split('=', 1)[1]
        if arg == '--config' and i + 1 < len(argv):
            return argv[i + 1]
    return None


def overrides(argv):
    """(key, value or None) for each --config.KEY[=VALUE] argument."""
    for i, arg in enumerate(argv):
        if arg.startswith('--config.'):
            key, eq, value = arg[len('--config.'):].partition('=')
            if not eq and i + 1 < len(argv) and not argv[i + 1].startswith('--'):
                value = argv[i + 1]
            yield key, value if (eq or value) else None


def load_config(path):
    """(config, None) for a loadable config file, else (None, the reason in one line)."""
    if path is None:
        return None, 'is required, e.g. --config=configs/default.py'
    fresh = flags.FlagValues()
    config_flags.DEFINE_config_file('config', flag_values=fresh, lock_config=False,
                                   sys_argv=['moejax', f'--config={path}'])
    try:
        fresh(['moejax', f'--config={path}'])
        config = fresh.config
        config.keys()
        return config, None
    except Exception as err:  # noqa: BLE001 - anything the config file raised
        if not os.path.isfile(path.split(':', 1)[0]):
            return None, 'no such config file; give one like configs/default.py[:variant]'
        lines = [line.strip() for line in str(err).splitlines() if line.strip()]
        # The recipe's own error is the traceback's last line: 'module.Error: message'.
        return None, re.sub(r'^[\w.]+(Error|Exception): ', '', lines[-1]) if lines else \
            type(err).__name__


def usage_error(message: str):
    print(f'moejax: error: {message}', file=sys.stderr, flush=True)
    sys.exit(2)


def start(argv):
    """Parse flags, then initialise jax.distributed before any other JAX call."""
    parse(argv)
    simulated = getattr(FLAGS, 'simulated_devices', None)
    if simulated is not None and simulated < 1:
        usage_error(f'--simulated_devices={simulated}: must be >= 1 (or left out for the real '
                     'devices)')
    check_process_flags(FLAGS.num_processes, FLAGS.process_id)
    if simulated:
        # Must happen before the backend starts: plan a large mesh on CPU-simulated devices.
        import jax
        jax.config.update('jax_platforms', 'cpu')
        jax.config.update('jax_num_cpu_devices', FLAGS.simulated_devices)
    if getattr(FLAGS, 'target', None):
        prepare_target(FLAGS.target)
    from moejax import mesh
    mesh.init_distributed(FLAGS.coordinator, FLAGS.num_processes, FLAGS.process_id)


def prepare_target(name: str) -> None:
    """Before the backend starts, for a plan of another machine's accelerator: this host's
    backend stays the CPU (the CUDA plugin builds compile-only GPUs only then), a GPU target
    gets MaxText's XLA flags, and libtpu is told it runs on no TPU (or it complains at length)."""
    import jax

    from moejax import target, xla_flags
    if name not in target.CHIPS:
        usage_error(f'--target={name}: known targets: {", ".join(sorted(target.CHIPS))}')
    jax.config.update('jax_platforms', 'cpu')
    if target.CHIPS[name].platform == 'gpu':
        xla_flags.set_gpu_flags(force=True)
    else:
        os.environ.setdefault('TPU_WORKER_HOSTNAMES', 'localhost')
        os.environ.setdefault('TPU_ACCELERATOR_TYPE', 'v5p-8')


def check_process_flags(num_processes, process_id) -> None:
    """Multi-host flags in range, before jax.distributed sees them."""
    if num_processes is not None and num_processes < 1:
        usage_error(f'--num_processes={num_processes}: must be >= 1')
    if process_id is not None and not 0 <= process_id < (num_processes or process_id + 1):
        usage_error(f'--process_id={process_id}: must be in [0, --num_processes='
                     f'{num_processes})' if num_processes else
                     f'--process_id={process_id}: must be >= 0')


def run(fn):
    try:
        fn()
    except ConfigError as err:
        usage_error(str(err))
    except KeyboardInterrupt:
        interrupted()


def interrupted(*_):
    """Exit 130 at once, also as a signal handler: further signals are ignored and the
    interpreter's teardown is skipped (a signal there, with JAX or Orbax threads running, could
    crash it). Nothing half-written is ever taken for a checkpoint: Orbax commits by rename."""
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, signal.SIG_IGN)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(130)


def check_early(cfg, workdir) -> None:
    """Validate config and workdir before the slow imports, so a typo costs a second or two.
    (loop.prepare checks them again, with the data, for callers that skip the CLI.)"""
    import jax

    from moejax import config as config_lib
    from moejax import validate  # imports the model and data stack: after the flags parse
    validate.check(cfg, jax.device_count())
    config_lib.check_workdir(workdir)
