"""Configs (moejax/config.py): derived sizes, the workdir check, and a run's config.json read
back, also when saved before a key was added or after one was removed."""
import json

import pytest

from moejax import config as config_lib
from moejax import validate
from moejax.errors import ConfigError
from moejax.moe import routing as R
from tests.helpers import assert_usage_error, fake_run, timed, tiny_config


def test_mesh_shape_resolves_the_free_axis():
    cfg = tiny_config()
    cfg.mesh.update(data=-1, expert=4)
    assert config_lib.mesh_shape(cfg.mesh, 8) == dict(data=2, fsdp=1, expert=4, tensor=1)
    validate.check(cfg, num_devices=8)


def test_workdir_that_is_a_file_is_refused(tmp_path):
    path = tmp_path / 'file'
    path.write_text('x')
    with pytest.raises(ConfigError, match='not a directory'):
        config_lib.check_workdir(str(path))


def test_saved_config_from_before_a_key_existed_still_loads(tmp_path):
    cfg = tiny_config()
    config_lib.save_json(cfg, str(tmp_path))
    saved = json.loads((tmp_path / 'config.json').read_text())
    del saved['model']['remat']
    (tmp_path / 'config.json').write_text(json.dumps(saved))
    loaded = config_lib.from_json(str(tmp_path / 'config.json'))
    assert loaded.model.remat == 'none'
    validate.check(loaded, num_devices=8)


def test_saved_config_with_a_removed_key_still_loads(tmp_path):
    saved = tiny_config().to_dict()
    saved['moe']['router_dtype'] = 'float32'  # validated until 2026-12, never read
    (tmp_path / 'config.json').write_text(json.dumps(saved))
    loaded = config_lib.from_json(str(tmp_path / 'config.json'))
    assert 'router_dtype' not in loaded.moe
    validate.check(loaded, num_devices=8)


def test_old_configs_load_with_todays_routing(tmp_path):
    cfg = tiny_config()
    saved = cfg.to_dict()
    for key in ('score_fn', 'gate_norm', 'batch_prioritized', 'capacity_rule', 'aux_loss_norm'):
        del saved['moe'][key]
    (tmp_path / 'config.json').write_text(__import__('json').dumps(saved))
    loaded = config_lib.from_json(str(tmp_path / 'config.json'))
    assert R.conventions(loaded.moe) == R.Conventions()
    assert loaded.moe.capacity_rule == 'gshard'


CORRUPT = ['{"model": {"d_model": 3', '', '[1, 2]', '\xff\xfe garbage']


# Every kind of damage through one reader, and each other reader once: they read config.json
# through the same from_json (each case is a process, ~2 s).
@pytest.mark.parametrize('script,args,text', [('eval', (), text) for text in CORRUPT] + [
    ('generate', ('--prompt=x',), CORRUPT[0]), ('analyze', ('--text=x',), CORRUPT[3])])
def test_corrupt_config_json_is_one_line(tmp_path, script, args, text):
    workdir = fake_run(tmp_path / 'run', text)
    proc, seconds = timed(script, f'--workdir={workdir}', *args)
    assert_usage_error(proc, '--workdir', 'config.json', seconds=seconds)
