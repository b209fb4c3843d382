"""Fine-grained and shared experts at equal active and total parameters (issue 25).

COMMAND: python benchmarks/granularity.py [--steps=1600] [--eval_every=100]
             [--granularities=1,2,4,8] [--shared=4] [--seeds=0,1] [--jobs=2]
             [--workdir=/tmp/moejax_granularity]
Granularity G = dense FFN width / expert width (Krajewski et al. 2024). Every arm builds on
configs/default.py (dropless routing, rsqrt schedule) and applies the same parameters to each
token as the dense model (d_ff 256): G splits each of Switch's 32 experts into G experts of width
d_ff / G, so there are 32 G experts and a token picks G of them (top-k = G, renormalised gates):
equal active and equal total parameters. The shared arm takes G = --shared and makes one of the
32 G experts always on (DeepSeekMoE's shared-expert isolation): 32 G - 1 routed experts, top
G - 1, one shared expert of the same width, so both counts stay equal again.
Within a seed every arm sees the same batches (benchmarks/study.py). Prints one JSON line, saves
benchmarks/results/granularity.json and plots benchmarks/results/granularity.png: validation
loss against step per arm, and final loss against G with the fitted law.
"""
import argparse
import math
import os

import numpy as np

import common
import quality
import study

RESULTS = quality.RESULTS
SWITCH_EXPERTS = 32  # G = 1: Switch's 32 top-1 experts, the expert-scaling study's best count


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    study.add_arguments(p, steps=1600, eval_every=100, workdir='/tmp/moejax_granularity')
    p.add_argument('--granularities', default='1,2,4,8', help='G values, comma-separated')
    p.add_argument('--shared', type=int, default=4, help='G of the arm with one shared expert '
                   '(0: none)')
    p.add_argument('--out', default=os.path.join(RESULTS, 'granularity.json'))
    p.add_argument('--plot', default=os.path.join(RESULTS, 'granularity.png'))
    args = study.parse_seeds(p.parse_args(argv))
    args.granularities = [int(g) for g in args.granularities.split(',')]
    return args


