"""Switch's Figure 4 in small: validation loss against the number of experts at the same compute.

COMMAND: python benchmarks/expert_scaling.py [--steps=360] [--eval_every=20]
             [--experts=4,8,16,32,64] [--seeds=0,1] [--dispatch=dropless] [--group_size=1024]
             [--variant=wide] [--set=KEY=VALUE ...] [--jobs=2]
             [--workdir=/tmp/moejax_expert_scaling]
Trains configs/default.py's dense variant and its top-1 MoE with each expert count (same
d_model, d_ff per expert, so every model applies the same parameters to each token) for the same
steps through the real training loop, once per seed: within a seed every model sees the same
batches in the same order (train.seed also seeds the init and the row shuffle). MoE tokens are
routed dropless by default; with --dispatch=sort, in groups of --group_size (0: one 128-token
sequence, where capacity 1.25 drops 11-30%).
Reports validation loss curves, each MoE's steps to the dense model's final validation loss
(interpolated between evaluations), tokens/s and the mean dropped fraction; prints one JSON line,
saves benchmarks/results/expert_scaling.json and plots benchmarks/results/expert_scaling.png.
--jobs=2 trains the seeds in two processes at once, one core each (a 2-core machine trains two
small models faster side by side than one on both cores); every run resumes from its workdir.
"""
import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import time

import common  # the repository on sys.path, the machine's name
import quality  # the dense-vs-MoE benchmark: its config, curve and crossing helpers

RESULTS = quality.RESULTS


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('--steps', type=int, default=360)
    p.add_argument('--eval_every', type=int, default=20)
    p.add_argument('--experts', default='4,8,16,32,64', help='expert counts, comma-separated')
    p.add_argument('--seeds', default='0,1', help='train.seed of each repeat, comma-separated')
    p.add_argument('--group_size', type=int, default=1024,
                   help='moe.group_size: tokens routed together (0: one sequence)')
    p.add_argument('--variant', default='', help="configs/default.py variant every model builds "
                   "on, e.g. 'wide' (the former default)")
    p.add_argument('--dispatch', default='dropless',
                   help="moe.dispatch: 'dropless' (nothing dropped) | 'sort' (capacity) | ...")
    p.add_argument('--set', action='append', default=[], metavar='KEY=VALUE',
                   help='a config override for every model (a recipe to try), e.g. '
                   'model.moe_every=1 (repeatable; values parsed as JSON, else kept as text)')
    p.add_argument('--jobs', type=int, default=2, help='seeds trained at once, one process each')
    p.add_argument('--train_only', action='store_true', help=argparse.SUPPRESS)  # a --jobs worker
    p.add_argument('--data_dir', default=None, help='data.data_dir (default ~/tensorflow_datasets)')
    p.add_argument('--workdir', default='/tmp/moejax_expert_scaling',
                   help='runs: WORKDIR/seed{S}/{dense,e{E}}')
    p.add_argument('--out', default=os.path.join(RESULTS, 'expert_scaling.json'))
    p.add_argument('--plot', default=os.path.join(RESULTS, 'expert_scaling.png'))
    args = p.parse_args(argv)
    args.experts = [int(n) for n in args.experts.split(',')]
    args.seeds = [int(s) for s in args.seeds.split(',')]
    return args


def make_config(num_experts: int, seed: int, args):
    """quality.py's config (default.py, its steps and eval cadence) with E experts (0: dense)."""
    cfg = quality.make_config('dense' if num_experts == 0 else None, args)
    cfg.train.seed = seed
    for key, value in map(parse_override, args.set):
        group, name = key.split('.')
        if num_experts or key != 'model.moe_every':  # the dense baseline stays dense
            cfg[group][name] = value
    if num_experts:
        cfg.moe.update(num_experts=num_experts, group_size=args.group_size,
                       dispatch=args.dispatch)
    return cfg


def parse_override(text: str) -> tuple[str, object]:
    key, _, value = text.partition('=')
    try:
        return key, json.loads(value)
    except ValueError:
        return key, value


def mean_dropped(workdir: str):
    """Mean of the logged training dropped fractions (None for a dense run)."""
    with open(os.path.join(workdir, 'metrics.jsonl')) as f:
        drops = [r['dropped_fraction'] for r in map(json.loads, f) if 'dropped_fraction' in r]
    return round(statistics.mean(drops), 4) if drops else None


