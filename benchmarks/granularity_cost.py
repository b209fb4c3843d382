"""What granularity costs per step, and where (issue 25).

COMMAND: python benchmarks/granularity_cost.py [--steps=10] [--granularities=1,2,4,8]
The arms of benchmarks/granularity.py (G splits Switch's 32 experts into 32 G experts of width
d_ff / G, top-G: equal active and total parameters) timed on this machine: the whole jitted
train step of each arm, the arms taking turns step by step (train_step.py's Model), and the
MoE block's own parts (forward + backward of the block, of the router with its routing losses,
and of the dropless layout alone) for the smallest and the largest G. FLOPs are equal across
arms by construction, so every ratio above 1 is overhead that grows with G: the router's
[tokens, 32 G] scores and top-G, G times the rows gathered into and scattered out of the
experts, and 32 G small matmuls instead of 32 larger ones. Prints one JSON line and saves
benchmarks/results/granularity_cost_<backend>.json.
"""
import argparse
import json
import os
import statistics
import time

import common  # puts the repository on sys.path
import jax
import jax.numpy as jnp
from flax import nnx

import granularity
import train_step
from configs import default
from moejax.moe import grouped
from moejax.moe.block import MoEBlock

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'results')


def arm_config(granularity_g: int | None, shared: bool = False):
    """configs/default.py with the granularity study's moe keys (None: the dense model)."""
    if granularity_g is None:
        return default.get_config('dense')
    cfg = default.get_config()
    cfg.moe.update(granularity.moe_keys(granularity_g, shared, cfg.model.d_ff))
    return cfg


def best_ms(fn, *args, repeats: int = 5) -> float:
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return round(1e3 * min(times), 2)


def block_parts(cfg) -> dict:
    """Milliseconds of the MoE block's forward + backward, of its router (scores, top-k, gates,
    losses) and of the dropless layout, on one batch of the config's shape."""
    block = MoEBlock(cfg, rngs=nnx.Rngs(0))
    b, t, d = cfg.data.batch_size, cfg.data.seq_len, cfg.model.d_model
    x_BTD = jax.random.normal(jax.random.key(1), (b, t, d))
    mask_BT = jnp.ones((b, t), bool)
    graphdef, params, rest = nnx.split(block, nnx.Param, ...)

    def whole(params, x_BTD):
        y_BTD, stats = nnx.merge(graphdef, params, rest)(x_BTD, mask_BT.astype(jnp.int32),
                                                         train=True)
        return jnp.sum(y_BTD * x_BTD) + stats['aux_loss'] + stats['z_loss']

    def router(params, x_BTD):
        route = nnx.merge(graphdef, params, rest).router(x_BTD, mask_BT, train=True, rng=None)
        return route.losses['aux_loss'] + route.losses['z_loss'] + jnp.sum(route.gate_GSK)
    e, k = cfg.moe.num_experts, cfg.moe.top_k
    expert_R = jax.random.randint(jax.random.key(2), (b * t * k,), 0, e)
    layout = jax.jit(lambda ex: grouped.sorted_layout(ex, jnp.ones_like(ex, bool), e, 32))
    return {'block_fwd_bwd_ms': best_ms(jax.jit(jax.grad(whole, argnums=(0, 1))), params, x_BTD),
            'router_fwd_bwd_ms': best_ms(jax.jit(jax.grad(router, argnums=(0, 1))), params,
                                         x_BTD),
            'layout_ms': best_ms(layout, expert_R)}


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('--granularities', default='1,2,4,8')
    p.add_argument('--steps', type=int, default=10, help='timed rounds, one step per arm each')
    p.add_argument('--out', default=None)
    a = p.parse_args()
    gs = [int(g) for g in a.granularities.split(',')]
    cfgs = {'dense': arm_config(None), **{f'g{g}': arm_config(g) for g in gs},
            'g4_shared': arm_config(4, shared=True)}
    models = {name: train_step.Model(cfg) for name, cfg in cfgs.items()}
    for model in models.values():
        model.step(), model.step()  # compile, warm up
    times = {name: [] for name in models}
    for r in range(a.steps):
        for name in (list(models) if r % 2 else list(models)[::-1]):
            times[name].append(models[name].step())
    step_ms = {name: round(1e3 * statistics.median(t), 1) for name, t in times.items()}
    ratio = lambda name, base: round(statistics.median(
        x / y for x, y in zip(times[name], times[base])), 3)
    out = {'benchmark': 'granularity_cost', 'backend': jax.default_backend(),
           'machine': common.machine(), 'jax': jax.__version__, 'timed_rounds': a.steps,
           'step_ms': step_ms,
           'step_ratio_vs_g1': {n: ratio(n, f'g{gs[0]}') for n in models if n != f'g{gs[0]}'},
           'step_ratio_vs_dense': {n: ratio(n, 'dense') for n in models if n != 'dense'},
           'moe_block_parts': {f'g{g}': block_parts(cfgs[f'g{g}']) for g in (gs[0], gs[-1])}}
    line = json.dumps(out)
    print(line, flush=True)
    path = a.out or os.path.join(RESULTS, f'granularity_cost_{jax.default_backend()}.json')
    with open(path, 'w') as f:
        f.write(line + '\n')


if __name__ == '__main__':
    main()
