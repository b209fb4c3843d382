"""One MoE layer against a dense FFN with the same active parameters, forward + backward.

COMMAND: python benchmarks/moe_layer.py [--tokens=4096] [--group_size=1024] [--dtype=float32]
             [--engines=einsum,sort,dropless] [--activation=swiglu] [--repeats=9]
             [--grouped_matmul=auto,ragged_dot]
GPU:     python benchmarks/moe_layer.py --dtype=bfloat16 --tokens=65536 --d_model=1024
             --d_ff=2048 --grouped_matmul=auto,ragged_dot,blocks
The MoE layer is the float32 router + top-k routing (moejax.moe.routing) + dispatch_combine with
each engine + the experts' FFNs (moejax.moe.experts: SwiGLU by default, or GELU); the dense
baseline is the same FFN with d_ff = k * d_ff, called as the model calls it, on [B, T, D]
(B rows of group_size tokens). Dropless runs with each --grouped_matmul backend (the first is
reported as 'dropless', others as 'dropless_<backend>'). Everything runs forward and backward
(w.r.t. x and every weight) under jit. Measurements alternate between the functions round by
round (the machine may be shared), and every ratio is the median of the per-round ratios.
TFLOP/s counts the model FLOPs of the active parameters (6 per parameter per token, the same
for all); MFU divides by the chip's spec peak (bf16) where known, else by a timed matmul.
Prints one JSON line and saves it to benchmarks/results/moe_layer_<backend>.json.
"""
import argparse
import functools
import os
import statistics
import time

import jax
import jax.numpy as jnp

import common  # puts the repository on sys.path
from moejax.moe import dispatch  # noqa: E402
from moejax.moe import experts  # noqa: E402
from moejax.moe import routing  # noqa: E402

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
    p.add_argument('--activation', default='swiglu', choices=['swiglu', 'gelu'])
    p.add_argument('--grouped_matmul', default='auto,ragged_dot',
                   help='dropless backends (moe.grouped_matmul), comma-separated; the others '
                        'than the first are timed at T only')
    p.add_argument('--out', default=None, help='JSON path (default results/moe_layer_<backend>)')
    return p.parse_args()


def init_params(key, a):
    """Router (float32), experts (E, D, F) and the dense FFN with d_ff = k * F; all float32."""
    ks = jax.random.split(key, 7)
    D, F, E, k = a.d_model, a.d_ff, a.experts, a.top_k
    normal = lambda key, shape, fan_in: jax.random.normal(key, shape) / fan_in ** 0.5
    gated = a.activation == 'swiglu'
    return {'router_DE': normal(ks[0], (D, E), D),
            'w_in_EDF': normal(ks[1], (E, D, F), D), 'w_out_EFD': normal(ks[2], (E, F, D), F),
            'w_gate_EDF': normal(ks[5], (E, D, F), D) if gated else None,
            'w1_DF': normal(ks[3], (D, k * F), D), 'w2_FD': normal(ks[4], (k * F, D), k * F),
            'wg_DF': normal(ks[6], (D, k * F), D) if gated else None}


def moe_loss(params, x_BTD, probe_BTD, *, engine, grouped_matmul, a):
    """Router + dispatch + experts, as in moejax.moe.MoEBlock; loss = <y, probe> + balance."""
    B, T, D = x_BTD.shape
    x_GSD = x_BTD  # one routing group per row, as MoEBlock with moe.group_size = T
    mask_GS = jnp.ones(x_GSD.shape[:2], bool)
    logits_GSE = jnp.einsum('gsd,de->gse', x_GSD.astype(jnp.float32), params['router_DE'])
    route = routing.top_k_routing(logits_GSE, mask_GS, a.top_k)
    dt = x_BTD.dtype
    cast = lambda w: None if w is None else w.astype(dt)
    w = experts.ExpertWeights(cast(params['w_in_EDF']), cast(params['w_gate_EDF']),
                              cast(params['w_out_EFD']))
    cap = routing.capacity(T, a.experts, a.top_k, a.capacity_factor)
    y_GSD, _ = dispatch.dispatch_combine(x_GSD, mask_GS, route, w, engine=engine, capacity=cap,
                                         grouped_matmul=grouped_matmul)
    out = jnp.vdot(y_GSD.astype(jnp.float32), probe_BTD)
    return out + 1e-2 * route.losses['aux_loss'] + 1e-3 * route.losses['z_loss']


def dense_loss(params, x_BTD, probe_BTD):
    """The dense FFN as layers.MLP calls it: experts.ffn on [B, T, D]."""
    y_BTD = experts.ffn(x_BTD, params['w1_DF'], params['wg_DF'], params['w2_FD'])
    return jnp.vdot(y_BTD.astype(jnp.float32), probe_BTD)


def model_flops(a, tokens: int) -> float:
    """Training FLOPs of the layer: 6 x active params per token (router + k experts' FFN)."""
    per_expert = (3 if a.activation == 'swiglu' else 2) * a.d_model * a.d_ff
    return 6 * tokens * (a.top_k * per_expert + a.d_model * a.experts)