def moe_keys(granularity: int, shared: bool, d_ff: int) -> dict:
    """moe.* of one arm: 32 G experts of width d_ff / G, top G (one of them shared if asked)."""
    experts = SWITCH_EXPERTS * granularity
    return dict(num_experts=experts - shared, top_k=granularity - shared,
                expert_d_ff=d_ff // granularity, num_shared_experts=int(shared))


def arm_specs(args) -> dict:
    """{arm name: (G, shared) or None for dense}."""
    specs = {'dense': None, **{f'g{g}': (g, False) for g in args.granularities}}
    if args.shared:
        specs[f'g{args.shared}_shared'] = (args.shared, True)
    return specs


def arms(args) -> dict:
    def make(spec):
        def config(seed):
            cfg = study.base_config(args, seed, dense=spec is None)
            if spec:
                cfg.moe.update(moe_keys(*spec, cfg.model.d_ff))
            return cfg
        return config
    return {name: make(spec) for name, spec in arm_specs(args).items()}


def worker_argv(args) -> list[str]:
    return study.shared_argv(args) + [
        f"--granularities={','.join(map(str, args.granularities))}", f'--shared={args.shared}']


# ---- the law ----------------------------------------------------------------------------------

def power_law_fit(points: list[tuple[float, float]]) -> dict | None:
    """Krajewski et al.'s granularity term at fixed active parameters N and tokens D:
    L(G) = c + g * G**-gamma (their L = c + (g / G**gamma + a) / N**alpha + b / D**beta with N,
    D fixed). Least squares over every (G, seed) run: linear in (c, g) for each gamma on a fine
    grid; standard errors from the Jacobian at the optimum (Gauss-Newton)."""
    gs, ys = np.array([p[0] for p in points], float), np.array([p[1] for p in points], float)
    if len(set(gs)) < 3:
        return None

    def solve(gamma):
        x = np.stack([np.ones_like(gs), gs ** -gamma], axis=1)
        coef, *_ = np.linalg.lstsq(x, ys, rcond=None)
        return float(np.sum((x @ coef - ys) ** 2)), coef
    gammas = np.linspace(0.01, 3.0, 600)
    gamma = float(gammas[np.argmin([solve(gm)[0] for gm in gammas])])
    sse, (c, g) = solve(gamma)
    jac = np.stack([np.ones_like(gs), gs ** -gamma, -g * np.log(gs) * gs ** -gamma], axis=1)
    dof = max(len(gs) - 3, 1)
    cov = sse / dof * np.linalg.pinv(jac.T @ jac)
    se = np.sqrt(np.maximum(np.diag(cov), 0))
    return {'form': 'L(G) = c + g * G^-gamma', 'c': round(c, 4), 'c_se': round(se[0], 4),
            'g': round(g, 4), 'g_se': round(se[1], 4), 'gamma': round(gamma, 3),
            'gamma_se': round(se[2], 3), 'runs': len(gs)}


def quadratic_fit(points: list[tuple[float, float]]) -> dict | None:
    """L = a + b log2 G + q (log2 G)^2, the U shape the 'optimal G' papers report; its vertex
    2**(-b / 2q) is the optimum G when q > 0, with a delta-method standard error in log2 G."""
    xs = np.array([math.log2(p[0]) for p in points])
    ys = np.array([p[1] for p in points])
    if len(set(xs)) < 3:
        return None
    x = np.stack([np.ones_like(xs), xs, xs ** 2], axis=1)
    coef, *_ = np.linalg.lstsq(x, ys, rcond=None)
    sse = float(np.sum((x @ coef - ys) ** 2))
    cov = sse / max(len(xs) - 3, 1) * np.linalg.pinv(x.T @ x)
    _, b, q = coef
    out = {'form': 'L = a + b log2(G) + q log2(G)^2', 'a': round(coef[0], 4), 'b': round(b, 4),
           'q': round(q, 4), 'q_se': round(math.sqrt(max(cov[2, 2], 0)), 4), 'runs': len(xs)}
    if q > 0:
        vertex = -b / (2 * q)
        grad = np.array([0, -1 / (2 * q), b / (2 * q * q)])
        out.update(optimum_G=round(2 ** vertex, 2),
                   optimum_log2G_se=round(math.sqrt(max(grad @ cov @ grad, 0)), 2))
    return out


# ---- the summary ------------------------------------------------------------------------------

def summarise(runs: dict, args) -> dict:
    specs = arm_specs(args)
    rows = []
    for name, spec in specs.items():
        row = study.summarise_arm(runs, name, args)
        row.update(arm=name, granularity=spec[0] if spec else None, shared=bool(spec and spec[1]))
        rows.append(row)
    fine = [r for r in rows if r['granularity'] and not r['shared']]
    points = [(r['granularity'], loss) for r in fine for loss in r['final_eval_loss']]
    return {'benchmark': 'granularity', 'steps': args.steps, 'eval_every': args.eval_every,
            'seeds': args.seeds, 'variant': args.variant, 'overrides': args.set,
            'machine': common.machine(), 'rows': rows,
            'fits': {'power_law': power_law_fit(points), 'quadratic_log2': quadratic_fit(points),
                     'per_doubling_of_G': study.linear_fit(
                         [(math.log2(g), loss) for g, loss in points])},
            'curves': study.curves(runs)}


def plot(result: dict, path: str) -> None:
    """Left: validation loss vs step (mean over seeds) per arm; right: final loss vs G, each
    seed a dot, the fitted power law a line, dense and the shared arm as bands."""
    from matplotlib import colormaps
    from matplotlib.figure import Figure
    fig = Figure(figsize=(11, 4.2))
    ax_curve, ax_final = fig.subplots(1, 2)
    rows = result['rows']
    fine = [r for r in rows if r['granularity'] and not r['shared']]
    for i, row in enumerate(rows):
        steps, loss = study.mean_curve(result, row['arm'])
        color = ('black' if row['granularity'] is None else 'tab:red' if row['shared']
                 else colormaps['viridis'](i / max(1, len(fine))))
        ax_curve.plot(steps, loss, '-', color=color, lw=2 if row['granularity'] is None else 1.3,
                      label=label(row))
    ax_curve.set_xlabel('training step')
    ax_curve.set_ylabel(f"validation loss (nats/token, mean of {len(result['seeds'])} seeds)")
    ax_curve.set_ylim(top=rows[0]['final_eval_loss_mean'] + 0.6)
    ax_curve.legend(fontsize=8)
    for row, color in ((rows[0], 'gray'), *((r, 'tab:red') for r in rows if r['shared'])):
        ax_final.axhspan(min(row['final_eval_loss']), max(row['final_eval_loss']), color=color,
                         alpha=0.25, label=f'{label(row)} (seed range)')
    xs = [r['granularity'] for r in fine]
    for k, seed in enumerate(result['seeds']):
        ax_final.plot(xs, [r['final_eval_loss'][k] for r in fine], 'o', ms=4, alpha=0.7,
                      label=f'seed {seed}')
    law = result['fits']['power_law']
    if law:
        grid = np.geomspace(min(xs), max(xs), 50)
        ax_final.plot(grid, law['c'] + law['g'] * grid ** -law['gamma'], 'k-', lw=1,
                      label=f"{law['c']:.3f} + {law['g']:.3f} G^-{law['gamma']:.2f}")
    ax_final.set_xscale('log', base=2)
    ax_final.set_xticks(xs, [str(x) for x in xs])
    ax_final.set_xlabel(f'granularity G ({SWITCH_EXPERTS} G experts of width d_ff / G, top-G)')
    ax_final.set_ylabel(f"final validation loss after {result['steps']} steps")
    ax_final.legend(fontsize=8)
    fig.suptitle(f"Granularity and shared experts on python_stdlib "
                 f"({rows[0]['active_params'] / 1e6:.2f}M active params)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def label(row: dict) -> str:
    if row['granularity'] is None:
        return 'dense'
    g = row['granularity']
    return f'G={g}, 1 shared' if row['shared'] else f'G={g} ({SWITCH_EXPERTS * g} experts, top-{g})'


def main():
    args = parse_args()
    study.run(os.path.abspath(__file__), args, arms=arms(args), worker_argv=worker_argv(args),
              summarise=summarise, plot=plot)


if __name__ == '__main__':
    main()
