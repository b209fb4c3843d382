"""Check a config before anything touches data or compiles: a mistake costs a second, not a
compile. Each error names the key, the bad value and the fix (ConfigError: one line, exit 2).

The allowed values of each choice come from the module that implements it; the defaults live in
configs/default.py only; the values that reproduce old runs in config.ADDED_KEYS.
"""
import importlib.util

from moejax import config as config_lib
from moejax import optim
from moejax.config import dense_layers, expert_d_ff, get, is_int, is_number, mesh_shape, shared_d_ff
from moejax.config import require as _require
from moejax.data import text_files, tokenizer
from moejax.model import attention, mla, transformer
from moejax.moe import dispatch, expert_parallel, experts, routing

CHOICES = {
    'model.dtype': tuple(transformer.DTYPES),
    'model.activation': experts.ACTIVATIONS,
    'model.remat': transformer.REMATS,
    'model.attention': attention.IMPLEMENTATIONS,
    'model.attention_kind': transformer.ATTENTION_KINDS,
    'model.rope_scaling': mla.ROPE_SCALINGS,
    'moe.router': routing.ROUTERS,
    'moe.dispatch': dispatch.ENGINES,
    'moe.comm': expert_parallel.COMMS,
    'moe.grouped_matmul': experts.BACKENDS,
    'moe.balance': routing.BALANCES,
    'moe.score_fn': routing.SCORE_FNS,
    'moe.gate_norm': routing.GATE_NORMS,
    'moe.capacity_rule': routing.CAPACITY_RULES,
    'moe.aux_loss_norm': routing.AUX_LOSS_NORMS,
    'data.tokenizer': tokenizer.KINDS,
    'data.text_format': text_files.TEXT_FORMATS,
    'opt.name': optim.OPTIMIZERS,
    'opt.schedule': optim.SCHEDULES,
}

POSITIVE_INTS = ('model.d_model', 'model.num_layers', 'model.num_heads', 'model.d_ff',
                 'model.attention_block',
                 'model.max_len', 'moe.num_experts', 'moe.top_k', 'data.seq_len',
                 'data.batch_size', 'data.eval_batches', 'opt.grad_accum', 'train.num_steps',
                 'train.log_every', 'train.checkpoint_every', 'train.keep_checkpoints',
                 'train.max_skipped_steps', 'moe.min_capacity', 'model.rope_original_max_len')
NON_NEGATIVE_INTS = ('model.num_kv_heads', 'model.moe_every', 'moe.group_size',
                     'model.head_dim', 'moe.expert_d_ff', 'moe.shared_d_ff',
                     'moe.num_shared_experts', 'opt.warmup_steps', 'train.eval_every',
                     'train.seed', 'moe.num_expert_groups', 'moe.top_expert_groups',
                     'model.q_lora_rank', 'model.kv_lora_rank', 'model.qk_nope_head_dim',
                     'model.qk_rope_head_dim', 'model.v_head_dim', 'model.mtp_depth')
NON_NEGATIVE = ('moe.aux_loss_weight', 'moe.z_loss_weight', 'moe.jitter', 'moe.bias_update_rate',
                'opt.weight_decay', 'opt.clip_norm', 'train.spike_factor',
                'moe.seq_aux_loss_weight', 'model.mtp_loss_weight', 'model.rope_mscale',
                'model.rope_mscale_all_dim')
POSITIVE_FLOATS = ('opt.lr', 'model.rope_base', 'moe.routed_scaling_factor', 'model.norm_eps',
                   'model.rope_factor', 'model.rope_beta_fast', 'model.rope_beta_slow')
BOOLS = ('model.qk_norm', 'model.qkv_bias', 'moe.shared_gate', 'moe.batch_prioritized')
# Slots per expert = ceil(S*k*factor/E); a factor <= 0 means no drops (S slots: see
# routing.capacity), so any finite number is allowed.
CAPACITY_FACTORS = ('moe.capacity_factor', 'moe.eval_capacity_factor', 'moe.ep_buffer_factor')
UNIT_INTERVAL = ('opt.b1', 'opt.b2')  # Adam decay rates: [0, 1)


def check(cfg, num_devices: int) -> None:
    """Check every key moejax reads; raise ConfigError on the first problem."""
    _check_kinds(cfg)
    m, e, d = cfg.model, cfg.moe, cfg.data
    _require(d.batch_size % cfg.opt.grad_accum == 0, 'opt.grad_accum', cfg.opt.grad_accum,
             f'must divide data.batch_size={d.batch_size}')
    _check_mla(cfg) if m.attention_kind == 'mla' else _check_heads(cfg)
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
    _check_layer_kinds(cfg)
    _check_rope_scaling(cfg)
    _check_scan(cfg)
    _check_router_conventions(cfg)
    _check_mesh(cfg, num_devices)
    _require(e.grouped_matmul != 'tokamax' or importlib.util.find_spec('tokamax') is not None,
             'moe.grouped_matmul', e.grouped_matmul,
             'tokamax is not installed: pip install "moejax[cuda]" (or tokamax>=0.0.17; needs '
             "Python >= 3.12 and jax >= 0.11.1), or use 'auto', 'ragged_dot' or 'blocks'")
    micro = d.batch_size // cfg.opt.grad_accum
    dp = mesh_shape(cfg.mesh, num_devices)
    dp = dp['data'] * dp['fsdp'] * dp['expert']
    _require(micro % dp == 0, 'data.batch_size', d.batch_size,
             f'per-step micro-batch {micro} must divide by the data-parallel size '
             f'data*fsdp*expert={dp}')