def train_seed(seed: int, args) -> None:
    """Train the dense model and every MoE for one seed; each run's summary goes to its workdir.
    A run finished at --steps is skipped, so an interrupted benchmark picks up where it stopped;
    one finished at fewer steps resumes from its last checkpoint and trains on to --steps (with
    opt.schedule=rsqrt or constant the schedule does not depend on the run's length, so that is
    the same run as one trained to --steps from the start; seconds add up over the parts)."""
    run_args = argparse.Namespace(**{**vars(args), 'workdir': os.path.join(args.workdir,
                                                                           f'seed{seed}')})
    for num_experts in [0, *args.experts]:
        name = f'e{num_experts}' if num_experts else 'dense'
        summary_path = os.path.join(run_args.workdir, name, 'summary.json')
        earlier_seconds = 0.0
        if os.path.exists(summary_path):
            with open(summary_path) as f:
                earlier = json.load(f)
            if earlier['eval_steps'][-1] >= args.steps:
                continue
            earlier_seconds = earlier['seconds']
        run = quality.train_run(name, make_config(num_experts, seed, run_args), run_args)
        run.update(num_experts=num_experts, seed=seed, seconds=run['seconds'] + earlier_seconds,
                   dropped_fraction=mean_dropped(run['workdir']))
        with open(summary_path, 'w') as f:
            json.dump(run, f)


def train_all(args) -> None:
    """All seeds, one after another or (--jobs > 1) in worker processes pinned one core each."""
    if args.jobs <= 1:
        for seed in args.seeds:
            train_seed(seed, args)
        return
    cores = sorted(os.sched_getaffinity(0))
    workers = []
    for i, seed in enumerate(args.seeds):
        if len(workers) == args.jobs:
            _wait(workers.pop(0))
        cmd = [sys.executable, os.path.abspath(__file__), *worker_argv(args), f'--seeds={seed}',
               '--train_only']
        env = dict(os.environ, XLA_FLAGS=(os.environ.get('XLA_FLAGS', '') +
                                          ' --xla_cpu_multi_thread_eigen=false').strip())
        worker = subprocess.Popen(cmd, env=env, preexec_fn=lambda c=cores[i % len(cores)]:
                                  os.sched_setaffinity(0, {c}))
        workers.append(worker)
    for worker in workers:
        _wait(worker)


def worker_argv(args) -> list[str]:
    """The options a --jobs worker shares with its parent."""
    argv = [f'--steps={args.steps}', f'--eval_every={args.eval_every}',
            f"--experts={','.join(map(str, args.experts))}", f'--group_size={args.group_size}',
            f'--dispatch={args.dispatch}', f'--variant={args.variant}', f'--workdir={args.workdir}',
            *(f'--set={override}' for override in args.set)]
    return argv + ([f'--data_dir={args.data_dir}'] if args.data_dir else [])


def _wait(worker: subprocess.Popen) -> None:
    if worker.wait():
        raise SystemExit(f'expert_scaling: worker {worker.args} exited {worker.returncode}')


def load_runs(args) -> dict:
    """{seed: {num_experts: run summary}} read back from the workdirs."""
    runs = {}
    for seed in args.seeds:
        for num_experts in [0, *args.experts]:
            name = f'e{num_experts}' if num_experts else 'dense'
            with open(os.path.join(args.workdir, f'seed{seed}', name, 'summary.json')) as f:
                runs.setdefault(seed, {})[num_experts] = json.load(f)
    return runs


def summarise(runs: dict, args) -> dict:
    """Per expert count: final losses per seed, their mean and spread, steps to the same seed's
    dense final loss (first evaluated and interpolated), tokens/s and dropped fraction."""
    rows = []
    for num_experts in [0, *args.experts]:
        per_seed = [runs[s][num_experts] for s in args.seeds]
        finals = [r['final_eval_loss'] for r in per_seed]
        row = {'num_experts': num_experts, 'final_eval_loss': finals,
               'final_eval_loss_mean': round(statistics.mean(finals), 5),
               'final_eval_loss_spread': round(max(finals) - min(finals), 5),
               'tokens_per_sec': [round(r['tokens_per_sec'] or 0, 1) for r in per_seed],
               'dropped_fraction': [r['dropped_fraction'] for r in per_seed],
               'params': per_seed[0]['params'], 'active_params': per_seed[0]['active_params'],
               'steps_to_dense_final': [], 'steps_to_dense_final_interpolated': []}
        for seed, run in zip(args.seeds, per_seed):
            curve = list(zip(run['eval_steps'], run['eval_loss']))
            # the dense curve's last (rounded) value, so dense itself reaches it at its last step
            step, interp = quality.steps_to_reach(curve, runs[seed][0]['eval_loss'][-1])
            row['steps_to_dense_final'].append(step)
            row['steps_to_dense_final_interpolated'].append(interp)
        reached = row['steps_to_dense_final_interpolated']
        row['steps_ratio_mean'] = (round(statistics.mean(reached) / args.steps, 3)
                                   if None not in reached else None)
        rows.append(row)
    return {'benchmark': 'expert_scaling', 'steps': args.steps, 'eval_every': args.eval_every,
            'seeds': args.seeds, 'group_size': args.group_size, 'dispatch': args.dispatch,
            'variant': args.variant, 'overrides': args.set,
            'loss_per_doubling': doubling_trend(rows[1:]),
            'machine': common.machine(), 'rows': rows,
            'curves': {f'seed{s}': {str(e): {'eval_steps': r['eval_steps'],
                                             'eval_loss': r['eval_loss'], 'seconds': r['seconds']}
                                    for e, r in by_e.items()} for s, by_e in runs.items()}}


