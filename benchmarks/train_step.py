"""Train-step speed of an MoE config against its dense counterpart: step time, tokens/s, MFU.

COMMAND: python benchmarks/train_step.py [--config=configs/default.py]
             [--dense=CONFIG,dense] [--engines=sort,dropless,einsum] [--steps=10]
             [--grouped_matmul=auto]
GPU:     python benchmarks/train_step.py --config=configs/moe_1b.py --dense=configs/moe_1b.py:dense
Each model runs the real jitted train_step (moejax.run.step) on synthetic batches (uniform random
token ids, one document per row; no data pipeline). After warm-up, the models take turns step
by step, and each round also times a large matmul in the model dtype: its FLOP/s is the
measured peak (peak_flops_measured). Model FLOPs are counted the way MaxText does: 6 x active
matmul params per token + causal attention at half (moejax.model.flops_per_token); `tflops` is
their rate, `mfu` divides it by the measured peak, `mfu_vs_spec` by the chip's spec sheet
(bf16: H100/H200 989, A100 312, TPU v5p 459, v5e 197 TFLOP/s) where the chip is known.
On a GPU the run sets MaxText's XLA flags first (moejax.xla_flags), as the train command does.
Prints one JSON line and saves it to benchmarks/results/train_step_<backend>.json.
"""
import argparse
import json
import os
import statistics
import time

import common  # puts the repository on sys.path
import jax
import jax.numpy as jnp
import numpy as np

from moejax import mesh as mesh_lib  # noqa: E402
from moejax import validate
from moejax.model import transformer as model_lib  # noqa: E402
from moejax.run import metrics as metrics_lib  # noqa: E402
from moejax.run import state as state_lib  # noqa: E402
from moejax.run import step as step_lib  # noqa: E402

REPO = common.REPO

DTYPES = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16}


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('--config', default='configs/default.py')
    p.add_argument('--dense', default=None, help='dense counterpart (default: CONFIG with its '
                   'variants and dense, e.g. configs/default.py:tiny,dense)')
    p.add_argument('--engines', default='', help='MoE dispatch engines (default: the config\'s)')
    p.add_argument('--steps', type=int, default=10, help='timed rounds, one step per model each')
    p.add_argument('--warmup', type=int, default=2, help='untimed steps per model (1 compiles)')
    p.add_argument('--batch_size', type=int, default=0, help='override data.batch_size')
    p.add_argument('--peak_n', type=int, default=0, help='matmul size for the peak (0: auto)')
    p.add_argument('--grouped_matmul', default='',
                   help="moe.grouped_matmul for the MoE models (default: the config's)")
    p.add_argument('--out', default=None)
    return p.parse_args()


def synthetic_batch(cfg, seed: int) -> dict:
    b, t, v = cfg.data.batch_size, cfg.data.seq_len, cfg.data.vocab_size
    tokens = np.random.default_rng(seed).integers(0, v, (b, t + 1), dtype=np.int32)
    return {'inputs': tokens[:, :-1], 'targets': tokens[:, 1:],
            'segment_ids': np.ones((b, t), np.int32),
            'positions': np.broadcast_to(np.arange(t, dtype=np.int32), (b, t)).copy()}


class Model:
    """One config's jitted train step, its state and a fixed batch."""

    def __init__(self, cfg):
        validate.check(cfg, jax.device_count())
        self.cfg = cfg
        self.setup = state_lib.make_setup(cfg, mesh_lib.make_mesh(cfg.mesh))
        self.state = state_lib.init_state(self.setup, cfg.train.seed)
        self.step_fn, _ = step_lib.compile_steps(self.setup)
        self.batch = state_lib.global_batch(self.setup, synthetic_batch(cfg, 0))
        self.tokens = cfg.data.batch_size * cfg.data.seq_len

    def step(self) -> float:
        """One train step; returns its wall time in seconds."""
        t0 = time.perf_counter()
        self.state, metrics = self.step_fn(self.state, self.batch)
        jax.block_until_ready((self.state, metrics))
        return time.perf_counter() - t0


