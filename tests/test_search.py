"""The layout planner (moejax/plan/search.py): its memory figures are the dry run's, misfits are
reported, the JSON parses.

Truths: the dry run's own figures (a separate entry point compiling the same layout) and byte
counts from the config's shapes.
"""
import json

import pytest

from moejax.errors import ConfigError
from moejax.plan import dry_run
from moejax.plan import search as plan
from tests.helpers import run_cli, tiny_config

LAYOUT = dict(data=2, fsdp=2, expert=2, tensor=1)


def test_planner_memory_equals_dry_run_memory():
    """Same layout, remat and micro-batch on 8 devices: the planner's bytes are the dry run's."""
    cfg = tiny_config()
    row = plan.evaluate(cfg, LAYOUT, 'block', 1, memory_limit=10**9)
    assert row['fits'] and row['status'] == 'fits'
    reference = dry_run.plan(plan.variant(cfg, LAYOUT, 'block', 1))
    assert reference['mesh'] == LAYOUT
    assert row['bytes_per_device'] == {
        'params': reference['params_bytes_per_device'],
        'opt': reference['opt_state_bytes_per_device'],
        'temp': reference['temp_bytes_per_device'],
        'total': reference['total_bytes_per_device']}
    assert reference['total_bytes_per_device'] == (reference['params_bytes_per_device']
                                                   + reference['opt_state_bytes_per_device']
                                                   + reference['temp_bytes_per_device'])
    assert row['estimate']['step_seconds'] > 0 and row['estimate']['flops_per_device'] > 0


def test_layouts_that_cannot_fit_are_reported_not_raised():
    cfg = tiny_config()
    # float32 params + two Adam moments, replicated on a data-parallel mesh: 12 bytes a param.
    too_small = plan.evaluate(cfg, dict(data=8, fsdp=1, expert=1, tensor=1), 'block', 1,
                              memory_limit=1000)
    assert not too_small['fits'] and 'exceed' in too_small['status']
    assert too_small['bytes_per_device']['params'] > 1000
    invalid = plan.evaluate(cfg, dict(data=1, fsdp=1, expert=8, tensor=1), 'block', 1,
                            memory_limit=10**9)
    assert not invalid['fits'] and invalid['status'].startswith('invalid: moe.num_experts')
    rows = plan.plan_layouts(cfg, 8, 1000, layouts=[dict(data=8, fsdp=1, expert=1, tensor=1)])
    assert len(rows) == 1 and not rows[0]['fits']


def test_parse_bytes():
    assert plan.parse_bytes('80GB') == 80 * 10**9
    assert plan.parse_bytes('80GiB') == 80 * 2**30
    assert plan.parse_bytes('8e10') == 8 * 10**10
    with pytest.raises(ConfigError, match='--device_memory'):
        plan.parse_bytes('lots')


def test_mesh_candidates_are_valid_and_include_the_config_layout():
    cfg = tiny_config()
    cfg.mesh.update(data=1, fsdp=2, expert=4)
    layouts = plan.mesh_candidates(cfg, 8)
    assert layouts[0] == dict(data=1, fsdp=2, expert=4, tensor=1)
    assert all(4 % m['expert'] == 0 and m['tensor'] == 1 for m in layouts)  # 2 heads: no tp 8
    assert len(layouts) == len({tuple(m.values()) for m in layouts})


@pytest.mark.slow
def test_plan_cli_prints_a_table_and_json_last():
    proc = run_cli('plan', '--config=configs/default.py:tiny', '--devices=8',
                   '--device_memory=1GB', '--meshes=data=2,fsdp=2,expert=2', '--remat=block',
                   '--grad_accum=1')
    assert proc.returncode == 0, proc.stderr[-2000:]
    last = json.loads(proc.stdout.strip().splitlines()[-1])
    assert 'ESTIMATE' in proc.stdout and 'compiling' in proc.stderr
    (row,) = last['candidates']
    assert row['mesh'] == LAYOUT and row['remat'] == 'block' and row['grad_accum'] == 1
    assert row['micro_batch'] == 8 and row['fits']
    assert set(row['bytes_per_device']) == {'params', 'opt', 'temp', 'total'}
    assert row['estimate']['step_seconds'] > 0
    bad = run_cli('plan', '--config=configs/default.py:tiny', '--devices=8', '--remat=lots')
    assert bad.returncode == 2 and '--remat' in bad.stderr
