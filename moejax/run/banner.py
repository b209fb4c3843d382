"""What a training run says about itself: before the first step, what will run on what (the
config, the model's parameters, devices and mesh, data and tokenizer, steps, workdir, new or
resumed); at the end, that the run is finished and the command that extends it.
"""
import os
import shlex

import jax

from moejax import config as config_lib
from moejax.model import transformer


def _millions(count: int) -> str:
    return f'{count / 1e6:.2f}M'


def _model_line(cfg) -> str:
    m, e = cfg.model, cfg.moe
    counts = transformer.param_counts(cfg)
    shape = f'{m.num_layers} layers, d_model {m.d_model}'
    if m.moe_every:
        moe_layers = sum(transformer.is_moe_layer(cfg, i) for i in range(m.num_layers))
        shape += (f', {moe_layers} MoE layer(s) of {e.num_experts} experts ({e.router} '
                  f'router, k={e.top_k}, {e.dispatch} dispatch)')
    return (f'  model: {shape}; {_millions(counts["params"])} parameters, '
            f'{_millions(counts["active_params"])} active per token')


def config_source(argv: list[str] | None) -> str:
    """The --config argument of the command (file and variant), as given."""
    given = [a.split('=', 1)[1] for a in argv or [] if a.startswith('--config=')]
    overrides = sum(a.startswith('--config.') for a in argv or [])
    return (given[0] if given else 'a config') + (f' with {overrides} override(s)'
                                                  if overrides else '')


def start_banner(cfg, workdir: str, start: int, data: str, argv: list[str] | None) -> str:
    """The lines printed before a run starts (or resumes): config, model, devices and mesh,
    data and tokenizer, steps, workdir."""
    t, d = cfg.train, cfg.data
    shape = config_lib.mesh_shape(cfg.mesh, jax.device_count())
    devices = jax.devices()
    how = ('already finished' if start >= t.num_steps else f'resuming from step {start}') \
        if start else 'a new run'
    return '\n'.join([
        f'moejax: training {config_source(argv)} in {os.path.abspath(workdir)} ({how})',
        _model_line(cfg),
        f'  devices: {len(devices)} x {devices[0].device_kind} in {jax.process_count()} '
        f'process(es); mesh ' + ' '.join(f'{a}={n}' for a, n in shape.items()),
        f'  data: {data}, {d.tokenizer} tokenizer of {d.vocab_size:,} ids; {d.batch_size} x '
        f'{d.seq_len} = {d.batch_size * d.seq_len:,} tokens per step',
        f'  steps: {start} -> {t.num_steps}; {cfg.opt.name} lr {cfg.opt.lr:g} ({cfg.opt.schedule});'
        f' eval every {t.eval_every or t.num_steps}, checkpoint every {t.checkpoint_every}'])


def extend_command(argv: list[str] | None, num_steps: int) -> str:
    """The command that continues this run to num_steps: the one given, without --restart or
    --dry_run, with --config.train.num_steps set."""
    if not argv:
        return f'rerun with --config.train.num_steps={num_steps}'
    program = argv[0]
    program = f'python {os.path.relpath(program)}' if program.endswith('.py') else \
        os.path.basename(program)
    kept = [a for a in argv[1:] if a.split('=', 1)[0] not in (
        '--restart', '--dry_run', '--config.train.num_steps')]
    return ' '.join([program] + [shlex.quote(a) for a in kept] +
                    [f'--config.train.num_steps={num_steps}'])


def finished_message(step: int, argv: list[str] | None) -> str:
    """What a run that has reached train.num_steps says, naming the command that extends it
    (to twice the steps; the resume guard lets train.num_steps change)."""
    return (f'The run is finished: step {step} of train.num_steps={step}, checkpoint saved. To '
            f'train further, raise train.num_steps: {extend_command(argv, 2 * step)}')
