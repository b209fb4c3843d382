"""Logical axes onto a mesh (moejax/sharding.py): every mesh layout, through GSPMD or the
explicit all-to-all, trains exactly like one device.

Truth is a one-device run of the same config (tests/layouts.py: float32, capacity large enough
that nothing drops): 6 training steps on the same batches must give the same losses, after the
reference's routing decisions are checked for a clear margin (tests/decisions.py).
"""
import pytest

from tests import layouts

LAYOUTS = [
    ({'data': 8}, 'gspmd'),
    ({'data': 2, 'expert': 4}, 'gspmd'),
    ({'data': 2, 'expert': 4}, 'all_to_all'),
    ({'expert': 8}, 'all_to_all'),
    ({'data': 2, 'expert': 2, 'tensor': 2}, 'gspmd'),
    ({'data': 2, 'expert': 2, 'tensor': 2}, 'all_to_all'),
    ({'fsdp': 2, 'expert': 4}, 'gspmd'),
    ({'fsdp': 2, 'expert': 4}, 'all_to_all'),
]


@pytest.mark.parametrize('mesh,comm', LAYOUTS, ids=lambda v: v if isinstance(v, str) else
                         'x'.join(f'{k}{n}' for k, n in v.items()))
def test_layout_matches_one_device(mesh, comm):
    layouts.check(mesh, comm)
