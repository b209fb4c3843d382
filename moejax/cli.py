"""Command-line entry points (launch/*.py and the moejax-* console scripts call these).

Exit codes: 0 done; 2 a config or usage error, printed as one line naming key, value and what
is allowed; 1 anything else, with its traceback.
"""
import errno
import json
import logging
import os
import re
import signal
import sys
import time

import ml_collections
from absl import flags
from ml_collections import config_flags

from moejax import usage
from moejax.errors import ConfigError

FLAGS = flags.FLAGS


def _define_common(argv):
    config_flags.DEFINE_config_file(
        'config', None, 'Config file, e.g. configs/default.py[:variant]; override any key with '
        '--config.group.key=value.', lock_config=True, sys_argv=argv)
    flags.DEFINE_string('workdir', None, 'Directory for checkpoints, metrics and the tokenizer.')
    flags.DEFINE_string('coordinator', None, 'Multi-host: coordinator address host:port.')
    flags.DEFINE_integer('num_processes', None, 'Multi-host: number of processes.')
    flags.DEFINE_integer('process_id', None, 'Multi-host: this process index.')


def _parse(argv) -> None:
    """Parse flags; any flag or config-file problem is a usage error (exit 2)."""
    _recipes_importable(argv)
    usage.exit_if_help(argv, _load_config)
    try:
        extra = FLAGS(argv)[1:]
        if FLAGS.config is not None and not isinstance(FLAGS.config, ml_collections.ConfigDict):
            FLAGS.config.keys()  # a config file that failed to load raises its error here
    except Exception as err:  # noqa: BLE001 - config_flags raises plain errors for bad files
        _usage_error(_explain_flag_error(err, argv))
    if extra:
        _usage_error(f'unexpected arguments: {extra}; flags take the form --name=value')
    if not FLAGS.workdir and not getattr(FLAGS, 'dry_run', False):
        _usage_error('--workdir is required: the directory for checkpoints and metrics')


def _recipes_importable(argv) -> None:
    """Recipes import their siblings (`from configs import default`): put the directory that
    holds the config's package on sys.path, as running from the repository root would."""
    for arg in argv:
        if arg.startswith('--config='):
            path = os.path.abspath(arg.split('=', 1)[1].split(':', 1)[0])
            root = os.path.dirname(os.path.dirname(path))
            if root not in sys.path:
                sys.path.insert(0, root)


def _explain_flag_error(err: Exception, argv) -> str:
    """One line naming the flag or config key at fault, its value and what is allowed."""
    path = _config_path(argv)
    if path is None:  # eval without --config: the fault is in another flag
        return _first_line(err) + (' (--config.KEY overrides need --config=FILE)'
                                   if "flag 'config." in str(err) else '')
    base, problem = _load_config(path)
    if problem:
        return f'--config={path!r}: {problem}'
    for key, value in _overrides(argv):
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
    return _first_line(err)


def _first_line(err: Exception) -> str:
    lines = [line for line in str(err).splitlines() if line.strip()]
    return lines[0] if lines else type(err).__name__


def _config_path(argv) -> str | None:
    """The --config=PATH[:variant] argument, as given."""
    for i, arg in enumerate(argv):
        if arg.startswith('--config='):
            return arg.split('=', 1)[1]
        if arg == '--config' and i + 1 < len(argv):
            return argv[i + 1]
    return None


def _overrides(argv):
    """(key, value or None) for each --config.KEY[=VALUE] argument."""
    for i, arg in enumerate(argv):
        if arg.startswith('--config.'):
            key, eq, value = arg[len('--config.'):].partition('=')
            if not eq and i + 1 < len(argv) and not argv[i + 1].startswith('--'):
                value = argv[i + 1]
            yield key, value if (eq or value) else None


def _load_config(path):
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


def _usage_error(message: str):
    print(f'moejax: error: {message}', file=sys.stderr, flush=True)
    sys.exit(2)


