"""Multi-token prediction on and off: configs/deepseek_v3_small.py with MTP depth 1 (weight 0.3)
against its `no_mtp` variant, on the same batches, seed and steps.

COMMAND: python benchmarks/mtp.py [--steps=300] [--eval_every=25] [--workdir=/tmp/moejax_mtp]
Compares the main (next-token) loss at equal steps: the training CE (ce_loss, the main head
alone in both runs) and the validation loss (evaluation never runs the MTP module). Prints one
JSON line, saves benchmarks/results/mtp.json and plots benchmarks/results/mtp.png. MTP costs
one more block and output head per step; the time of each run is reported too.
"""
import argparse
import json
import os
import time

import common  # puts the repository on sys.path, for configs/
from moejax.run import loop  # noqa: E402
from moejax.run import metrics as metrics_lib  # noqa: E402

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'results')
RECIPE = os.path.join(common.REPO, 'configs', 'deepseek_v3_small.py')


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('--steps', type=int, default=300)
    p.add_argument('--eval_every', type=int, default=25)
    p.add_argument('--workdir', default='/tmp/moejax_mtp', help='runs: WORKDIR/{mtp,no_mtp}')
    p.add_argument('--out', default=os.path.join(RESULTS, 'mtp.json'))
    p.add_argument('--plot', default=os.path.join(RESULTS, 'mtp.png'))
    return p.parse_args()


def curves(workdir: str) -> dict:
    """Training ce_loss per logged step, validation loss per evaluation, MTP loss per step."""
    out = {'train_steps': [], 'ce_loss': [], 'mtp_loss_1': [], 'eval_steps': [], 'eval_loss': []}
    for rec in metrics_lib.read_jsonl(os.path.join(workdir, 'metrics.jsonl')):
        if 'eval_loss' in rec:
            out['eval_steps'].append(rec['step'])
            out['eval_loss'].append(round(rec['eval_loss'], 5))
        elif 'ce_loss' in rec:
            out['train_steps'].append(rec['step'])
            out['ce_loss'].append(round(rec['ce_loss'], 5))
            if 'mtp_loss_1' in rec:
                out['mtp_loss_1'].append(round(rec['mtp_loss_1'], 5))
    return out


def train(variant: str, args) -> dict:
    cfg = common.load_config(f'{RECIPE}:{variant}' if variant else RECIPE)
    cfg.train.update(num_steps=args.steps, eval_every=args.eval_every,
                     checkpoint_every=args.steps, log_every=10)
    workdir = os.path.join(args.workdir, variant or 'mtp')
    start = time.time()
    loop.train_and_evaluate(cfg, workdir)
    return dict(curves(workdir), seconds=round(time.time() - start, 1))


def smoothed(values: list, window: int = 5) -> list:
    return [sum(values[max(0, i - window + 1):i + 1]) / len(values[max(0, i - window + 1):i + 1])
            for i in range(len(values))]


def plot(result: dict, path: str) -> None:
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    for name, style in (('mtp', '-'), ('no_mtp', '--')):
        run = result[name]
        ax1.plot(run['train_steps'], smoothed(run['ce_loss']), style, label=name)
        ax2.plot(run['eval_steps'], run['eval_loss'], style, marker='o', ms=3, label=name)
    ax1.set(title='training main loss (ce_loss, 5-point mean)', xlabel='step', ylabel='loss')
    ax2.set(title='validation loss (next token)', xlabel='step', ylabel='loss')
    for ax in (ax1, ax2):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle('configs/deepseek_v3_small.py: MTP depth 1 (weight 0.3) vs none')
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main():
    args = parse_args()
    result = {'benchmark': 'mtp', 'recipe': 'configs/deepseek_v3_small.py', 'steps': args.steps,
              'machine': common.machine()}
    result['mtp'] = train('', args)
    result['no_mtp'] = train('no_mtp', args)
    on, off = result['mtp'], result['no_mtp']
    result['eval_loss_difference_mtp_minus_none'] = [
        round(a - b, 5) for a, b in zip(on['eval_loss'], off['eval_loss'])]
    result['final_eval_loss'] = {'mtp': on['eval_loss'][-1], 'no_mtp': off['eval_loss'][-1]}
    os.makedirs(RESULTS, exist_ok=True)
    with open(args.out, 'w') as f:
        json.dump(result, f, indent=1)
    plot(result, args.plot)
    print(json.dumps(result))


if __name__ == '__main__':
    main()
