"""Configs: read a key, derive the sizes other keys leave implicit, save and reload a run's
config.json (old runs keep their behaviour through ADDED_KEYS). Checking a config is
moejax.validate's job; every error here too names the key, the bad value and the fix.
"""
import json
import math
import os

import ml_collections

from moejax.errors import ConfigError


def get(cfg, key: str):
    """cfg['group.key'] with a ConfigError (not a KeyError) when the key is missing."""
    node = cfg
    for part in key.split('.'):
        if part not in node:
            raise ConfigError(key, None, 'missing from the config; see configs/default.py')
        node = node[part]
    return node


def head_dim(cfg) -> int:
    """Channels per attention head: model.head_dim, or d_model / num_heads when it is 0."""
    m = cfg.model
    return m.head_dim or m.d_model // m.num_heads


def expert_d_ff(cfg) -> int:
    """Hidden width of each routed expert: moe.expert_d_ff, or model.d_ff when it is 0."""
    return cfg.moe.expert_d_ff or cfg.model.d_ff


def shared_d_ff(cfg) -> int:
    """Hidden width of the shared experts' FFN (0: none): moe.shared_d_ff, or
    num_shared_experts x the expert width when it is 0."""
    e = cfg.moe
    if not e.num_shared_experts:
        return 0
    return e.shared_d_ff or e.num_shared_experts * expert_d_ff(cfg)


def dense_layers(cfg) -> tuple[int, ...]:
    """Layers kept dense whatever model.moe_every says (Qwen-MoE's mlp_only_layers)."""
    return tuple(cfg.model.dense_layers)


SCAN_MIN_LAYERS = 8  # model.scan_layers=None: scan models at least this deep


def scan_period(cfg) -> int:
    """Layers per scanned period: moe_every - 1 dense blocks then one MoE block (1 if dense)."""
    return cfg.model.moe_every or 1


def scan_prefix(cfg) -> int:
    """Leading layers a scanned model keeps unrolled before its periods: model.dense_layers
    when they are exactly the first k layers (DeepSeek's first_k_dense_replace; MaxText unrolls
    them too), else 0 (validate refuses other dense layers with scanning)."""
    dense = sorted(dense_layers(cfg))
    return len(dense) if dense == list(range(len(dense))) else 0


def scan_layout(cfg) -> tuple[int, int, int]:
    """(prefix, period, periods) of a scanned model: layer prefix + p * period + j is block j
    of stacked period p; layers 0..prefix-1 stay unrolled."""
    prefix, period = scan_prefix(cfg), scan_period(cfg)
    return prefix, period, (cfg.model.num_layers - prefix) // period


def scans_layers(cfg) -> bool:
    """model.scan_layers resolved: None (auto) scans models of >= SCAN_MIN_LAYERS layers whose
    layers split into whole periods; configs from before the key existed are unrolled."""
    m = cfg.model
    choice = m.scan_layers
    if choice is None:
        return (m.num_layers >= SCAN_MIN_LAYERS and m.num_layers % scan_period(cfg) == 0
                and not dense_layers(cfg))
    return bool(choice)


# The mesh's axes in order: the keys of cfg.mesh (moejax.sharding maps logical names onto them).
MESH_AXES = ('data', 'fsdp', 'expert', 'tensor')


def mesh_shape(mesh_cfg, num_devices: int) -> dict[str, int]:
    """Axis sizes with a -1 resolved; their product must equal the device count."""
    sizes = {a: mesh_cfg[a] for a in MESH_AXES}
    free = [a for a, s in sizes.items() if s == -1]
    require(len(free) <= 1, f'mesh.{free[-1] if free else "data"}', -1,
             f'only one mesh axis may be -1, got {len(free)}: {", ".join(free)}')
    fixed = math.prod(s for s in sizes.values() if s != -1)
    if free:
        require(num_devices % fixed == 0, f'mesh.{free[0]}', -1,
                 f'the other axes ({fixed} devices) must divide the {num_devices} devices')
        sizes[free[0]] = num_devices // fixed
    product = math.prod(sizes.values())
    require(product == num_devices, 'mesh', dict(sizes),
             f'the axis sizes multiply to {product} but there are {num_devices} devices')
    return sizes


def check_sampling_args(max_new_tokens, temperature, top_k, num_samples=1) -> None:
    """Generation settings (the generate command's flags): checked before a checkpoint loads."""
    require(is_int(max_new_tokens) and max_new_tokens >= 1, '--max_new_tokens',
             max_new_tokens, 'must be an integer >= 1')
    require(is_number(temperature) and temperature >= 0, '--temperature', temperature,
             'must be a finite number >= 0 (0 = greedy decoding)')
    require(is_int(top_k) and top_k >= 0, '--top_k', top_k,
             'must be an integer >= 0 (0 = sample from the whole vocabulary)')
    require(is_int(num_samples) and num_samples >= 1, '--num_samples', num_samples,
             'must be an integer >= 1')