def compiled(loss_fn, params, x, probe):
    """AOT-compiled forward+backward w.r.t. params and x."""
    step = jax.jit(jax.value_and_grad(loss_fn, argnums=(0, 1)))
    return step.lower(params, x, probe).compile()


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


def dropless_backends(a) -> list[str]:
    """The --grouped_matmul choices, resolved for this machine, without repeats."""
    seen = []
    for b in (b for b in a.grouped_matmul.split(',') if b):
        if experts.resolve(b) not in seen:
            seen.append(experts.resolve(b))
    return seen


def build(a, params, T: int, engines: list[str], backends: list[str]) -> dict:
    """{(name, T): (compiled step, args)} for the dense FFN and each engine (and backend)."""
    S = min(a.group_size or T, T)
    x = jax.random.normal(jax.random.key(T), (T // S, S, a.d_model), jnp.dtype(a.dtype))
    probe = jax.random.normal(jax.random.key(T + 1), x.shape, jnp.float32)
    fns = {('dense', T): (compiled(dense_loss, params, x, probe), (params, x, probe))}
    for e in engines:
        runs = [(e, backends[0])]
        if e == 'dropless' and T == a.tokens:
            runs += [(f'dropless_{b}', b) for b in backends[1:]]
        for name, backend in runs:
            loss = functools.partial(moe_loss, engine=e, grouped_matmul=backend, a=a)
            fns[(name, T)] = (compiled(loss, params, x, probe), (params, x, probe))
    return fns


def main():
    a = parse_args()
    common.gpu_flags()
    engines = [e for e in a.engines.split(',') if e]
    backends = dropless_backends(a)
    params = init_params(jax.random.key(0), a)
    fns = {}
    for T in [a.tokens] if a.no_scaling else [a.tokens, 2 * a.tokens]:
        fns.update(build(a, params, T, engines, backends))
    peak = common.spec_peak()
    measured = None if peak else common.matmul_peak(jnp.dtype(a.dtype))
    times, cpu_times = time_round_robin(fns, a.repeats)
    if measured:
        peak = statistics.median(measured() for _ in range(5))
    result = report(a, fns, times, cpu_times, engines, backends, peak)
    common.save_json(result, a.out or os.path.join(RESULTS, f'moe_layer_{jax.default_backend()}.json'))


def report(a, fns, times, cpu_times, engines, backends, peak) -> dict:
    T, S = a.tokens, min(a.group_size or a.tokens, a.tokens)
    timed = [name for name, t in fns if t == T and name != 'dense']
    med = lambda key: statistics.median(times[key])
    dense_flops = model_flops(a, T) - 6 * T * a.d_model * a.experts  # no router
    tflops = {name: (dense_flops if name == 'dense' else model_flops(a, T)) / med((name, T))
              / 1e9 for name in ['dense'] + timed}
    result = {
        'benchmark': 'moe_layer', 'backend': jax.default_backend(),
        'device': jax.devices()[0].device_kind, 'cpu_count': os.cpu_count(),
        'machine': common.machine(), 'jax': jax.__version__,
        'shapes': {'tokens': T, 'd_model': a.d_model, 'd_ff': a.d_ff, 'experts': a.experts,
                   'top_k': a.top_k, 'capacity_factor': a.capacity_factor, 'group_size': S,
                   'groups': T // S, 'dense_d_ff': a.top_k * a.d_ff, 'dtype': a.dtype,
                   'activation': a.activation},
        'grouped_matmul': {'dropless': backends[0],
                           **{f'dropless_{b}': b for b in backends[1:]}},
        'what': 'forward+backward (grads w.r.t. x and all weights) under jit; median ms over '
                f'{a.repeats} alternating rounds; ratio = median of per-round moe/dense; '
                'TFLOP/s = 6 x active params x tokens / time',
        'peak_tflops': round(peak / 1e12, 3),
        'peak_from': 'spec (bf16)' if common.spec_peak() else 'measured matmul',
        'dense_ms': round(med(('dense', T)), 2),
        'moe_ms': {e: round(med((e, T)), 2) for e in timed},
        'ratio': {e: round(median_ratio(times[(e, T)], times[('dense', T)]), 3) for e in timed},
        'ratio_cpu_time': {e: round(median_ratio(cpu_times[(e, T)], cpu_times[('dense', T)]), 3)
                           for e in timed},
        'tflops': {k: round(v, 4) for k, v in tflops.items()},
        'mfu': {k: round(v * 1e12 / peak, 4) for k, v in tflops.items()},
    }
    if not a.no_scaling:
        result['scaling_2x'] = {e: round(median_ratio(times[(e, 2 * T)], times[(e, T)]), 3)
                                for e in ['dense'] + engines}
    return result


if __name__ == '__main__':
    main()
