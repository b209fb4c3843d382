"""Expert parallelism: what each exchange moves and computes, and what it costs on 8 devices.

COMMAND: python benchmarks/expert_parallel.py [--shapes=switch,mixtral,deepseek] [--steps=5]
Dropless routing on mesh.expert=8 (configs/default.py, 8 simulated CPU devices), two ways:
- padded: the exchange before the ragged one, capacity buffers with capacity = group size (the
  sort engine at capacity_factor 0 under comm='all_to_all': nothing drops, E/k slots per pair);
- ragged: dropless, rows sent with ragged all-to-all into moe.ep_buffer_factor x the balanced
  rows (default 1.25).
For Switch-like (32 experts, top-1), Mixtral-like (8, top-2) and DeepSeek-like (64, top-8;
expert width d_ff / k, so every shape applies the same parameters to a token) it reports, from
the train step lowered for TPU and for CUDA (exact, from the program's shapes): floats each
exchange moves per device per routed assignment (in units of d_model), and rows the local
experts compute per assignment; from the CPU run: tokens/s against data parallelism (mesh.data=8,
the same dropless model) and memory per device (the dry run's compile). One JSON line; saves
benchmarks/results/expert_parallel.json.
"""
import argparse
import os
import re
import time

os.environ.setdefault('JAX_PLATFORMS', 'cpu')
os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '')
                           + ' --xla_force_host_platform_device_count=8').strip()

import jax  # noqa: E402
import numpy as np  # noqa: E402

import common  # noqa: E402
from configs import default  # noqa: E402
from moejax import mesh as mesh_lib  # noqa: E402
from moejax.moe import expert_parallel  # noqa: E402
from moejax.plan import dry_run  # noqa: E402
from moejax.run import state as state_lib  # noqa: E402
from moejax.run import step as step_lib  # noqa: E402

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'results')
SHAPES = {'switch': (32, 1), 'mixtral': (8, 2), 'deepseek': (64, 8)}
PATHS = {'padded': dict(dispatch='sort', capacity_factor=0.0, eval_capacity_factor=0.0,
                        comm='all_to_all'),
         'ragged': dict(dispatch='dropless', comm='auto')}
EXCHANGE = re.compile(r'= (f32|bf16)\[(\d+(?:,\d+)*)\][^ ]* (ragged-)?all-to-all\(')


def config(shape: str, path: str, mesh: dict):
    experts, top_k = SHAPES[shape]
    cfg = default.get_config()
    cfg.moe.update(num_experts=experts, top_k=top_k, expert_d_ff=cfg.model.d_ff // top_k,
                   **PATHS[path])
    cfg.mesh.update(data=1, fsdp=1, expert=1, tensor=1)
    cfg.mesh.update(**mesh)
    return cfg


def abstract_inputs(setup):
    return setup.abstract_state, dry_run.abstract_batch(setup)


def lowered_hlo(cfg, platform: str) -> str:
    setup = state_lib.make_setup(cfg, mesh_lib.make_mesh(cfg.mesh))
    step = step_lib.compile_steps(setup)[0]
    return step.trace(*abstract_inputs(setup)).lower(
        lowering_platforms=(platform,)).as_text(dialect='hlo')


def exchanged(cfg, platform: str) -> dict:
    """Per device, from the lowered step: the float arrays the exchanges move, per routed
    assignment and d_model (each exchange: dispatch and return, forward and backward)."""
    sizes = [int(np.prod([int(d) for d in dims.split(',')]))
             for _, dims, _ in EXCHANGE.findall(lowered_hlo(cfg, platform))]
    tokens = cfg.data.batch_size * cfg.data.seq_len // 8
    pairs, layers = tokens * cfg.moe.top_k, cfg.model.num_layers
    return {'exchanges': len(sizes) // layers,
            'floats_per_assignment': round(sum(sizes) / len(sizes) / (pairs * cfg.model.d_model), 3)}


def rows_computed(cfg, path: str) -> float:
    """Rows the local experts' FFN runs per routed assignment (kernels; the CPU block loops pad
    each group to a multiple of 32 on top)."""
    tokens = cfg.data.batch_size * cfg.data.seq_len // 8
    experts, top_k = cfg.moe.num_experts, cfg.moe.top_k
    if path == 'padded':  # every group's E x S slots
        return experts / top_k
    rows = expert_parallel.buffer_rows(tokens * top_k, experts, top_k, 8, cfg.moe.ep_buffer_factor)
    return round(rows / (tokens * top_k), 3)


def tokens_per_sec(cfg, steps: int) -> float:
    setup = state_lib.make_setup(cfg, mesh_lib.make_mesh(cfg.mesh))
    state = state_lib.init_state(setup, 0)
    rng = np.random.default_rng(0)
    B, T = cfg.data.batch_size, cfg.data.seq_len
    ids = rng.integers(3, cfg.data.vocab_size, (B, T + 1), dtype=np.int32)
    batch = state_lib.global_batch(setup, {
        'inputs': ids[:, :-1], 'targets': ids[:, 1:], 'segment_ids': np.ones((B, T), np.int32),
        'positions': np.tile(np.arange(T, dtype=np.int32), (B, 1))})
    step = step_lib.compile_steps(setup)[0]
    state, metrics = step(state, batch)
    jax.block_until_ready(metrics)
    start = time.perf_counter()
    for _ in range(steps):
        state, metrics = step(state, batch)
    jax.block_until_ready(metrics)
    return B * T * steps / (time.perf_counter() - start)


def memory_per_device(cfg) -> int:
    setup = dry_run.make_setup(cfg)
    return dry_run.memory(setup, dry_run.compile_step(setup))['total_bytes_per_device']


def measure(shape: str, steps: int) -> dict:
    ep, dp = {'expert': 8}, {'data': 8}
    row = {'shape': shape, 'num_experts': SHAPES[shape][0], 'top_k': SHAPES[shape][1]}
    dp_speed = tokens_per_sec(config(shape, 'ragged', dp), steps)
    row['data_parallel_tokens_per_sec'] = round(dp_speed)
    for path in PATHS:
        cfg = config(shape, path, ep)
        speed = tokens_per_sec(cfg, steps)
        row[path] = {**{p: exchanged(cfg, p) for p in ('tpu', 'cuda')},
                     'rows_per_assignment': rows_computed(cfg, path),
                     'tokens_per_sec': round(speed),
                     'data_parallel_over_expert_parallel': round(dp_speed / speed, 2),
                     'bytes_per_device': memory_per_device(cfg)}
    return row


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('--shapes', default=','.join(SHAPES))
    p.add_argument('--steps', type=int, default=5, help='timed steps per configuration')
    p.add_argument('--out', default=os.path.join(RESULTS, 'expert_parallel.json'))
    args = p.parse_args()
    rows = [measure(shape, args.steps) for shape in args.shapes.split(',')]
    common.save_json({'benchmark': 'expert_parallel', 'devices': 8, 'machine': common.machine(),
                      'jax': jax.__version__, 'rows': rows}, args.out, indent=1)


if __name__ == '__main__':
    main()
