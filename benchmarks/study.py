"""What the loss studies share: named arms trained per seed, side by side, and compared to dense.

An arm is a name and a function seed -> config. Within a seed every arm sees the same batches in
the same order (train.seed also seeds the init and the row shuffle). Each seed's arms train in
one worker process pinned to one core (`--jobs` at once: a 2-core machine trains two small
models faster side by side than one on both cores); every run resumes from its workdir
WORKDIR/seed{S}/{arm}, and one that finished at fewer steps trains on to --steps (with
opt.schedule=rsqrt or constant the schedule does not depend on the run's length, so that is the
same run as one trained to --steps from the start; seconds add up over the parts).
"""
import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import time

import common  # the repository on sys.path; save_json
import quality


def add_arguments(p: argparse.ArgumentParser, *, steps: int, eval_every: int, workdir: str):
    p.add_argument('--steps', type=int, default=steps)
    p.add_argument('--eval_every', type=int, default=eval_every)
    p.add_argument('--seeds', default='0,1', help='train.seed of each repeat, comma-separated')
    p.add_argument('--variant', default='', help="configs/default.py variant every model builds "
                   "on, e.g. 'wide' (the former default)")
    p.add_argument('--set', action='append', default=[], metavar='KEY=VALUE',
                   help='a config override for every model (a recipe to try), e.g. '
                   'model.moe_every=1 (repeatable; values parsed as JSON, else kept as text)')
    p.add_argument('--jobs', type=int, default=2, help='seeds trained at once, one process each')
    p.add_argument('--train_only', action='store_true', help=argparse.SUPPRESS)  # a --jobs worker
    p.add_argument('--data_dir', default=None, help='data.data_dir (default ~/tensorflow_datasets)')
    p.add_argument('--workdir', default=workdir, help='runs: WORKDIR/seed{S}/{arm}')


def parse_seeds(args) -> argparse.Namespace:
    args.seeds = [int(s) for s in str(args.seeds).split(',')]
    return args


def base_config(args, seed: int, *, dense: bool):
    """quality.py's config (default.py and --variant, the steps and eval cadence) for a seed,
    with the --set overrides (model.moe_every is left alone on the dense baseline)."""
    cfg = quality.make_config('dense' if dense else None, args)
    cfg.train.seed = seed
    cfg.train.checkpoint_every = min(400, args.steps)  # a long run resumes near where it stopped
    for key, value in map(parse_override, args.set):
        group, name = key.split('.')
        if not dense or key != 'model.moe_every':
            cfg[group][name] = value
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


def train_seed(seed: int, arms: dict, args) -> None:
    """Train every arm for one seed; each run's summary goes to its workdir's summary.json."""
    run_args = argparse.Namespace(**{**vars(args),
                                     'workdir': os.path.join(args.workdir, f'seed{seed}')})
    for name, make_config in arms.items():
        summary_path = os.path.join(run_args.workdir, name, 'summary.json')
        earlier_seconds = 0.0
        if os.path.exists(summary_path):
            with open(summary_path) as f:
                earlier = json.load(f)
            if earlier['eval_steps'][-1] >= args.steps:
                continue
            earlier_seconds = earlier['seconds']
        run = quality.train_run(name, make_config(seed), run_args)
        run.update(arm=name, seed=seed, seconds=run['seconds'] + earlier_seconds,
                   dropped_fraction=mean_dropped(run['workdir']))
        with open(summary_path, 'w') as f:
            json.dump(run, f)


def train_all(script: str, worker_argv: list[str], args) -> None:
    """All seeds in `script --train_only --seeds=S` workers, --jobs at once, one core each."""
    cores = sorted(os.sched_getaffinity(0))
    workers = []
    for i, seed in enumerate(args.seeds):
        if len(workers) == args.jobs:
            _wait(workers.pop(0))
        cmd = [sys.executable, script, *worker_argv, f'--seeds={seed}', '--train_only']
        env = dict(os.environ, XLA_FLAGS=(os.environ.get('XLA_FLAGS', '') +
                                          ' --xla_cpu_multi_thread_eigen=false').strip())
        workers.append(subprocess.Popen(cmd, env=env, preexec_fn=lambda c=cores[i % len(cores)]:
                                        os.sched_setaffinity(0, {c})))
    for worker in workers:
        _wait(worker)