def _start(argv):
    """Parse flags, then initialise jax.distributed before any other JAX call."""
    _parse(argv)
    simulated = getattr(FLAGS, 'simulated_devices', None)
    if simulated is not None and simulated < 1:
        _usage_error(f'--simulated_devices={simulated}: must be >= 1 (or left out for the real '
                     'devices)')
    _check_process_flags(FLAGS.num_processes, FLAGS.process_id)
    if simulated:
        # Must happen before the backend starts: plan a large mesh on CPU-simulated devices.
        import jax
        jax.config.update('jax_platforms', 'cpu')
        jax.config.update('jax_num_cpu_devices', FLAGS.simulated_devices)
    if getattr(FLAGS, 'target', None):
        _prepare_target(FLAGS.target)
    from moejax import mesh
    mesh.init_distributed(FLAGS.coordinator, FLAGS.num_processes, FLAGS.process_id)


def _prepare_target(name: str) -> None:
    """Before the backend starts, for a plan of another machine's accelerator: this host's
    backend stays the CPU (the CUDA plugin builds compile-only GPUs only then), a GPU target
    gets MaxText's XLA flags, and libtpu is told it runs on no TPU (or it complains at length)."""
    import jax

    from moejax import target, xla_flags
    if name not in target.CHIPS:
        _usage_error(f'--target={name}: known targets: {", ".join(sorted(target.CHIPS))}')
    jax.config.update('jax_platforms', 'cpu')
    if target.CHIPS[name].platform == 'gpu':
        xla_flags.set_gpu_flags(force=True)
    else:
        os.environ.setdefault('TPU_WORKER_HOSTNAMES', 'localhost')
        os.environ.setdefault('TPU_ACCELERATOR_TYPE', 'v5p-8')


def _check_process_flags(num_processes, process_id) -> None:
    """Multi-host flags in range, before jax.distributed sees them."""
    if num_processes is not None and num_processes < 1:
        _usage_error(f'--num_processes={num_processes}: must be >= 1')
    if process_id is not None and not 0 <= process_id < (num_processes or process_id + 1):
        _usage_error(f'--process_id={process_id}: must be in [0, --num_processes='
                     f'{num_processes})' if num_processes else
                     f'--process_id={process_id}: must be >= 0')


def _run(fn):
    try:
        fn()
    except ConfigError as err:
        _usage_error(str(err))
    except KeyboardInterrupt:
        _interrupted()


def _interrupted(*_):
    """Exit 130 at once, also as a signal handler: further signals are ignored and the
    interpreter's teardown is skipped (a signal there, with JAX or Orbax threads running, could
    crash it). Nothing half-written is ever taken for a checkpoint: Orbax commits by rename."""
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, signal.SIG_IGN)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(130)


def _check_early(cfg, workdir) -> None:
    """Validate config and workdir before the slow imports, so a typo costs a second or two.
    (loop.prepare checks them again, with the data, for callers that skip the CLI.)"""
    import jax

    from moejax import config as config_lib
    config_lib.validate(cfg, jax.device_count())
    config_lib.check_workdir(workdir)


