"""The config a workdir saved (its config.json): continue, fine-tune or evaluate a run, such as
one written by `moejax-convert`, with --config.KEY overrides on top.

COMMAND: python launch/train.py --config=configs/saved.py:WORKDIR --workdir=WORKDIR
"""
import os

from moejax import config as config_lib


def get_config(workdir: str | None = None):
    if not workdir:
        raise ValueError('configs/saved.py needs the workdir: --config=configs/saved.py:WORKDIR')
    return config_lib.from_json(os.path.join(os.path.expanduser(workdir), 'config.json'))
