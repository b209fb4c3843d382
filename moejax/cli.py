"""Command-line entry points (launch/*.py and the moejax-* console scripts call these).

Exit codes: 0 done; 2 a config or usage error, printed as one line naming key, value and what
is allowed; 1 anything else, with its traceback.
"""
import errno
import json
import logging
import os
import signal
import sys
import time

from absl import flags
from ml_collections import config_flags

from moejax import startup, usage
from moejax.errors import ConfigError

FLAGS = flags.FLAGS


def train_main(argv=None):
    argv = argv or sys.argv
    startup.define_common(argv)
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
        signal.signal(signum, startup.interrupted)
    startup.start(argv)
    from moejax import xla_flags
    xla_flags.set_gpu_flags()  # GPU runs: MaxText's XLA flags, before the backend starts
    if FLAGS.config is None:
        startup.usage_error('--config is required, e.g. --config=configs/default.py')

    def train():
        if not FLAGS.dry_run:
            startup.check_early(FLAGS.config, FLAGS.workdir)
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
    startup.run(train)


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
    startup.define_common(argv)
    flags.DEFINE_string('split', 'validation', 'Dataset split to evaluate.')
    flags.DEFINE_integer('step', None, 'Checkpoint step; default: the latest.')
    flags.DEFINE_string('tokens', None, 'Evaluate these token ids instead of a split: a .npy of '
                        'ids [B, T], each row one whole document (for a run without tokenizer).')
    flags.DEFINE_string('out_dir', None, 'Where the eval_*.json file goes; default: --workdir.')
    logging.getLogger('absl').addFilter(_ReadOnlyNotices())
    startup.start(argv)

    def evaluate():
        from moejax import config as config_lib
        cfg = FLAGS.config
        saved = os.path.join(FLAGS.workdir, 'config.json')
        if cfg is None and not FLAGS.tokens:
            if not os.path.exists(saved):
                raise ConfigError('--config', None, f'is required: {saved} does not exist')
            cfg = config_lib.from_json(saved)  # a damaged file fails here, before slow imports
        from moejax.readers import evaluation
        if FLAGS.tokens:
            result = evaluation.evaluate_tokens(FLAGS.workdir, FLAGS.tokens, FLAGS.step,
                                                FLAGS.out_dir)
            print(evaluation.describe(result), flush=True)
            return
        result = evaluation.evaluate_checkpoint(cfg, FLAGS.workdir, FLAGS.split, FLAGS.step,
                                                FLAGS.out_dir)
        print(evaluation.describe(result), flush=True)
    startup.run(evaluate)


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
        startup.usage_error(str(err).splitlines()[0])
    if extra:
        startup.usage_error(f'unexpected arguments: {extra}')
    if not FLAGS.workdir:
        startup.usage_error('--workdir is required: the directory of a training run')


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
    startup.run(generate)


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
    startup.run(analyze)


def forward_main(argv=None):
    flags.DEFINE_string('workdir', None, "A training run's directory (config.json, checkpoints/).")
    flags.DEFINE_integer('step', None, 'Checkpoint step; default: the latest.')
    flags.DEFINE_string('tokens', None, 'A .npy file of integer token ids [B, T] (or [T]); each '
                        'row is one whole document.')
    flags.DEFINE_string('out', None, 'Where to write the float32 logits [B, T, V] (.npy).')
    _parse_run_flags(argv or sys.argv)

    def forward():
        if not FLAGS.tokens:
            raise ConfigError('--tokens', FLAGS.tokens, 'is required: a .npy file of token ids')
        import jax

        from moejax.readers import saved_run
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
    startup.run(forward)


def _default_recipe():
    """configs/default.py of this checkout: the base of an imported model's non-model keys."""
    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'configs',
                        'default.py')
    config, problem = startup.load_config(path)
    if problem:
        startup.usage_error(f'{path}: {problem}; pass --config=FILE')
    return config


def convert_main(argv=None):
    argv = argv or sys.argv
    startup.define_common(argv)
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
    startup.start(argv)

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
    startup.run(lambda: _disk_failures_in_one_line(convert, FLAGS.to_hf or FLAGS.workdir))


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
    argv = argv or sys.argv
    _define_plan_flags(argv)
    startup.recipes_importable(argv)
    usage.exit_if_help(argv, startup.load_config)
    try:
        FLAGS(argv)
        FLAGS.config.keys()
    except Exception as err:  # noqa: BLE001 - config_flags raises plain errors for bad files
        startup.usage_error(startup.explain_flag_error(err, argv))
    if not FLAGS.devices or FLAGS.devices < 1:
        startup.usage_error('--devices is required: the number of devices to plan for, e.g. 64')
    import jax  # the backend must not have started: simulate the devices on the CPU
    jax.config.update('jax_platforms', 'cpu')
    if FLAGS.target:
        startup.prepare_target(FLAGS.target)
    else:
        jax.config.update('jax_num_cpu_devices', FLAGS.devices)
    startup.run(_plan)


def _define_plan_flags(argv) -> None:
    from moejax.plan import REMATS_BY_MEMORY
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
    flags.DEFINE_list('remat', list(REMATS_BY_MEMORY), 'model.remat policies to try.')
    flags.DEFINE_list('grad_accum', None, 'opt.grad_accum values to try (default: all valid).')
    flags.DEFINE_string('meshes', None, 'Only these layouts: data=1,fsdp=8,expert=8,tensor=1;...')


def _plan() -> None:
    """Search the layouts, print the table (stdout) and the JSON line after it."""
    from moejax.plan import search
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