def train_main(argv=None):
    argv = argv or sys.argv
    _define_common(argv)
    flags.DEFINE_integer('simulated_devices', None, 'Run on this many CPU-simulated devices '
                         '(e.g. 64 with --dry_run to plan a pod-sized layout on a laptop).')
    flags.DEFINE_boolean('dry_run', False, 'Compile the train step ahead of time for the config '
                         'and mesh, print memory and FLOPs as JSON, and exit (nothing allocated).')
    flags.DEFINE_string('target', None, 'With --dry_run: the accelerator to plan for (tpu-v5p, '
                        'tpu-v6e, gpu-h100, gpu-h200, gpu-b200, ...), from any machine.')
    flags.DEFINE_integer('devices', None, 'With --target: how many of its devices.')
    flags.DEFINE_boolean('restart', False, 'Start over from step 0 in a workdir that holds a run: '
                         'its checkpoints, metrics and config move to WORKDIR/previous_runs/ '
                         '(nothing is deleted).')
    # Until training installs its own handlers (and again after they are removed), a signal
    # means there is nothing (more) to save: exit 130 at once.
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, _interrupted)
    _start(argv)
    from moejax import xla_flags
    xla_flags.set_gpu_flags()  # GPU runs: MaxText's XLA flags, before the backend starts
    if FLAGS.config is None:
        _usage_error('--config is required, e.g. --config=configs/default.py')

    def train():
        if not FLAGS.dry_run:
            _check_early(FLAGS.config, FLAGS.workdir)
        from moejax.run import guards, loop
        if FLAGS.dry_run:
            from moejax.plan import dry_run
            print(json.dumps(dry_run.plan(FLAGS.config, FLAGS.target, FLAGS.devices)),
                  flush=True)
            return
        from moejax.run.checkpoint import SaveError
        try:
            loop.train_and_evaluate(FLAGS.config, FLAGS.workdir, restart=FLAGS.restart,
                                    argv=argv)
        except (guards.NonFiniteError, SaveError) as err:  # one line, not a traceback
            print(f'moejax: {err}', file=sys.stderr, flush=True)
            sys.exit(1)
        except OSError as err:
            if err.errno not in DISK_FULL:
                raise
            _disk_full(err, FLAGS.workdir)
        finally:
            # Everything is saved and the lock released; only the interpreter's teardown is
            # left, during which Python restores default handlers (a Ctrl-C would kill it).
            for signum in (signal.SIGINT, signal.SIGTERM):
                signal.signal(signum, signal.SIG_IGN)
    _run(train)


DISK_FULL = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)


def _disk_full(err: OSError, workdir: str) -> None:
    """A full disk outside the checkpoint's own save (metrics, events, while a save was in
    flight): one line naming the last committed checkpoint, then exit 1 at once, so Orbax's
    unfinished writes print no tracebacks during interpreter teardown."""
    from moejax.run import workdir as workdir_lib
    steps = workdir_lib.saved_steps(workdir)
    last = f'step {steps[-1]}' if steps else 'none (no checkpoint was saved)'
    print(f'moejax: the run stopped: {err.strerror} writing {err.filename or "to the workdir"}; '
          f'the last good checkpoint is {last}', file=sys.stderr, flush=True)
    os._exit(1)


def eval_main(argv=None):
    argv = argv or sys.argv
    _define_common(argv)
    flags.DEFINE_string('split', 'validation', 'Dataset split to evaluate.')
    flags.DEFINE_integer('step', None, 'Checkpoint step; default: the latest.')
    flags.DEFINE_string('tokens', None, 'Evaluate these token ids instead of a split: a .npy of '
                        'ids [B, T], each row one whole document (for a run without tokenizer).')
    flags.DEFINE_string('out_dir', None, 'Where the eval_*.json file goes; default: --workdir.')
    logging.getLogger('absl').addFilter(_ReadOnlyNotices())
    _start(argv)

    def evaluate():
        from moejax import config as config_lib
        from moejax.readers import evaluation
        if FLAGS.tokens:
            result = evaluation.evaluate_tokens(FLAGS.workdir, FLAGS.tokens, FLAGS.step,
                                                FLAGS.out_dir)
            print(evaluation.describe(result), flush=True)
            return
        cfg = FLAGS.config
        saved = os.path.join(FLAGS.workdir, 'config.json')
        if cfg is None:
            if not os.path.exists(saved):
                raise ConfigError('--config', None, f'is required: {saved} does not exist')
            cfg = config_lib.from_json(saved)  # a damaged file fails here, before slow imports
        result = evaluation.evaluate_checkpoint(cfg, FLAGS.workdir, FLAGS.split, FLAGS.step,
                                                FLAGS.out_dir)
        print(evaluation.describe(result), flush=True)
    _run(evaluate)


class _ReadOnlyNotices(logging.Filter):
    """Drops Orbax's notices that a reader opened checkpoints read-only: that is by design,
    and a usage error should stay the one line on stderr."""

    def filter(self, record) -> bool:
        text = record.getMessage()
        return not ('read_only=True' in text or 'directory is read only' in text)


