"""Config validation (moejax/validate.py): each bad value is caught before compiling, naming the
key and what is allowed."""
import os

import ml_collections
import pytest

from moejax import config as config_lib
from moejax import validate
from moejax.errors import ConfigError
from tests.helpers import TINY, assert_usage_error, timed, tiny_config

BAD = [
    ('moe.router', 'topk', 'allowed: top_k, noisy_top_k, expert_choice, soft'),
    ('moe.dispatch', 'magic', 'allowed: einsum, sort, dropless'),
    ('moe.balance', 'loss', 'allowed: aux_loss, bias, none'),
    ('model.dtype', 'float16', 'allowed: float32, bfloat16'),
    ('opt.name', 'sgd', 'allowed: adamw, adafactor'),
    ('model.num_layers', 0, 'integer >= 1'),
    ('moe.capacity_factor', float('nan'), 'finite number'),  # <= 0 is allowed: no drops
    ('model.num_heads', 3, 'must divide by model.num_heads=3'),  # reported on model.d_model
    ('moe.top_k', 9, '<= moe.num_experts'),
    ('model.max_len', 8, '>= data.seq_len'),
    ('moe.jitter', 1.5, '[0, 1)'),
    ('opt.grad_accum', 3, 'divide data.batch_size'),
    ('model.head_dim', 15, 'must be even'),
    ('model.dense_layers', [5], 'distinct layer indices in [0, model.num_layers=2)'),
    ('moe.shared_d_ff', 64, 'needs moe.num_shared_experts >= 1'),
    ('moe.shared_gate', True, 'needs moe.num_shared_experts >= 1'),
]


def test_only_a_dense_prefix_may_break_scanned_periods():
    """Scanning keeps the first k layers unrolled when they are model.dense_layers; other dense
    layers, or a prefix that leaves no whole periods, are refused in one line."""
    cfg = tiny_config(num_layers=8, moe_every=1, dense_layers=[0, 1])
    assert not config_lib.scans_layers(cfg)  # auto: unrolled, as before prefixes scanned
    cfg.model.scan_layers = True
    validate.check(cfg, num_devices=8)
    assert config_lib.scan_layout(cfg) == (2, 1, 6)
    cfg.model.dense_layers = [1, 2]
    with pytest.raises(ConfigError, match=r'model.dense_layers=\[1, 2\] breaks .*first k layers'):
        validate.check(cfg, num_devices=8)
    cfg.model.update(moe_every=2, dense_layers=[0])  # layers 1..7 are no whole periods of 2
    with pytest.raises(ConfigError, match='the 1 unrolled dense layers and the 7 after them'):
        validate.check(cfg, num_devices=8)
    cfg.model.dense_layers = [0, 1]
    validate.check(cfg, num_devices=8)
    assert config_lib.scan_layout(cfg) == (2, 2, 3)
    cfg.model.update(moe_every=1, num_layers=2)  # nothing left to scan
    with pytest.raises(ConfigError, match='model.scan_layers'):
        validate.check(cfg, num_devices=8)


def test_scan_needs_whole_periods():
    cfg = tiny_config(num_layers=3, moe_every=2)
    cfg.model.scan_layers = True
    with pytest.raises(ConfigError, match='model.scan_layers'):
        validate.check(cfg, 1)
    cfg.model.scan_layers = None  # auto: too shallow and uneven, so unrolled
    validate.check(cfg, 1)
    assert not config_lib.scans_layers(cfg)
    cfg.model.update(num_layers=8)
    assert config_lib.scans_layers(cfg)


@pytest.mark.parametrize('key,value,message', BAD)
def test_bad_value_names_key_and_remedy(key, value, message):
    cfg = tiny_config()
    group, name = key.split('.')
    setattr(cfg[group], name, value)
    with pytest.raises(ConfigError) as err:
        validate.check(cfg, num_devices=8)
    assert err.value.key == ('model.d_model' if key == 'model.num_heads' else key)
    text = str(err.value)
    assert '\n' not in text and message in text


@pytest.mark.parametrize('mesh,key', [
    (dict(data=3), 'mesh'),                    # 3 x 1 x 1 x 1 != 8 devices
    (dict(data=-1, expert=-1), 'mesh.expert'),  # two free axes
    (dict(data=1, expert=8), 'moe.num_experts'),  # 4 experts over 8 expert shards
    (dict(data=-1, tensor=8), 'model.num_heads'),
    (dict(data=-1, tensor=2), 'data.vocab_size'),  # tiny's byte vocab 259 is odd
])
def test_bad_mesh(mesh, key):
    cfg = tiny_config()
    cfg.mesh.update(mesh)
    with pytest.raises(ConfigError) as err:
        validate.check(cfg, num_devices=8)
    assert err.value.key == key


def test_batch_must_divide_by_data_parallel_size():
    cfg = tiny_config()
    cfg.data.batch_size = 4  # 8 data-parallel devices
    with pytest.raises(ConfigError, match='data.batch_size'):
        validate.check(cfg, num_devices=8)


@pytest.mark.parametrize('overrides,key', [
    (dict(router='expert_choice', gate_norm='raw'), 'moe.gate_norm'),
    (dict(router='soft', batch_prioritized=True), 'moe.batch_prioritized'),
    (dict(num_expert_groups=3), 'moe.num_expert_groups'),
    (dict(num_expert_groups=2, top_expert_groups=3), 'moe.top_expert_groups'),
    (dict(top_expert_groups=1), 'moe.top_expert_groups'),
    (dict(num_expert_groups=4, top_expert_groups=1, top_k=2), 'moe.top_k'),
    (dict(score_fn='tanh'), 'moe.score_fn'),
    (dict(batch_prioritized='yes'), 'moe.batch_prioritized'),
    (dict(min_capacity=0), 'moe.min_capacity'),
])
def test_bad_conventions_are_config_errors(overrides, key):
    saved = tiny_config().to_dict()  # as a hand-edited config.json would hold them
    saved['moe'].update(overrides)
    with pytest.raises(ConfigError, match=key.replace('.', r'\.')):
        validate.check(ml_collections.ConfigDict(saved), 1)


@pytest.mark.parametrize('name,devices', [('switch_base_t5x', 32), ('deepseek_v3_small', 1)])
def test_recipes_validate(name, devices):
    recipe = __import__(f'configs.{name}', fromlist=['get_config'])
    validate.check(recipe.get_config(), devices)


def test_odd_head_size_is_refused_by_validation(tmp_path):
    proc, seconds = timed('train', TINY, f'--workdir={tmp_path / "run"}',
                          f'--config.data.data_dir={tmp_path / "data"}',
                          '--config.model.d_model=6', '--config.model.num_heads=2')
    assert_usage_error(proc, 'model.d_model=6', 'd_model/num_heads=3', 'even', seconds=seconds)
    assert not os.path.exists(tmp_path / 'data'), 'nothing may be prepared for a bad config'


@pytest.mark.parametrize('key', ['moe.capacity_factor', 'moe.eval_capacity_factor'])
@pytest.mark.parametrize('bad', [float('nan'), float('inf'), 'auto', None])
def test_capacity_factor_must_still_be_a_finite_number(key, bad):
    import ml_collections

    values = tiny_config().to_dict()
    group, name = key.split('.')
    values[group][name] = bad
    with pytest.raises(ConfigError, match=key):
        validate.check(ml_collections.ConfigDict(values), num_devices=8)
