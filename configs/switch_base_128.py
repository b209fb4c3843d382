"""Switch-Base with 128 experts (Fedus et al. 2021): ~7.4B parameters, the same active compute
as Switch-Base-8 (one expert per token). A decoder-only counterpart; see switch_base_8.py.
COMMAND: python launch/train.py --config=configs/switch_base_128.py --workdir=DIR
PLAN:    python launch/train.py --config=configs/switch_base_128.py --dry_run --simulated_devices=64
"""
from configs import switch_base_8


def get_config(arg: str | None = None):
    cfg = switch_base_8.get_config('128')
    cfg.mesh.update(data=-1, expert=32)
    return cfg