def _parse_run_flags(argv) -> None:
    """Flags of the commands that read a finished run (generate, analyze): no config needed."""
    usage.exit_if_help(argv)
    logging.getLogger('absl').addFilter(_ReadOnlyNotices())
    try:
        extra = FLAGS(argv)[1:]
    except flags.Error as err:
        _usage_error(str(err).splitlines()[0])
    if extra:
        _usage_error(f'unexpected arguments: {extra}')
    if not FLAGS.workdir:
        _usage_error('--workdir is required: the directory of a training run')


def generate_main(argv=None):
    flags.DEFINE_string('workdir', None, "A training run's directory (config.json, checkpoints/).")
    flags.DEFINE_string('prompt', '', 'Text to continue (the model sees bos + its tokens).')
    flags.DEFINE_integer('max_new_tokens', 64, 'Tokens to generate (prompt + these <= max_len).')
    flags.DEFINE_float('temperature', 0.8, 'Softmax temperature; 0 = greedy.')
    flags.DEFINE_integer('top_k', 0, 'Sample among the k most likely tokens only; 0 = all.')
    flags.DEFINE_integer('seed', 0, 'Sampling seed: the same seed gives the same text.')
    flags.DEFINE_integer('num_samples', 1, 'Independent continuations of the prompt.')
    flags.DEFINE_integer('step', None, 'Checkpoint step; default: the latest.')
    _parse_run_flags(argv or sys.argv)

    def generate():
        from moejax import config as config_lib
        config_lib.check_sampling_args(FLAGS.max_new_tokens, FLAGS.temperature, FLAGS.top_k,
                                       FLAGS.num_samples)
        from moejax.readers import sampling, saved_run
        run = saved_run.open_run(FLAGS.workdir, FLAGS.step)
        texts = sampling.generate_text(run, FLAGS.prompt, FLAGS.max_new_tokens,
                                       temperature=FLAGS.temperature, top_k=FLAGS.top_k,
                                       seed=FLAGS.seed, num_samples=FLAGS.num_samples)
        for i, text in enumerate(texts):
            if len(texts) > 1:
                print(f'--- sample {i} (step {run.step}) ---')
            print(FLAGS.prompt + text, flush=True)
    _run(generate)


def analyze_main(argv=None):
    flags.DEFINE_string('workdir', None, "A training run's directory (metrics.jsonl, checkpoints/).")
    flags.DEFINE_string('text', None, "Text whose tokens' experts to plot (needs a checkpoint).")
    flags.DEFINE_integer('step', None, 'Checkpoint step for --text; default: the latest.')
    flags.DEFINE_string('out_dir', None, 'Where the PNGs go; default: WORKDIR/plots.')
    _parse_run_flags(argv or sys.argv)

    def analyze():
        from moejax.readers import analysis
        paths = analysis.analyze(FLAGS.workdir, text=FLAGS.text, step=FLAGS.step,
                                 out_dir=FLAGS.out_dir)
        print(json.dumps(paths), flush=True)
    _run(analyze)


def forward_main(argv=None):
    flags.DEFINE_string('workdir', None, "A training run's directory (config.json, checkpoints/).")
    flags.DEFINE_integer('step', None, 'Checkpoint step; default: the latest.')
    flags.DEFINE_string('tokens', None, 'A .npy file of integer token ids [B, T] (or [T]); each '
                        'row is one whole document.')
    flags.DEFINE_string('out', None, 'Where to write the float32 logits [B, T, V] (.npy).')
    _parse_run_flags(argv or sys.argv)

    def forward():
        import jax

        from moejax.readers import saved_run
        if not FLAGS.tokens:
            raise ConfigError('--tokens', FLAGS.tokens, 'is required: a .npy file of token ids')
        saved_run.check_workdir(FLAGS.workdir)
        # Everything is checked before the weights are read: the config says vocab and max_len.
        cfg = saved_run.run_config(FLAGS.workdir, dtype='float32')
        ids_BT = saved_run.check_tokens(saved_run.read_tokens(FLAGS.tokens), cfg)
        saved_run.check_out(FLAGS.out)
        run = saved_run.open_run(FLAGS.workdir, FLAGS.step, cfg=cfg)
        logits_BTV = saved_run.forward_logits(run, ids_BT)
        if jax.process_index() == 0:
            saved_run.write_npy(FLAGS.out, logits_BTV)
        print(json.dumps({'step': run.step, 'shape': list(logits_BTV.shape), 'out': FLAGS.out}),
              flush=True)
    _run(forward)


