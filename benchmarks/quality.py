"""Switch in small: a top-1 MoE against the dense model with the same active parameters.

COMMAND: python benchmarks/quality.py [--steps=600] [--eval_every=50] [--variant=wide]
             [--data_dir=DIR] [--workdir=/tmp/moejax_quality]
Trains configs/default.py (top-1 routing over 8 experts; with --variant=wide, the former
default, in every other FFN) and its `dense` variant (every FFN dense, d_ff equal to one
expert's, so both apply the same parameters to each token) for the same steps on the same
batches of the embedded corpus, evaluating validation loss every --eval_every steps. Prints
one JSON line with both curves and the first evaluated step at which the MoE reaches the dense
model's final validation loss (plus a linear interpolation between evaluations), saves it to
benchmarks/results/quality.json and plots the curves to benchmarks/results/quality.png. Each run
resumes from its workdir if interrupted.
"""
import argparse
import json
import os
import platform
import time

import common  # puts the repository on sys.path, for configs/
from configs import default  # noqa: E402
from moejax.model import transformer as model_lib  # noqa: E402
from moejax.run import loop  # noqa: E402

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'results')


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('--steps', type=int, default=600)
    p.add_argument('--eval_every', type=int, default=50)
    p.add_argument('--variant', default='', help="configs/default.py variant both models build "
                   "on, e.g. 'wide' (the former default)")
    p.add_argument('--data_dir', default=None, help='data.data_dir (default ~/tensorflow_datasets)')
    p.add_argument('--workdir', default='/tmp/moejax_quality', help='runs: WORKDIR/{dense,moe}')
    p.add_argument('--out', default=os.path.join(RESULTS, 'quality.json'))
    p.add_argument('--plot', default=os.path.join(RESULTS, 'quality.png'))
    return p.parse_args()


def make_config(variant: str | None, args):
    """default.py with args.variant (the layout both models share) and then variant."""
    cfg = default.get_config(','.join(filter(None, [args.variant, variant])))
    cfg.train.update(num_steps=args.steps, eval_every=args.eval_every,
                     checkpoint_every=args.steps, log_every=10)
    if args.data_dir:
        cfg.data.data_dir = args.data_dir
    return cfg


def eval_curve(workdir: str) -> list[tuple[int, float]]:
    """(step, validation loss) of every evaluation in a run's metrics.jsonl."""
    curve = {}
    with open(os.path.join(workdir, 'metrics.jsonl')) as f:
        for line in f:
            record = json.loads(line)
            if 'eval_loss' in record:
                curve[record['step']] = record['eval_loss']
    return sorted(curve.items())


def train_run(name: str, cfg, args) -> dict:
    workdir = os.path.join(args.workdir, name)
    start = time.time()
    last = loop.train_and_evaluate(cfg, workdir)
    curve = eval_curve(workdir)
    return {'workdir': workdir, 'seconds': round(time.time() - start, 1),
            'tokens_per_sec': last.get('tokens_per_sec'), 'final_eval_loss': curve[-1][1],
            'eval_steps': [s for s, _ in curve], 'eval_loss': [round(v, 5) for _, v in curve],
            **model_lib.param_counts(cfg)}


def steps_to_reach(curve: list[tuple[int, float]], target: float):
    """First evaluated step with loss <= target, and the linearly interpolated crossing step."""
    prev = None
    for step, loss in curve:
        if loss <= target:
            if prev is None:
                return step, float(step)
            (s0, l0) = prev
            return step, round(s0 + (l0 - target) / (l0 - loss) * (step - s0), 1)
        prev = (step, loss)
    return None, None


def plot(result: dict, path: str) -> None:
    from matplotlib.figure import Figure
    fig = Figure(figsize=(6.4, 4.0))
    ax = fig.subplots()
    for name, style in (('dense', 'o-'), ('moe', 's-')):
        run = result[name]
        label = (f"{name}: {run['active_params'] / 1e6:.2f}M active / "
                 f"{run['params'] / 1e6:.2f}M total params")
        ax.plot(run['eval_steps'], run['eval_loss'], style, label=label)
    ax.axhline(result['dense']['final_eval_loss'], color='gray', ls=':', lw=1,
               label='dense final validation loss')
    if result['moe_steps_to_dense_final_interpolated'] is not None:
        ax.axvline(result['moe_steps_to_dense_final_interpolated'], color='gray', ls='--', lw=1)
    ax.set_xlabel('training step')
    ax.set_ylabel('validation loss (nats/token)')
    ax.set_title(f"Switch (top-1, {result['num_experts']} experts) vs dense, same active params",
                 fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=120)


def main():
    args = parse_args()
    dense_cfg, moe_cfg = make_config('dense', args), make_config(None, args)
    result = {'benchmark': 'quality', 'steps': args.steps, 'eval_every': args.eval_every,
              'num_experts': moe_cfg.moe.num_experts, 'top_k': moe_cfg.moe.top_k,
              'tokens_per_step': moe_cfg.data.batch_size * moe_cfg.data.seq_len,
              'machine': f'{platform.machine()} {os.cpu_count()} cpus'}
    result['dense'] = train_run('dense', dense_cfg, args)
    result['moe'] = train_run('moe', moe_cfg, args)
    curve = list(zip(result['moe']['eval_steps'], result['moe']['eval_loss']))
    step, interpolated = steps_to_reach(curve, result['dense']['final_eval_loss'])
    result['moe_steps_to_dense_final'] = step
    result['moe_steps_to_dense_final_interpolated'] = interpolated
    result['speedup_in_steps'] = round(args.steps / interpolated, 2) if interpolated else None
    common.save_json(result, args.out, indent=1)
    plot(result, args.plot)


if __name__ == '__main__':
    main()