# Router conventions that only the top_k router has (its scores, gates, groups, aux loss).
TOP_K_ONLY = {'score_fn': 'softmax', 'gate_norm': 'auto', 'routed_scaling_factor': 1.0,
              'num_expert_groups': 0, 'aux_loss_norm': 'assignments', 'seq_aux_loss_weight': 0.0}


def _check_heads(cfg):
    """The head size (model.head_dim, or d_model / num_heads) must be even: rotary positions
    rotate pairs of dimensions."""
    m = cfg.model
    if m.head_dim:
        _require(m.head_dim % 2 == 0, 'model.head_dim', m.head_dim,
                 'must be even (rotary positions rotate pairs of dimensions), or 0 for '
                 'd_model / num_heads')
        return
    _require(m.d_model % m.num_heads == 0, 'model.d_model', m.d_model,
             f'must divide by model.num_heads={m.num_heads} (or set model.head_dim)')
    size = m.d_model // m.num_heads
    _require(size % 2 == 0, 'model.d_model', m.d_model,
             f'the head size d_model/num_heads={size} must be even (rotary positions '
             f'rotate pairs of dimensions); e.g. d_model={m.num_heads * (size + 1)}')


def _check_mla(cfg):
    """Multi-head latent attention: a compressed latent, rotary and non-rotary query/key parts,
    a value width; its K/V heads are the query heads; YaRN applies to MLA only."""
    m = cfg.model
    for key in ('kv_lora_rank', 'qk_nope_head_dim', 'v_head_dim'):
        _require(m[key] >= 1, f'model.{key}', m[key], "must be >= 1 for attention_kind='mla'")
    _require(m.qk_rope_head_dim >= 2 and m.qk_rope_head_dim % 2 == 0, 'model.qk_rope_head_dim',
             m.qk_rope_head_dim, "must be even and >= 2 for attention_kind='mla' (rotary "
             'positions rotate pairs of channels)')
    _require(m.num_kv_heads in (0, m.num_heads), 'model.num_kv_heads', m.num_kv_heads,
             "must be 0 (= num_heads) for attention_kind='mla': every head expands the latent")


def _check_rope_scaling(cfg):
    m = cfg.model
    _require(m.rope_scaling == 'none' or m.attention_kind == 'mla', 'model.rope_scaling',
             m.rope_scaling, "YaRN is built for attention_kind='mla' (DeepSeek); use 'none'")


def _check_layer_kinds(cfg):
    """model.dense_layers: distinct layer indices; shared-expert options need shared experts."""
    m, e = cfg.model, cfg.moe
    dense = get(cfg, 'model.dense_layers')
    _require(isinstance(dense, (list, tuple)) and all(
        is_int(i) and 0 <= i < m.num_layers for i in dense) and len(set(dense)) == len(dense),
        'model.dense_layers', dense,
        f'must be a list of distinct layer indices in [0, model.num_layers={m.num_layers})')
    _require(e.num_shared_experts or not e.shared_d_ff, 'moe.shared_d_ff', e.shared_d_ff,
             'needs moe.num_shared_experts >= 1 (0 = num_shared_experts * expert width)')
    _require(e.num_shared_experts or not e.shared_gate, 'moe.shared_gate', e.shared_gate,
             'needs moe.num_shared_experts >= 1')


