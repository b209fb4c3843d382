"""Load, validate and save configs; every error names the key, the bad value and the fix.

`validate` runs before anything touches data or compiles, so a mistake costs a second, not a
compile. It raises `ConfigError`, which the command line prints as one line and exit code 2.
"""
import json
import math
import os

import ml_collections

from moejax.errors import ConfigError

CHOICES = {
    'model.dtype': ('float32', 'bfloat16'),
    'model.activation': ('gelu', 'swiglu'),
    'model.remat': ('none', 'block'),
    'moe.router': ('top_k', 'noisy_top_k', 'expert_choice', 'soft'),
    'moe.dispatch': ('einsum', 'sort', 'dropless'),
    'moe.comm': ('gspmd', 'all_to_all'),
    'moe.balance': ('aux_loss', 'bias', 'none'),
    'moe.router_dtype': ('float32',),
    'data.tokenizer': ('sentencepiece', 'byte'),
    'data.text_format': ('files', 'lines'),
    'opt.name': ('adamw', 'adafactor'),
    'opt.schedule': ('cosine', 'rsqrt', 'constant'),
}

POSITIVE_INTS = ('model.d_model', 'model.num_layers', 'model.num_heads', 'model.d_ff',
                 'model.max_len', 'moe.num_experts', 'moe.top_k', 'data.seq_len',
                 'data.batch_size', 'data.eval_batches', 'opt.grad_accum', 'train.num_steps',
                 'train.log_every', 'train.checkpoint_every', 'train.keep_checkpoints',
                 'train.max_skipped_steps')
NON_NEGATIVE_INTS = ('model.num_kv_heads', 'model.moe_every', 'moe.group_size',
                     'moe.num_shared_experts', 'opt.warmup_steps', 'train.eval_every',
                     'train.seed')
NON_NEGATIVE = ('moe.aux_loss_weight', 'moe.z_loss_weight', 'moe.jitter', 'moe.bias_update_rate',
                'opt.weight_decay', 'opt.clip_norm')
POSITIVE_FLOATS = ('moe.capacity_factor', 'moe.eval_capacity_factor', 'opt.lr', 'model.rope_base')
UNIT_INTERVAL = ('opt.b1', 'opt.b2')  # Adam decay rates: [0, 1)
MESH_AXES = ('data', 'fsdp', 'expert', 'tensor')


def get(cfg, key: str):
    """cfg['group.key'] with a ConfigError (not a KeyError) when the key is missing."""
    node = cfg
    for part in key.split('.'):
        if part not in node:
            raise ConfigError(key, None, 'missing from the config; see configs/default.py')
        node = node[part]
    return node


def validate(cfg, num_devices: int) -> None:
    """Check every key moejax reads; raise ConfigError on the first problem."""
    _check_kinds(cfg)
    m, e, d = cfg.model, cfg.moe, cfg.data
    _require(d.batch_size % cfg.opt.grad_accum == 0, 'opt.grad_accum', cfg.opt.grad_accum,
             f'must divide data.batch_size={d.batch_size}')
    _require(m.d_model % m.num_heads == 0, 'model.d_model', m.d_model,
             f'must divide by model.num_heads={m.num_heads}')
    kv = m.num_kv_heads or m.num_heads
    _require(m.num_heads % kv == 0, 'model.num_kv_heads', m.num_kv_heads,
             f'must divide model.num_heads={m.num_heads} (0 = num_heads)')
    _require(m.max_len >= d.seq_len, 'model.max_len', m.max_len,
             f'must be >= data.seq_len={d.seq_len}')
    _require(e.top_k <= e.num_experts, 'moe.top_k', e.top_k,
             f'must be <= moe.num_experts={e.num_experts}')
    _require(e.jitter < 1, 'moe.jitter', e.jitter, 'must be in [0, 1)')
    if e.group_size:  # routing groups must be whole in every micro-batch (opt.grad_accum)
        tokens = d.batch_size // cfg.opt.grad_accum * d.seq_len
        _require(tokens % e.group_size == 0, 'moe.group_size', e.group_size,
                 f'must divide the micro-batch tokens batch_size/grad_accum*seq_len={tokens} '
                 '(0 = one sequence per group)')
    if m.moe_every:
        _require(m.moe_every <= m.num_layers, 'model.moe_every', m.moe_every,
                 f'must be <= model.num_layers={m.num_layers} or 0 for a dense model')
    _check_mesh(cfg, num_devices)
    micro = d.batch_size // cfg.opt.grad_accum
    dp = mesh_shape(cfg.mesh, num_devices)
    dp = dp['data'] * dp['fsdp'] * dp['expert']
    _require(micro % dp == 0, 'data.batch_size', d.batch_size,
             f'per-step micro-batch {micro} must divide by the data-parallel size '
             f'data*fsdp*expert={dp}')


