"""Rank mesh layouts, remat policies and micro-batches that fit: python launch/plan.py
--config=configs/mixtral_8x7b.py --devices=64 --device_memory=80GB [--config.KEY=VALUE ...]"""
from moejax import cli

if __name__ == '__main__':
    cli.plan_main()
