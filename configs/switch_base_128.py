"""Switch-Base with 128 experts (Fedus et al. 2021): ~7.4B parameters, the same active compute
as Switch-Base-8 (one expert per token). A decoder-only counterpart; see switch_base_8.py.
COMMAND: python launch/train.py --config=configs/switch_base_128.py --workdir=DIR
PLAN:    python launch/train.py --config=configs/switch_base_128.py --dry_run --simulated_devices=64
LAYOUTS: python launch/plan.py --config=configs/switch_base_128.py --devices=64 --device_memory=80GB
"""
from configs import switch_base_8


def get_config(arg: str | None = None):
    cfg = switch_base_8.get_config('128')
    # Experts over all 64 devices (two per device), no remat, the whole batch per step: the
    # layout launch/plan.py ranks first on 64 devices of 80 GB (docs/plans.md).
    cfg.mesh.update(data=-1, fsdp=1, expert=64)
    return cfg
