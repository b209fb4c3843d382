"""Evaluate a checkpoint: python launch/eval.py --config=configs/default.py --workdir=DIR [--split=validation] [--step=N]"""
from moejax import cli

if __name__ == '__main__':
    cli.eval_main()