def run(script: str, args, *, arms: dict, worker_argv: list[str], summarise, plot) -> None:
    """A study's main: train every arm of every seed (here, or in --jobs workers), then
    summarise the runs into args.out and plot them into args.plot."""
    start = time.time()
    if args.train_only or args.jobs <= 1:
        for seed in args.seeds:
            train_seed(seed, arms, args)
        if args.train_only:
            return
    else:
        train_all(script, worker_argv, args)
    result = summarise(load_runs(args, list(arms)), args)
    result['wall_seconds'] = round(time.time() - start, 1)
    common.save_json(result, args.out, indent=1)
    plot(result, args.plot)


def shared_argv(args) -> list[str]:
    """The options of this module that a --jobs worker shares with its parent."""
    argv = [f'--steps={args.steps}', f'--eval_every={args.eval_every}',
            f'--variant={args.variant}', f'--workdir={args.workdir}',
            *(f'--set={override}' for override in args.set)]
    return argv + ([f'--data_dir={args.data_dir}'] if args.data_dir else [])


def _wait(worker: subprocess.Popen) -> None:
    if worker.wait():
        raise SystemExit(f'{worker.args[1]}: worker {worker.args} exited {worker.returncode}')


def load_runs(args, names) -> dict:
    """{seed: {arm: run summary}} read back from the workdirs."""
    runs = {}
    for seed in args.seeds:
        for name in names:
            with open(os.path.join(args.workdir, f'seed{seed}', name, 'summary.json')) as f:
                runs.setdefault(seed, {})[name] = json.load(f)
    return runs


def summarise_arm(runs: dict, name: str, args, dense: str = 'dense') -> dict:
    """One arm: final losses per seed, their mean and spread, steps to the same seed's dense
    final loss (first evaluated and interpolated, and their mean as a ratio of --steps),
    tokens/s, dropped fraction and parameter counts."""
    per_seed = [runs[s][name] for s in args.seeds]
    finals = [r['final_eval_loss'] for r in per_seed]
    row = {'final_eval_loss': finals,
           'final_eval_loss_mean': round(statistics.mean(finals), 5),
           'final_eval_loss_spread': round(max(finals) - min(finals), 5),
           'tokens_per_sec': [round(r['tokens_per_sec'] or 0, 1) for r in per_seed],
           'dropped_fraction': [r['dropped_fraction'] for r in per_seed],
           'params': per_seed[0]['params'], 'active_params': per_seed[0]['active_params'],
           'steps_to_dense_final': [], 'steps_to_dense_final_interpolated': []}
    for seed, run in zip(args.seeds, per_seed):
        curve = list(zip(run['eval_steps'], run['eval_loss']))
        # the dense curve's last (rounded) value, so dense itself reaches it at its last step
        step, interp = quality.steps_to_reach(curve, runs[seed][dense]['eval_loss'][-1])
        row['steps_to_dense_final'].append(step)
        row['steps_to_dense_final_interpolated'].append(interp)
    reached = row['steps_to_dense_final_interpolated']
    row['steps_ratio_mean'] = (round(statistics.mean(reached) / args.steps, 3)
                               if None not in reached else None)
    return row


def curves(runs: dict) -> dict:
    """Every run's validation curve and seconds, by seed and arm."""
    return {f'seed{s}': {name: {'eval_steps': r['eval_steps'], 'eval_loss': r['eval_loss'],
                                'seconds': r['seconds']} for name, r in by_arm.items()}
            for s, by_arm in runs.items()}


def mean_curve(result: dict, name: str) -> tuple[list, list]:
    """(steps, validation loss averaged over the seeds) of one arm."""
    per_seed = [result['curves'][f'seed{s}'][name] for s in result['seeds']]
    return (per_seed[0]['eval_steps'],
            [statistics.mean(v) for v in zip(*(c['eval_loss'] for c in per_seed))])


def linear_fit(points: list[tuple[float, float]]) -> dict | None:
    """Least-squares line y = a + b x with the slope's standard error."""
    if len({x for x, _ in points}) < 2 or len(points) < 3:
        return None
    xs, ys = zip(*points)
    slope, intercept = statistics.linear_regression(xs, ys)
    x_mean = statistics.mean(xs)
    residual = sum((y - intercept - slope * x) ** 2 for x, y in points) / (len(points) - 2)
    stderr = math.sqrt(residual / sum((x - x_mean) ** 2 for x in xs))
    return {'slope': round(slope, 5), 'stderr': round(stderr, 5), 'runs': len(points)}
