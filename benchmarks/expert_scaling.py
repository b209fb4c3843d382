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
--jobs=2 trains the seeds in two processes at once, one core each (benchmarks/study.py); every
run resumes from its workdir.
"""
import argparse
import math
import os

import common  # the repository on sys.path, the machine's name
import quality  # the dense-vs-MoE benchmark: its config, curve and crossing helpers
import study  # arms per seed in worker processes, summaries against dense

RESULTS = quality.RESULTS


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    study.add_arguments(p, steps=360, eval_every=20, workdir='/tmp/moejax_expert_scaling')
    p.add_argument('--experts', default='4,8,16,32,64', help='expert counts, comma-separated')
    p.add_argument('--group_size', type=int, default=1024,
                   help='moe.group_size: tokens routed together (0: one sequence)')
    p.add_argument('--dispatch', default='dropless',
                   help="moe.dispatch: 'dropless' (nothing dropped) | 'sort' (capacity) | ...")
    p.add_argument('--out', default=os.path.join(RESULTS, 'expert_scaling.json'))
    p.add_argument('--plot', default=os.path.join(RESULTS, 'expert_scaling.png'))
    args = study.parse_seeds(p.parse_args(argv))
    args.experts = [int(n) for n in args.experts.split(',')]
    return args


def arm_name(num_experts: int) -> str:
    return f'e{num_experts}' if num_experts else 'dense'


def arms(args) -> dict:
    """dense, then the top-1 MoE with each expert count (workdirs dense, e4, e8, ...)."""
    def make(num_experts):
        def config(seed):
            cfg = study.base_config(args, seed, dense=not num_experts)
            if num_experts:
                cfg.moe.update(num_experts=num_experts, group_size=args.group_size,
                               dispatch=args.dispatch)
            return cfg
        return config
    return {arm_name(e): make(e) for e in [0, *args.experts]}


def worker_argv(args) -> list[str]:
    """The options a --jobs worker shares with its parent."""
    return study.shared_argv(args) + [f"--experts={','.join(map(str, args.experts))}",
                                      f'--group_size={args.group_size}',
                                      f'--dispatch={args.dispatch}']


def summarise(runs: dict, args) -> dict:
    """Per expert count: study.summarise_arm's row, and the loss per doubling of experts."""
    rows = [dict(num_experts=e, **study.summarise_arm(runs, arm_name(e), args))
            for e in [0, *args.experts]]
    return {'benchmark': 'expert_scaling', 'steps': args.steps, 'eval_every': args.eval_every,
            'seeds': args.seeds, 'group_size': args.group_size, 'dispatch': args.dispatch,
            'variant': args.variant, 'overrides': args.set,
            'loss_per_doubling': doubling_trend(rows[1:]),
            'machine': common.machine(), 'rows': rows, 'curves': study.curves(runs)}


def doubling_trend(moe_rows: list[dict]) -> dict | None:
    """Least-squares slope of final loss against log2(experts) over every (count, seed) run,
    with its standard error: whether loss falls with the expert count beyond seed noise."""
    return study.linear_fit([(math.log2(r['num_experts']), loss) for r in moe_rows
                             for loss in r['final_eval_loss']])


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
        steps, mean_loss = study.mean_curve(result, arm_name(e))
        label = 'dense' if e == 0 else f'{e} experts'
        color = 'black' if e == 0 else cmap((i - 1) / max(1, len(rows) - 2))
        ax_curve.plot(steps, mean_loss, '-', color=color, label=label, lw=2 if e == 0 else 1.3)
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
    study.run(os.path.abspath(__file__), args, arms=arms(args), worker_argv=worker_argv(args),
              summarise=summarise, plot=plot)


if __name__ == '__main__':
    main()
