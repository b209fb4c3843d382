"""Pretrain (or resume) a moejax model: python launch/train.py --config=configs/default.py --workdir=DIR"""
from moejax import cli

if __name__ == '__main__':
    cli.train_main()
