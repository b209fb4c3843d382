"""Attention implementations (moejax.model.attention): forward+backward time and peak temporaries.

COMMAND: python benchmarks/attention.py [--shapes=4x256x8x64,2x1024x8x64,1x2048x8x64]
             [--kv_heads=2] [--dtype=float32] [--block=128] [--impls=xla,chunked] [--repeats=5]
Each shape is BxTxHxK (batch, tokens, query heads, head dim) with H/kv_heads query heads per K/V
head; rows pack four documents. The loss is <attend(q, k, v), probe>, differentiated w.r.t.
q, k and v under jit. Implementations are timed round-robin (see moe_layer.py); ratios are
medians of per-round ratios to xla; temp_bytes is XLA's compiled memory analysis (the peak of
temporaries, which for xla includes the [B, H, T, T] scores); error_to_xla is the largest
difference of the loss and gradients from xla's, relative to xla's largest (the fused kernels'
numerics, checked wherever an accelerator runs this). Prints one JSON line and saves it
to benchmarks/results/.
"""
import argparse
import os
import statistics

import jax
import jax.numpy as jnp
import numpy as np

import common  # puts the repository on sys.path
from moe_layer import median_ratio, time_round_robin
from moejax.model import attention  # noqa: E402

RESULTS = os.path.join(os.path.dirname(__file__), 'results')


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('--shapes', default='4x256x8x64,2x1024x8x64,1x2048x8x64')
    p.add_argument('--kv_heads', type=int, default=2)
    p.add_argument('--dtype', default='float32', choices=['float32', 'bfloat16'])
    p.add_argument('--block', type=int, default=attention.DEFAULT_BLOCK,
                   help="model.attention_block ('chunked')")
    p.add_argument('--impls', default=None, help='default: xla, chunked (+ flash on GPU/TPU)')
    p.add_argument('--repeats', type=int, default=5, help='timed rounds (after a warm-up)')
    p.add_argument('--out', default=None, help='JSON path (default results/attention_<backend>)')
    return p.parse_args()


def make_inputs(B, T, H, G, K, dtype):
    ks = jax.random.split(jax.random.key(T), 4)
    q, probe = (jax.random.normal(key, (B, T, H, K), dtype) for key in ks[:2])
    k, v = (jax.random.normal(key, (B, T, G, K), dtype) for key in ks[2:])
    seg = jnp.broadcast_to(1 + jnp.arange(T) * 4 // T, (B, T)).astype(jnp.int32)
    return q, k, v, seg, probe


def compiled(impl, block, args):
    def loss(q, k, v, seg, probe):
        out = attention.attend(q, k, v, seg, implementation=impl, block=block)
        return jnp.vdot(out.astype(jnp.float32), probe.astype(jnp.float32))
    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2))).lower(*args).compile()


def loss_and_grads(fns, impl, shape) -> list:
    step, args = fns[(impl, shape)]
    return [np.asarray(x, np.float64) for x in jax.tree.leaves(step(*args))]


def error_to(want, got) -> float:
    """max |got - want| / max |want| over the loss and the gradients."""
    return max(float(np.max(np.abs(g - w)) / max(float(np.max(np.abs(w))), 1e-30))
               for g, w in zip(got, want))


def main():
    a = parse_args()
    dtype = jnp.dtype(a.dtype)
    backend = jax.default_backend()
    impls = (a.impls.split(',') if a.impls
             else ['xla', 'chunked'] + (['flash'] if backend in ('gpu', 'tpu') else []))
    fns, temp, results = {}, {}, []
    for shape in a.shapes.split(','):
        B, T, H, K = (int(x) for x in shape.split('x'))
        args = make_inputs(B, T, H, a.kv_heads, K, dtype)
        for impl in impls:
            step = compiled(impl, a.block, args)
            fns[(impl, shape)] = (step, args)
            memory = step.memory_analysis()
            temp[(impl, shape)] = int(memory.temp_size_in_bytes) if memory else None
    times, _ = time_round_robin(fns, a.repeats)
    for shape in a.shapes.split(','):
        B, T, H, K = (int(x) for x in shape.split('x'))
        entry = {'B': B, 'T': T, 'H': H, 'kv_heads': a.kv_heads, 'K': K,
                 'auto': attention.resolve('auto', jax.ShapeDtypeStruct((B, T, H, K), dtype),
                                           a.block),
                 'ms': {i: round(statistics.median(times[(i, shape)]), 2) for i in impls},
                 'temp_bytes': {i: temp[(i, shape)] for i in impls}}
        if 'xla' in impls:
            entry['ratio_to_xla'] = {i: round(median_ratio(times[(i, shape)],
                                                           times[('xla', shape)]), 3)
                                     for i in impls}
            want = loss_and_grads(fns, 'xla', shape)
            entry['error_to_xla'] = {i: error_to(want, loss_and_grads(fns, i, shape))
                                     for i in impls}
        results.append(entry)
    result = {
        'benchmark': 'attention', 'backend': backend, 'device': jax.devices()[0].device_kind,
        'machine': common.machine(), 'jax': jax.__version__, 'dtype': a.dtype,
        'block': a.block, 'cpu_chunked_from': attention.CPU_CHUNKED_FROM,
        'what': 'forward+backward (grads w.r.t. q, k, v) under jit, causal, 4 packed documents '
                f'per row; median ms over {a.repeats} alternating rounds',
        'results': results,
    }
    common.save_json(result, a.out or os.path.join(RESULTS, f'attention_{backend}.json'))


if __name__ == '__main__':
    main()