def _check_kinds(cfg):
    for key, allowed in CHOICES.items():
        value = get(cfg, key)
        _require(value in allowed, key, value, 'allowed: ' + ', '.join(allowed))
    for key in POSITIVE_INTS:
        value = get(cfg, key)
        _require(_is_int(value) and value >= 1, key, value, 'must be an integer >= 1')
    for key in NON_NEGATIVE_INTS:
        value = get(cfg, key)
        _require(_is_int(value) and value >= 0, key, value, 'must be an integer >= 0')
    for key in NON_NEGATIVE:
        value = get(cfg, key)
        _require(_is_number(value) and value >= 0, key, value, 'must be a finite number >= 0')
    for key in POSITIVE_FLOATS:
        value = get(cfg, key)
        _require(_is_number(value) and value > 0, key, value, 'must be a finite number > 0')
    for key in UNIT_INTERVAL:
        value = get(cfg, key)
        _require(_is_number(value) and 0 <= value < 1, key, value, 'must be in [0, 1)')


def _check_mesh(cfg, num_devices):
    sizes = {a: get(cfg, f'mesh.{a}') for a in MESH_AXES}
    for axis, size in sizes.items():
        _require(_is_int(size) and (size >= 1 or size == -1), f'mesh.{axis}', size,
                 'must be an integer >= 1, or -1 for the remaining devices')
    shape = mesh_shape(cfg.mesh, num_devices)
    e, m = cfg.moe, cfg.model
    _require(e.num_experts % shape['expert'] == 0, 'moe.num_experts', e.num_experts,
             f'must divide by mesh.expert={shape["expert"]}')
    _require(m.num_heads % shape['tensor'] == 0, 'model.num_heads', m.num_heads,
             f'must divide by mesh.tensor={shape["tensor"]}')
    _require(m.d_ff % shape['tensor'] == 0, 'model.d_ff', m.d_ff,
             f'must divide by mesh.tensor={shape["tensor"]}')
    kv = m.num_kv_heads or m.num_heads
    _require(kv % shape['tensor'] == 0, 'model.num_kv_heads', kv,
             f'must divide by mesh.tensor={shape["tensor"]}')
    _require(cfg.data.vocab_size % shape['tensor'] == 0, 'data.vocab_size', cfg.data.vocab_size,
             f'must divide by mesh.tensor={shape["tensor"]} (the embedding is split over it)')
    _require(m.d_model % shape['fsdp'] == 0, 'model.d_model', m.d_model,
             f'must divide by mesh.fsdp={shape["fsdp"]} (weights are split over it)')


def mesh_shape(mesh_cfg, num_devices: int) -> dict[str, int]:
    """Axis sizes with a -1 resolved; their product must equal the device count."""
    sizes = {a: mesh_cfg[a] for a in MESH_AXES}
    free = [a for a, s in sizes.items() if s == -1]
    _require(len(free) <= 1, f'mesh.{free[-1] if free else "data"}', -1,
             f'only one mesh axis may be -1, got {len(free)}: {", ".join(free)}')
    fixed = math.prod(s for s in sizes.values() if s != -1)
    if free:
        _require(num_devices % fixed == 0, f'mesh.{free[0]}', -1,
                 f'the other axes ({fixed} devices) must divide the {num_devices} devices')
        sizes[free[0]] = num_devices // fixed
    product = math.prod(sizes.values())
    _require(product == num_devices, 'mesh', dict(sizes),
             f'the axis sizes multiply to {product} but there are {num_devices} devices')
    return sizes


def _require(ok: bool, key: str, value, allowed: str):
    if not ok:
        raise ConfigError(key, value, allowed)


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value) -> bool:
    """A finite int or float (not a bool, not NaN or inf)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def check_workdir(workdir: str) -> None:
    """The workdir must be a directory we can create and write to."""
    if not workdir:
        raise ConfigError('--workdir', workdir, 'is required: a directory for checkpoints/logs')
    if os.path.exists(workdir) and not os.path.isdir(workdir):
        raise ConfigError('--workdir', workdir, 'exists and is not a directory')
    try:
        os.makedirs(workdir, exist_ok=True)
    except OSError as err:
        raise ConfigError('--workdir', workdir, f'cannot be created: {err.strerror}') from None
    if not os.access(workdir, os.W_OK):
        raise ConfigError('--workdir', workdir, 'is not writable')


def save_json(cfg, workdir: str) -> None:
    """Write the resolved config next to the run's checkpoints (config.json)."""
    path = os.path.join(workdir, 'config.json')
    with open(path + '.tmp', 'w') as f:
        json.dump(cfg.to_dict(), f, indent=2, sort_keys=True)
    os.replace(path + '.tmp', path)


# Keys added after a run could have saved its config.json, with the value that reproduces the
# behaviour such a run had: a saved run stays loadable (eval, generate, analyze) as keys appear.
ADDED_KEYS = {'model.remat': 'none'}


def from_json(path: str) -> ml_collections.ConfigDict:
    """The config a run saved, with keys added since then set to their old behaviour."""
    with open(path) as f:
        cfg = ml_collections.ConfigDict(json.load(f))
    for key, value in ADDED_KEYS.items():
        group, name = key.split('.')
        if name not in cfg[group]:
            cfg[group][name] = value
    return cfg