def require(ok: bool, key: str, value, allowed: str):
    if not ok:
        raise ConfigError(key, value, allowed)


def is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def is_number(value) -> bool:
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
ADDED_KEYS = {'model.remat': 'none', 'model.scan_layers': False, 'model.attention': 'xla',
              'model.attention_block': 128, 'moe.grouped_matmul': 'auto',
              # router conventions (issue 17): the behaviour before they existed
              'moe.score_fn': 'softmax', 'moe.gate_norm': 'auto', 'moe.routed_scaling_factor': 1.0,
              'moe.num_expert_groups': 0, 'moe.top_expert_groups': 0,
              'moe.batch_prioritized': False, 'moe.capacity_rule': 'gshard', 'moe.min_capacity': 1,
              'moe.aux_loss_norm': 'assignments',
              'train.spike_factor': 0.0,  # the loss-spike guard (issue 12) was off
              # Hugging Face families (issue 16): the model as it was
              'model.norm_eps': 1e-6, 'model.head_dim': 0, 'model.qk_norm': False,
              'model.qkv_bias': False, 'model.dense_layers': [], 'moe.expert_d_ff': 0,
              'moe.shared_d_ff': 0, 'moe.shared_gate': False,
              # the ragged expert exchange (issue 22): dropless under expert parallelism never
              # dropped a row before it (its buffers were the worst case)
              'moe.ep_buffer_factor': 0.0,
              # DeepSeek-V3 (issue 26): standard attention, no rope scaling, no MTP, no sequence loss
              'model.attention_kind': 'mha', 'model.q_lora_rank': 0, 'model.kv_lora_rank': 0,
              'model.qk_nope_head_dim': 0, 'model.qk_rope_head_dim': 0, 'model.v_head_dim': 0,
              'model.rope_scaling': 'none', 'model.rope_factor': 1.0,
              'model.rope_original_max_len': 4096, 'model.rope_beta_fast': 32.0,
              'model.rope_beta_slow': 1.0, 'model.rope_mscale': 1.0,
              'model.rope_mscale_all_dim': 0.0, 'model.mtp_depth': 0, 'model.mtp_loss_weight': 0.3,
              'moe.seq_aux_loss_weight': 0.0}


# Keys that no longer mean anything: dropped when an old run's config.json is read.
REMOVED_KEYS = ('moe.router_dtype',)  # validated but never read: the router always runs in float32


def _run_file(path: str) -> tuple[str, str]:
    """('--workdir', the directory) for a message about a file of a run's workdir."""
    return '--workdir', os.path.dirname(path) or '.'


def from_json(path: str) -> ml_collections.ConfigDict:
    """The config a run saved, with keys added since then set to their old behaviour.

    A damaged file (edited by hand, truncated, not JSON) is a ConfigError naming it.
    """
    try:
        with open(path, encoding='utf-8') as f:
            saved = json.load(f)
    except (OSError, ValueError) as err:  # ValueError: JSONDecodeError, UnicodeDecodeError
        reason = getattr(err, 'strerror', None) or str(err).splitlines()[0][:120]
        raise ConfigError(*_run_file(path), f'{os.path.basename(path)} is not readable '
                          f'({reason}); it records how the run was trained: restore it, or write '
                          "it again from the run's config file (eval also accepts --config)"
                          ) from None
    groups = ('model', 'moe', 'mesh', 'data', 'opt', 'train')
    missing = [g for g in groups if not isinstance(saved, dict) or
               not isinstance(saved.get(g), dict)]
    if missing:
        raise ConfigError(*_run_file(path), f'{os.path.basename(path)} is not a run config (no '
                          f'{", ".join(missing)} group); restore it, or write it again from the '
                          "run's config file") from None
    cfg = ml_collections.ConfigDict(saved)
    if 'ep_buffer_factor' not in cfg.moe and cfg.moe.comm == 'gspmd':
        cfg.moe.comm = 'auto'  # before 'auto' existed, 'gspmd' meant what 'auto' means now
    for key in REMOVED_KEYS:
        group, name = key.split('.')
        if name in cfg[group]:
            del cfg[group][name]
    for key, value in ADDED_KEYS.items():
        group, name = key.split('.')
        if name not in cfg[group]:
            cfg[group][name] = value
    return cfg