def dense_counterpart(config: str) -> str:
    """The config with the dense variant added to its own (tiny stays tiny)."""
    path, _, variants = config.partition(':')
    return f"{path}:{variants + ',' if variants else ''}dense"


def main():
    a = parse_args()
    common.gpu_flags()
    moe_cfg = common.load_config(a.config)
    dense_cfg = common.load_config(a.dense or dense_counterpart(a.config))
    cfgs = {}
    for engine in [e for e in a.engines.split(',') if e] or [moe_cfg.moe.dispatch]:
        cfg = common.load_config(a.config)
        cfg.moe.dispatch = engine
        cfg.moe.grouped_matmul = a.grouped_matmul or cfg.moe.grouped_matmul
        cfgs[f'moe_{engine}'] = cfg
    cfgs['dense'] = dense_cfg
    for cfg in cfgs.values():
        if a.batch_size:
            cfg.data.batch_size = a.batch_size
    models = {name: Model(cfg) for name, cfg in cfgs.items()}
    for model in models.values():
        for _ in range(a.warmup):
            model.step()
    dtype = DTYPES[moe_cfg.model.dtype]
    peak = common.matmul_peak(dtype, a.peak_n)
    peak()
    times, peaks = {name: [] for name in models}, []
    names = list(models)
    for r in range(a.steps):
        peaks.append(peak())
        for name in (names if r % 2 else names[::-1]):
            times[name].append(models[name].step())
    line = json.dumps(report(a, models, times, peaks))
    print(line, flush=True)
    out = a.out or os.path.join(REPO, 'benchmarks', 'results',
                                f'train_step_{jax.default_backend()}.json')
    os.makedirs(os.path.dirname(out), exist_ok=True)
    with open(out, 'w') as f:
        f.write(line + '\n')


def report(a, models, times, peaks) -> dict:
    """step_ms, tokens/s and MFU (vs the measured peak; vs the chip's spec where known)."""
    device = jax.devices()[0]
    spec_peak = metrics_lib.peak_flops(device)
    out = {'benchmark': 'train_step', 'backend': jax.default_backend(),
           'device': device.device_kind, 'num_devices': jax.device_count(),
           'machine': common.machine(),
           'jax': jax.__version__, 'config': os.path.relpath(a.config, REPO),
           'data': 'synthetic uniform token ids',
           'timed_steps': a.steps,
           'peak_flops_measured': round(statistics.median(peaks), -6),
           'peak_flops_spec': spec_peak, 'models': {}}
    for name, model in models.items():
        cfg = model.cfg
        counts = model_lib.param_counts(cfg)
        fpt = model_lib.flops_per_token(cfg)
        step_s = statistics.median(times[name])
        mfu_r = [fpt * model.tokens / t / p for t, p in zip(times[name], peaks)]
        entry = {'dispatch': cfg.moe.dispatch if cfg.model.moe_every else None,
                 'grouped_matmul': cfg.moe.grouped_matmul if cfg.model.moe_every else None,
                 'dtype': cfg.model.dtype, 'batch_tokens': model.tokens,
                 'params': counts['params'], 'active_params': counts['active_params'],
                 'flops_per_token': fpt, 'step_ms': round(1e3 * step_s, 2),
                 'tokens_per_sec': round(model.tokens / step_s, 1),
                 'tflops': round(fpt * model.tokens / step_s / 1e12 / jax.device_count(), 4),
                 'mfu': round(statistics.median(mfu_r), 4)}
        if spec_peak:
            entry['mfu_vs_spec'] = round(fpt * model.tokens / step_s / (spec_peak *
                                                                        jax.device_count()), 4)
        out['models'][name] = entry
    out['step_ratio_vs_dense'] = {
        name: round(statistics.median(t / d for t, d in zip(times[name], times['dense'])), 3)
        for name in models if name != 'dense'}
    return out


if __name__ == '__main__':
    main()