def _check_router_conventions(cfg):
    """Peer conventions (moe.score_fn ...): each applies to the routers that have it; expert
    groups must split the experts evenly and leave every token at least top_k experts."""
    e = cfg.moe
    for name, default in TOP_K_ONLY.items():
        _require(e.router == 'top_k' or e[name] == default, f'moe.{name}', e[name],
                 f"applies to moe.router='top_k' only (router is {e.router!r}); "
                 f'leave it {default!r}')
    _require(not e.batch_prioritized or e.router in ('top_k', 'noisy_top_k'),
             'moe.batch_prioritized', True, "applies to moe.router 'top_k' or 'noisy_top_k' "
             f'(experts choose their tokens under {e.router!r}); leave it False')
    n, top = e.num_expert_groups, e.top_expert_groups
    if not n:
        _require(top == 0, 'moe.top_expert_groups', top,
                 'needs moe.num_expert_groups > 0 (0 = no group-limited routing)')
        return
    _require(e.num_experts % n == 0, 'moe.num_expert_groups', n,
             f'must divide moe.num_experts={e.num_experts}')
    _require(1 <= top <= n, 'moe.top_expert_groups', top,
             f'must be in [1, moe.num_expert_groups={n}]')
    _require(e.top_k <= top * (e.num_experts // n), 'moe.top_k', e.top_k,
             f'must be <= top_expert_groups * experts per group = {top * (e.num_experts // n)}')


def _check_scan(cfg):
    """model.scan_layers: None (auto) or a bool; scanning needs whole periods of layers after
    the dense prefix it keeps unrolled (model.dense_layers = the first k layers, or none)."""
    m = cfg.model
    scan = get(cfg, 'model.scan_layers')
    _require(scan in (None, True, False), 'model.scan_layers', scan,
             'allowed: None (scan when num_layers >= 8), True, False')
    if scan is not True:
        return
    dense, (first, period, _) = list(dense_layers(cfg)), config_lib.scan_layout(cfg)
    _require(len(dense) == first, 'model.scan_layers', scan,
             f'scanning needs identical periods of layers, which model.dense_layers={dense} '
             'breaks (only the first k layers, [0, ..., k-1], may be dense: they stay '
             'unrolled); set it False (or None)')
    rest = m.num_layers - first
    layers = (f'model.num_layers={m.num_layers}' if not first else f'the {first} unrolled dense '
              f'layers and the {rest} after them (model.num_layers={m.num_layers})')
    _require(rest >= period and rest % period == 0 and first % period == 0, 'model.scan_layers',
             scan, f'scanning needs {layers} to divide by model.moe_every={m.moe_every} (one '
             'period of layers is scanned); or set it False')


def _check_kinds(cfg):
    for key, allowed in CHOICES.items():
        value = get(cfg, key)
        _require(value in allowed, key, value, 'allowed: ' + ', '.join(allowed))
    for key in POSITIVE_INTS:
        value = get(cfg, key)
        _require(is_int(value) and value >= 1, key, value, 'must be an integer >= 1')
    for key in NON_NEGATIVE_INTS:
        value = get(cfg, key)
        _require(is_int(value) and value >= 0, key, value, 'must be an integer >= 0')
    for key in NON_NEGATIVE:
        value = get(cfg, key)
        _require(is_number(value) and value >= 0, key, value, 'must be a finite number >= 0')
    for key in POSITIVE_FLOATS:
        value = get(cfg, key)
        _require(is_number(value) and value > 0, key, value, 'must be a finite number > 0')
    for key in CAPACITY_FACTORS:
        value = get(cfg, key)
        _require(is_number(value), key, value,
                 'must be a finite number (<= 0: no drops, capacity = the group size)')
    for key in BOOLS:
        value = get(cfg, key)
        _require(isinstance(value, bool), key, value, 'must be True or False')
    for key in UNIT_INTERVAL:
        value = get(cfg, key)
        _require(is_number(value) and 0 <= value < 1, key, value, 'must be in [0, 1)')


def _check_mesh(cfg, num_devices):
    sizes = {a: get(cfg, f'mesh.{a}') for a in config_lib.MESH_AXES}
    for axis, size in sizes.items():
        _require(is_int(size) and (size >= 1 or size == -1), f'mesh.{axis}', size,
                 'must be an integer >= 1, or -1 for the remaining devices')
    shape = mesh_shape(cfg.mesh, num_devices)
    e, m = cfg.moe, cfg.model
    _require(e.num_experts % shape['expert'] == 0, 'moe.num_experts', e.num_experts,
             f'must divide by mesh.expert={shape["expert"]}')
    _require(not (shape['expert'] > 1 and m.moe_every and e.dispatch == 'dropless'
                  and e.comm == 'gspmd'), 'moe.comm', e.comm,
             "dropless routing on mesh.expert > 1 needs the ragged exchange (GSPMD would gather "
             "every expert's weights to each device): use 'auto' or 'all_to_all'")
    _require(m.num_heads % shape['tensor'] == 0, 'model.num_heads', m.num_heads,
             f'must divide by mesh.tensor={shape["tensor"]}')
    _require(m.d_ff % shape['tensor'] == 0, 'model.d_ff', m.d_ff,
             f'must divide by mesh.tensor={shape["tensor"]}')
    widths = (('moe.expert_d_ff', expert_d_ff(cfg)), ('moe.shared_d_ff', shared_d_ff(cfg)))
    for key, width in widths:
        _require(width % shape['tensor'] == 0, key, width,
                 f'must divide by mesh.tensor={shape["tensor"]}')
    kv = m.num_kv_heads or m.num_heads
    _require(kv % shape['tensor'] == 0, 'model.num_kv_heads', kv,
             f'must divide by mesh.tensor={shape["tensor"]}')
    _require(cfg.data.vocab_size % shape['tensor'] == 0, 'data.vocab_size', cfg.data.vocab_size,
             f'must divide by mesh.tensor={shape["tensor"]} (the embedding is split over it)')
    _require(m.d_model % shape['fsdp'] == 0, 'model.d_model', m.d_model,
             f'must divide by mesh.fsdp={shape["fsdp"]} (weights are split over it)')
