"""One MoE layer against a dense FFN with the same active parameters, forward + backward.

COMMAND: python benchmarks/moe_layer.py [--tokens=4096] [--group_size=1024] [--dtype=float32]
             [--engines=einsum,sort,dropless] [--repeats=9]
The MoE layer is the float32 router + top-k routing (moejax.routing) + dispatch_combine with
each engine + gelu expert FFNs; the dense baseline is gelu(x @ W1) @ W2 with d_ff = k * d_ff.
Both run forward and backward (w.r.t. x and every weight) under jit. Measurements alternate
between the functions round by round (the machine may be shared), and every ratio is the median
of the per-round ratios. Prints one JSON line and saves it to benchmarks/results/.
"""
import argparse
import contextlib
import json
import os
import statistics
import time

import jax
import jax.numpy as jnp

import common  # puts the repository on sys.path
from moejax import dispatch, grouped, routing  # noqa: E402

ALT = 'dropless_ragged_dot' if jax.default_backend() == 'cpu' else 'dropless_block_loops'
RESULTS = os.path.join(os.path.dirname(__file__), 'results')


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('--tokens', type=int, default=4096)
    p.add_argument('--d_model', type=int, default=512)
    p.add_argument('--d_ff', type=int, default=1024)
    p.add_argument('--experts', type=int, default=8)
    p.add_argument('--top_k', type=int, default=2)
    p.add_argument('--capacity_factor', type=float, default=1.25)
    p.add_argument('--group_size', type=int, default=1024, help='tokens per group; 0 = all')
    p.add_argument('--dtype', default='float32', choices=['float32', 'bfloat16'])
    p.add_argument('--engines', default=','.join(dispatch.ENGINES))
    p.add_argument('--repeats', type=int, default=9, help='timed rounds (after a warm-up)')
    p.add_argument('--no_scaling', action='store_true', help='skip the 2T measurements')
    p.add_argument('--no_alt', action='store_true',
                   help='skip the other dropless grouped matmul (ragged_dot on CPU, block '
                        'loops elsewhere), timed at T only')
    p.add_argument('--out', default=None, help='JSON path (default results/moe_layer_<backend>)')
    return p.parse_args()


def init_params(key, a, dtype):
    """Router (float32), experts (E, D, F) and the dense FFN with d_ff = k * F; all float32."""
    ks = jax.random.split(key, 5)
    D, F, E, k = a.d_model, a.d_ff, a.experts, a.top_k
    normal = lambda key, shape, fan_in: jax.random.normal(key, shape) / fan_in ** 0.5
    return {'router_DE': normal(ks[0], (D, E), D),
            'w_in_EDF': normal(ks[1], (E, D, F), D), 'w_out_EFD': normal(ks[2], (E, F, D), F),
            'w1_DF': normal(ks[3], (D, k * F), D), 'w2_FD': normal(ks[4], (k * F, D), k * F)}


