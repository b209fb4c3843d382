"""Logical axes onto a mesh (moejax/sharding.py): each mesh axis, through GSPMD or the
explicit all-to-all, trains exactly like one device.

Truth is a one-device run of the same config (tests/layouts.py: float32, capacity large enough
that nothing drops): 6 training steps on the same batches must give the same losses, after the
reference's routing decisions are checked for a clear margin (tests/decisions.py).
"""
import pytest
from jax.sharding import PartitionSpec as P

from moejax import sharding
from tests import layouts

# Each axis with each exchange: GSPMD's capacity buffers on an expert axis are checked on
# data2xexpert2xtensor2 here (and with the einsum engine on data2xexpert4 in
# test_expert_parallel), the explicit all_to_all on every expert layout.
LAYOUTS = [
    ({'data': 8}, 'gspmd'),
    ({'data': 2, 'expert': 4}, 'all_to_all'),
    ({'expert': 8}, 'all_to_all'),
    ({'data': 2, 'expert': 2, 'tensor': 2}, 'gspmd'),
    ({'data': 2, 'expert': 2, 'tensor': 2}, 'all_to_all'),
    ({'fsdp': 2, 'expert': 4}, 'all_to_all'),
]


@pytest.mark.parametrize('mesh,comm', LAYOUTS, ids=lambda v: v if isinstance(v, str) else
                         'x'.join(f'{k}{n}' for k, n in v.items()))
def test_layout_matches_one_device(mesh, comm):
    layouts.check(mesh, comm)


@pytest.mark.parametrize('logical,expected', [
    (('vocab', 'embed'), P('tensor', ('fsdp', 'expert'))),  # embedding table
    (('embed', 'vocab'), P(('fsdp', 'expert'), 'tensor')),  # output head
    (('norm',), P(None)),  # unknown names replicate
    (('embed', 'router'), P(('fsdp', 'expert'), None)),
    (('exp', 'embed', 'mlp'), P('expert', 'fsdp', 'tensor')),  # expert weights: exp took expert
    (('exp', 'mlp', 'embed'), P('expert', 'tensor', 'fsdp')),
    (('layers', 'exp', 'embed', 'mlp'), P(None, 'expert', 'fsdp', 'tensor')),
    (('embed', 'q_lora'), P(('fsdp', 'expert'), None)),  # nothing left for q_lora
    (('q_lora', 'heads', 'head_dim'), P(('fsdp', 'expert'), 'tensor', None)),
    (('kv_lora', 'heads', 'head_dim'), P(('fsdp', 'expert'), 'tensor', None)),
    (('batch', 'length', 'act_embed'), P(('data', 'fsdp', 'expert'), None, None)),
    (('expert_group', 'act_exp', 'capacity', 'act_embed'),
     P(('data', 'fsdp'), 'expert', None, None)),
])
def test_each_mesh_axis_once_per_spec(logical, expected):
    assert sharding.logical_to_spec(logical) == expected


def test_a_dim_too_small_for_its_axes_keeps_a_dividing_prefix():
    mesh = {'data': 1, 'fsdp': 2, 'expert': 4, 'tensor': 2}
    spec = P(('fsdp', 'expert'), 'tensor', None)
    assert sharding.fit_spec(spec, (16, 2, 3), mesh) == spec
    assert sharding.fit_spec(spec, (12, 2, 3), mesh) == P('fsdp', 'tensor', None)
    assert sharding.fit_spec(spec, (3, 3, 3), mesh) == P(None, None, None)