def _default_recipe():
    """configs/default.py of this checkout: the base of an imported model's non-model keys."""
    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'configs',
                        'default.py')
    config, problem = _load_config(path)
    if problem:
        _usage_error(f'{path}: {problem}; pass --config=FILE')
    return config


def convert_main(argv=None):
    argv = argv or sys.argv
    _define_common(argv)
    flags.DEFINE_string('from_hf', None, 'Import: a Hugging Face model directory (config.json, '
                        'safetensors, tokenizer) -> a new --workdir at step 0.')
    flags.DEFINE_string('to_hf', None, "Export: write --workdir's checkpoint to this directory "
                        'in the published layout.')
    flags.DEFINE_string('upcycle_from', None, 'Upcycle: a dense run whose FFNs become the experts '
                        'of --config (an MoE config) in a new --workdir.')
    flags.DEFINE_integer('step', None, 'Export/upcycle: the checkpoint step; default: the latest.')
    flags.DEFINE_string('fp8_dtype', 'float32', 'Import: FP8 block-scaled weights (DeepSeek-V3) '
                        'dequantised in float32, or rounded to bfloat16.')
    flags.DEFINE_float('max_shard_mb', 5000, 'Export: largest safetensors file, in MB (2**20 '
                       'bytes; fractions allowed, e.g. 0.5).')
    logging.getLogger('absl').addFilter(_ReadOnlyNotices())
    _start(argv)

    def convert():
        modes = [m for m in ('from_hf', 'to_hf', 'upcycle_from') if getattr(FLAGS, m)]
        if len(modes) != 1:
            raise ConfigError('--from_hf/--to_hf/--upcycle_from', modes or None,
                              'give exactly one of them')
        from moejax.hf import convert as convert_lib
        if FLAGS.from_hf:
            result = convert_lib.import_hf(FLAGS.from_hf, FLAGS.workdir,
                                           FLAGS.config or _default_recipe(), FLAGS.fp8_dtype)
        elif FLAGS.to_hf:
            if not 0 < FLAGS.max_shard_mb < float('inf'):
                raise ConfigError('--max_shard_mb', FLAGS.max_shard_mb, 'must be a size in MB '
                                  '> 0, e.g. 5000 or 0.5')
            result = convert_lib.export_hf(FLAGS.workdir, FLAGS.to_hf, FLAGS.step,
                                           max(1, int(FLAGS.max_shard_mb * 2**20)))
        else:
            if FLAGS.config is None:
                raise ConfigError('--config', None, 'is required with --upcycle_from: the MoE '
                                  'config, e.g. configs/default.py')
            result = convert_lib.upcycle(FLAGS.upcycle_from, FLAGS.workdir, FLAGS.config,
                                         FLAGS.step)
        print(json.dumps(result), flush=True)
    _run(lambda: _disk_failures_in_one_line(convert, FLAGS.to_hf or FLAGS.workdir))


def _disk_failures_in_one_line(convert, target: str) -> None:
    """A disk that fills or fails while a conversion writes: one line, exit 1 (the partial
    result was removed before this: nothing was written)."""
    from moejax.run.checkpoint import SaveError
    try:
        convert()
    except (OSError, SaveError) as err:
        reason = err.reason if isinstance(err, SaveError) else (
            f'{err.strerror} ({err.filename})' if err.filename else err.strerror)
        if not reason:
            raise
        print(f'moejax: the conversion stopped: {reason}; nothing was written to {target}',
              file=sys.stderr, flush=True)
        sys.exit(1)