def moe_loss(params, x_TD, probe_TD, *, engine, group_size, a):
    """Router + dispatch + experts, as in moejax.moe.MoEBlock; loss = <y, probe> + balance."""
    T, D = x_TD.shape
    S = min(group_size or T, T)
    x_GSD = x_TD.reshape(T // S, S, D)
    mask_GS = jnp.ones(x_GSD.shape[:2], bool)
    logits_GSE = jnp.einsum('gsd,de->gse', x_GSD.astype(jnp.float32), params['router_DE'])
    route = routing.top_k_routing(logits_GSE, mask_GS, a.top_k)
    dt = x_TD.dtype
    w = dispatch.ExpertWeights(params['w_in_EDF'].astype(dt), None,
                               params['w_out_EFD'].astype(dt))
    cap = routing.capacity(S, a.experts, a.top_k, a.capacity_factor)
    y_GSD, _ = dispatch.dispatch_combine(x_GSD, mask_GS, route, w, engine=engine, capacity=cap)
    out = jnp.vdot(y_GSD.reshape(T, D).astype(jnp.float32), probe_TD)
    return out + 1e-2 * route.losses['aux_loss'] + 1e-3 * route.losses['z_loss']


def dense_loss(params, x_TD, probe_TD):
    dt = x_TD.dtype
    h = jax.nn.gelu(x_TD @ params['w1_DF'].astype(dt))
    return jnp.vdot((h @ params['w2_FD'].astype(dt)).astype(jnp.float32), probe_TD)


def compiled(loss_fn, params, x, probe):
    """AOT-compiled forward+backward w.r.t. params and x."""
    step = jax.jit(jax.value_and_grad(loss_fn, argnums=(0, 1)))
    return step.lower(params, x, probe).compile()


@contextlib.contextmanager
def other_grouped_matmul():
    """While compiling: dropless with the grouped matmul this backend does not use by default
    (jax.lax.ragged_dot on CPU; moejax.grouped's block loops elsewhere)."""
    saved = grouped.ffn_blocks
    if jax.default_backend() == 'cpu':
        grouped.ffn_blocks = lambda rows_multiple=None, **_: None
    else:
        grouped.ffn_blocks = lambda rows_multiple=None, **_: (
            grouped.CPU_BLOCKS if rows_multiple is None else None)
    try:
        yield
    finally:
        grouped.ffn_blocks = saved


def time_round_robin(fns: dict, repeats: int) -> tuple[dict, dict]:
    """Runs every function once per round, `repeats` rounds after one warm-up round.

    Returns wall and process-CPU milliseconds per function. The order reverses every round, so
    a drift of the machine's load hits all alike; CPU time is less sensitive to other processes
    taking turns on the cores (but blind to idle cores)."""
    wall, cpu = {name: [] for name in fns}, {name: [] for name in fns}
    names = list(fns)
    for r in range(repeats + 1):
        for name in (names if r % 2 else names[::-1]):
            fn, args = fns[name]
            t0, c0 = time.perf_counter(), time.process_time()
            jax.block_until_ready(fn(*args))
            if r:
                wall[name].append(1e3 * (time.perf_counter() - t0))
                cpu[name].append(1e3 * (time.process_time() - c0))
    return wall, cpu


def median_ratio(num: list[float], den: list[float]) -> float:
    return statistics.median(n / d for n, d in zip(num, den))


def main():
    a = parse_args()
    dtype = jnp.dtype(a.dtype)
    engines = [e for e in a.engines.split(',') if e]
    params = init_params(jax.random.key(0), a, dtype)
    sizes = [a.tokens] if a.no_scaling else [a.tokens, 2 * a.tokens]
    fns = {}
    for T in sizes:
        x = jax.random.normal(jax.random.key(T), (T, a.d_model), dtype)
        probe = jax.random.normal(jax.random.key(T + 1), (T, a.d_model), jnp.float32)
        fns[('dense', T)] = (compiled(dense_loss, params, x, probe), (params, x, probe))
        for e in engines:
            loss = lambda p, x, pr, e=e: moe_loss(p, x, pr, engine=e, group_size=a.group_size,
                                                   a=a)
            fns[(e, T)] = (compiled(loss, params, x, probe), (params, x, probe))
        if T == a.tokens and 'dropless' in engines and not a.no_alt:
            loss = lambda p, x, pr: moe_loss(p, x, pr, engine='dropless',
                                             group_size=a.group_size, a=a)
            with other_grouped_matmul():
                fns[(ALT, T)] = (compiled(loss, params, x, probe), (params, x, probe))
    times, cpu_times = time_round_robin(fns, a.repeats)
    T = a.tokens
    timed = [e for e in engines + [ALT] if (e, T) in fns]
    med = lambda key: round(statistics.median(times[key]), 2)
    result = {
        'benchmark': 'moe_layer', 'backend': jax.default_backend(),
        'device': jax.devices()[0].device_kind, 'cpu_count': os.cpu_count(),
        'machine': common.machine(), 'jax': jax.__version__,
        'shapes': {'tokens': T, 'd_model': a.d_model, 'd_ff': a.d_ff, 'experts': a.experts,
                   'top_k': a.top_k, 'capacity_factor': a.capacity_factor,
                   'group_size': min(a.group_size or T, T),
                   'groups': T // min(a.group_size or T, T),
                   'dense_d_ff': a.top_k * a.d_ff, 'dtype': a.dtype},
        'what': 'forward+backward (grads w.r.t. x and all weights) under jit; median ms over '
                f'{a.repeats} alternating rounds; ratio = median of per-round moe/dense',
        'dense_ms': med(('dense', T)),
        'moe_ms': {e: med((e, T)) for e in timed},
        'ratio': {e: round(median_ratio(times[(e, T)], times[('dense', T)]), 3) for e in timed},
        'ratio_cpu_time': {e: round(median_ratio(cpu_times[(e, T)], cpu_times[('dense', T)]), 3)
                           for e in timed},
    }
    if not a.no_scaling:
        result['scaling_2x'] = {e: round(median_ratio(times[(e, 2 * T)], times[(e, T)]), 3)
                                for e in ['dense'] + engines}
    line = json.dumps(result)
    print(line, flush=True)
    out = a.out or os.path.join(RESULTS, f'moe_layer_{jax.default_backend()}.json')
    os.makedirs(os.path.dirname(out), exist_ok=True)
    with open(out, 'w') as f:
        f.write(line + '\n')


if __name__ == '__main__':
    main()