def doubling_trend(moe_rows: list[dict]) -> dict | None:
    """Least-squares slope of final loss against log2(experts) over every (count, seed) run,
    with its standard error: whether loss falls with the expert count beyond seed noise."""
    points = [(math.log2(r['num_experts']), loss) for r in moe_rows
              for loss in r['final_eval_loss']]
    if len({x for x, _ in points}) < 2 or len(points) < 3:
        return None
    xs, ys = zip(*points)
    slope, intercept = statistics.linear_regression(xs, ys)
    x_mean = statistics.mean(xs)
    residual = sum((y - intercept - slope * x) ** 2 for x, y in points) / (len(points) - 2)
    stderr = math.sqrt(residual / sum((x - x_mean) ** 2 for x in xs))
    return {'slope': round(slope, 5), 'stderr': round(stderr, 5), 'runs': len(points)}


def plot(result: dict, path: str) -> None:
    """Left: validation loss vs step (mean over seeds) per expert count; right: final loss vs
    expert count, each seed a dot and the mean a line, dense as a band."""
    from matplotlib.figure import Figure
    fig = Figure(figsize=(11, 4.2))
    ax_curve, ax_final = fig.subplots(1, 2)
    cmap = __import__('matplotlib').colormaps['viridis']
    rows = result['rows']
    for i, row in enumerate(rows):
        e = row['num_experts']
        curves = [result['curves'][f'seed{s}'][str(e)] for s in result['seeds']]
        mean_loss = [statistics.mean(v) for v in zip(*(c['eval_loss'] for c in curves))]
        label = 'dense' if e == 0 else f'{e} experts'
        color = 'black' if e == 0 else cmap((i - 1) / max(1, len(rows) - 2))
        ax_curve.plot(curves[0]['eval_steps'], mean_loss, '-', color=color, label=label,
                      lw=2 if e == 0 else 1.3)
    ax_curve.set_xlabel('training step')
    ax_curve.set_ylabel(f"validation loss (nats/token, mean of {len(result['seeds'])} seeds)")
    ax_curve.set_ylim(top=rows[0]['final_eval_loss_mean'] + 0.6)
    ax_curve.legend(fontsize=8)
    dense, moe = rows[0], rows[1:]
    ax_final.axhspan(min(dense['final_eval_loss']), max(dense['final_eval_loss']),
                     color='gray', alpha=0.3, label='dense (seed range)')
    xs = [r['num_experts'] for r in moe]
    for k, seed in enumerate(result['seeds']):
        ax_final.plot(xs, [r['final_eval_loss'][k] for r in moe], 'o', ms=4, alpha=0.7,
                      label=f'seed {seed}')
    ax_final.plot(xs, [r['final_eval_loss_mean'] for r in moe], 'k-', lw=1, label='MoE mean')
    ax_final.set_xscale('log', base=2)
    ax_final.set_xticks(xs, [str(x) for x in xs])
    ax_final.set_xlabel('experts (top-1, same active parameters)')
    ax_final.set_ylabel(f"final validation loss after {result['steps']} steps")
    ax_final.legend(fontsize=8)
    trend = result.get('loss_per_doubling')
    if trend:
        ax_final.set_title(f"per doubling of experts: {trend['slope']:+.4f} "
                           f"± {trend['stderr']:.4f} nats (least squares, s.e.)", fontsize=9)
    fig.suptitle(f"Expert scaling on python_stdlib ({dense['active_params'] / 1e6:.2f}M active "
                 f"params, group {result['group_size'] or 'one sequence'}, {result['dispatch']})",
                 fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main():
    args = parse_args()
    start = time.time()
    if args.train_only:
        return train_seed(args.seeds[0], args)
    train_all(args)
    result = summarise(load_runs(args), args)
    result['wall_seconds'] = round(time.time() - start, 1)
    common.save_json(result, args.out, indent=1)
    plot(result, args.plot)


if __name__ == '__main__':
    main()