def _default_memory(target_name: str | None) -> str:
    from moejax import target
    return f'{target.CHIPS[target_name].hbm_bytes:.0f}' if target_name else '80GB'


def _device_memory(text: str) -> int:
    """--device_memory in bytes; '1.2.3GB' and '1e400' fail in float() and int() inside
    parse_bytes, not as a ConfigError."""
    from moejax.plan import search
    try:
        return search.parse_bytes(text)
    except (ValueError, OverflowError):
        raise ConfigError('--device_memory', text, 'must be a finite size like 80GB, 80GiB or '
                          '8e10') from None


def plan_main(argv=None):
    """launch/plan.py and moejax-plan: rank layouts for --devices of --device_memory."""
    from absl import flags
    from ml_collections import config_flags

    from moejax.plan import search
    argv = argv or sys.argv
    config_flags.DEFINE_config_file('config', None, 'Config file, e.g. configs/mixtral_8x7b.py; '
                                    'override keys with --config.group.key=value.',
                                    lock_config=True, sys_argv=argv)
    flags.DEFINE_integer('devices', None, 'Devices to plan for.')
    flags.DEFINE_string('target', None, 'The accelerator to plan for (tpu-v5p, tpu-v6e, gpu-h100, '
                        'gpu-h200, gpu-b200, ...): compiled for it where libtpu or the CUDA '
                        'plugin is installed, else lowered; default: CPU-simulated devices, '
                        'estimates for gpu-h100.')
    flags.DEFINE_string('device_memory', None, "Memory per device: 80GB (1e9), 80GiB (2**30); "
                        "default: the target's HBM (80GB without one).")
    flags.DEFINE_list('remat', list(search.REMATS_BY_MEMORY), 'model.remat policies to try.')
    flags.DEFINE_list('grad_accum', None, 'opt.grad_accum values to try (default: all valid).')
    flags.DEFINE_string('meshes', None, 'Only these layouts: data=1,fsdp=8,expert=8,tensor=1;...')
    _recipes_importable(argv)
    usage.exit_if_help(argv, _load_config)
    try:
        flags.FLAGS(argv)
        flags.FLAGS.config.keys()
    except Exception as err:  # noqa: BLE001 - config_flags raises plain errors for bad files
        _usage_error(_explain_flag_error(err, argv))
    FLAGS = flags.FLAGS
    if not FLAGS.devices or FLAGS.devices < 1:
        _usage_error('--devices is required: the number of devices to plan for, e.g. 64')
    import jax  # the backend must not have started: simulate the devices on the CPU
    jax.config.update('jax_platforms', 'cpu')
    if FLAGS.target:
        _prepare_target(FLAGS.target)
    else:
        jax.config.update('jax_num_cpu_devices', FLAGS.devices)

    def run():
        memory = _device_memory(FLAGS.device_memory or _default_memory(FLAGS.target))
        bad = [r for r in FLAGS.remat if r not in search.REMATS_BY_MEMORY]
        if bad:
            raise ConfigError('--remat', ','.join(bad),
                              'allowed: ' + ', '.join(search.REMATS_BY_MEMORY))
        if not all(g.strip().isdigit() for g in FLAGS.grad_accum or []):
            raise ConfigError('--grad_accum', FLAGS.grad_accum, 'must be integers, e.g. 1,2,4')
        accums = [int(g) for g in FLAGS.grad_accum] if FLAGS.grad_accum else None
        say = lambda text: print(f'[plan {time.strftime("%H:%M:%S")}] {text}', file=sys.stderr,
                                 flush=True)
        rows = search.plan_layouts(FLAGS.config, FLAGS.devices, memory, remats=FLAGS.remat,
                                   layouts=search.parse_layouts(FLAGS.meshes), accums=accums,
                                   target_name=FLAGS.target, progress=say)
        print(search.table(rows, memory, FLAGS.target or 'gpu-h100'), flush=True)
        print(json.dumps({'target': FLAGS.target, 'devices': FLAGS.devices,
                          'device_memory_bytes': memory, 'candidates': rows}), flush=True)
    _run(run)
