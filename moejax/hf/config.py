"""Hugging Face config.json <-> moejax config, for Mixtral, Qwen2-MoE and Qwen3-MoE.

Import fills the model/moe keys from the HF file (the rest from a base config) and refuses,
in one line, what moejax cannot honour (another architecture, sliding-window attention, rope
scaling, a non-SwiGLU activation). Imported models are dropless (no capacity), as HF computes them,
and route each sequence as one group, so any number of tokens can be run.
Export picks the family that expresses the moejax model exactly, or refuses and says why.
"""
import json
import os
import re

from moejax import config as config_lib
from moejax.errors import ConfigError
from moejax.hf import tensors as tensors_lib

FAMILIES = {'MixtralForCausalLM': 'mixtral', 'Qwen2MoeForCausalLM': 'qwen2_moe',
            'Qwen3MoeForCausalLM': 'qwen3_moe',
            'DeepseekV3ForCausalLM': 'deepseek_v3'}  # moejax/hf/deepseek.py
ARCHITECTURE = {family: arch for arch, family in FAMILIES.items()}


def read_hf_json(hf_dir: str) -> dict:
    """The directory's config.json, with every field moejax reads of the kind it must be."""
    if not os.path.isdir(hf_dir):
        raise ConfigError('--from_hf', hf_dir, 'is not a directory: give one written by '
                          'save_pretrained')
    hf = tensors_lib.read_json(hf_dir, 'config.json')
    if hf is None:
        raise ConfigError('--from_hf', hf_dir, 'holds no config.json; give a directory written '
                          'by save_pretrained')
    if not isinstance(hf, dict):
        raise ConfigError('--from_hf', hf_dir, f'config.json holds a {type(hf).__name__}, not '
                          'a JSON object')
    _check_fields(hf, hf_dir)
    return hf


# config.json fields moejax reads: sizes are positive integers (below MAX_SIZE), the rest numbers
REQUIRED_SIZES = ('hidden_size', 'num_hidden_layers', 'num_attention_heads', 'intermediate_size',
                  'vocab_size', 'num_experts_per_tok')
OPTIONAL_SIZES = ('num_key_value_heads', 'head_dim', 'max_position_embeddings',
                  'moe_intermediate_size', 'decoder_sparse_step', 'num_local_experts',
                  'num_experts')
OPTIONAL_NUMBERS = ('rms_norm_eps', 'router_aux_loss_coef', 'router_jitter_noise', 'rope_theta',
                    'shared_expert_intermediate_size', 'sliding_window')
MAX_SIZE = 1 << 31


def _check_fields(hf: dict, hf_dir: str) -> None:
    for name in REQUIRED_SIZES + OPTIONAL_SIZES:
        value = hf.get(name)
        if value is None and name in OPTIONAL_SIZES:
            continue
        if not (isinstance(value, int) and not isinstance(value, bool) and
                1 <= value < MAX_SIZE):
            _refuse(hf_dir, name, value, 'must be a positive integer' if name in hf else
                    'is required (a Mixtral, Qwen2-MoE or Qwen3-MoE config sets it)')
    for name in OPTIONAL_NUMBERS:
        value = hf.get(name)
        if value is not None and not (isinstance(value, (int, float)) and
                                      not isinstance(value, bool) and 0 <= value < MAX_SIZE):
            _refuse(hf_dir, name, value, 'must be a number >= 0')
    layers = hf.get('mlp_only_layers') or []
    if not (isinstance(layers, list) and all(isinstance(i, int) for i in layers)):
        _refuse(hf_dir, 'mlp_only_layers', layers, 'must be a list of layer indices')
    if not isinstance(hf.get('rope_parameters') or hf.get('rope_scaling') or {}, dict):
        _refuse(hf_dir, 'rope_parameters', hf.get('rope_parameters'), 'must be an object')


LAYER = re.compile(r'^model\.layers\.(\d+)\.')
EXPERT = re.compile(r'\.experts\.(\d+)\.')


def check_counts(hf: dict, names: set, hf_dir: str) -> None:
    """config.json's layer and expert counts against the tensors present, before any list of
    per-layer, per-expert tensors is built: a count edited upward must not cost memory."""
    layers = {int(m.group(1)) for m in map(LAYER.match, names) if m}
    experts = {int(m.group(1)) for m in map(EXPERT.search, names) if m}
    if hf['num_hidden_layers'] != len(layers):
        _refuse(hf_dir, 'num_hidden_layers', hf['num_hidden_layers'],
                f'the weights hold {len(layers)} layers')
    for field in ('num_local_experts', 'num_experts'):
        if hf.get(field) and hf[field] != len(experts):
            _refuse(hf_dir, field, hf[field], f'the weights hold {len(experts)} experts')


def family_of(hf: dict, hf_dir: str) -> str:
    """'mixtral' | 'qwen2_moe' | 'qwen3_moe' from the config's architectures."""
    archs = hf.get('architectures') or [hf.get('model_type', '?')]
    for arch in archs:
        if arch in FAMILIES:
            return FAMILIES[arch]
    raise ConfigError('--from_hf', hf_dir, f'architectures={archs} is not supported; supported: '
                      + ', '.join(FAMILIES))


def _refuse(hf_dir: str, field: str, value, why: str):
    raise ConfigError('--from_hf', hf_dir, f'config.json {field}={value!r}: {why}')


def rope_theta(hf: dict, hf_dir: str) -> float:
    """The rotary base; refuses rope scaling (YaRN, linear, ...), which moejax does not build."""
    params = hf.get('rope_parameters') or hf.get('rope_scaling') or {}
    kind = params.get('rope_type', params.get('type', 'default'))
    if kind != 'default':
        _refuse(hf_dir, 'rope_type', kind, "moejax implements plain rotary positions ('default')")
    if params.get('partial_rotary_factor', hf.get('partial_rotary_factor', 1.0)) != 1.0:
        _refuse(hf_dir, 'partial_rotary_factor', params.get('partial_rotary_factor'),
                'moejax rotates every channel of a head')
    return float(params.get('rope_theta', hf.get('rope_theta', 10_000.0)))


def _check_attention(hf: dict, family: str, hf_dir: str) -> None:
    window = hf.get('sliding_window')
    used = hf.get('use_sliding_window', family == 'mixtral')
    if used and window and window < hf.get('max_position_embeddings', window + 1):
        _refuse(hf_dir, 'sliding_window', window, 'sliding-window attention is not built in '
                'moejax (full causal attention only)')
    if hf.get('hidden_act', 'silu') != 'silu':
        _refuse(hf_dir, 'hidden_act', hf.get('hidden_act'), "moejax's gated FFN is SwiGLU (silu)")
    if family == 'qwen3_moe' and hf.get('attention_bias'):
        _refuse(hf_dir, 'attention_bias', True, 'an output-projection bias is not built in moejax')


def to_moejax(hf: dict, hf_dir: str, base):
    """The moejax config of an HF MoE config; data/opt/train keys (and any key the HF config
    does not set) come from `base`, a full moejax config such as configs/default.py's."""
    family = family_of(hf, hf_dir)
    _check_attention(hf, family, hf_dir)
    cfg = base.copy_and_resolve_references()
    m, e = cfg.model, cfg.moe
    heads = hf['num_attention_heads']
    m.update(d_model=hf['hidden_size'], num_layers=hf['num_hidden_layers'], num_heads=heads,
             num_kv_heads=hf.get('num_key_value_heads') or heads, d_ff=hf['intermediate_size'],
             max_len=hf.get('max_position_embeddings', 4096), activation='swiglu',
             rope_base=rope_theta(hf, hf_dir), norm_eps=float(hf.get('rms_norm_eps', 1e-6)),
             head_dim=hf.get('head_dim') or 0, qk_norm=family == 'qwen3_moe',
             qkv_bias=family == 'qwen2_moe' and hf.get('qkv_bias', True),
             moe_every=1 if family == 'mixtral' else hf.get('decoder_sparse_step', 1),
             dense_layers=list(hf.get('mlp_only_layers') or []),
             dtype='bfloat16' if hf.get('dtype', hf.get('torch_dtype')) in (
                 'bfloat16', 'float16') else 'float32')
    if m.head_dim * heads == m.d_model:
        m.head_dim = 0  # the default: d_model / num_heads
    experts = hf.get('num_local_experts') or hf.get('num_experts')
    if not experts:
        _refuse(hf_dir, 'num_experts', experts, 'not an MoE model (moejax imports MoE models)')
    renorm = family == 'mixtral' or hf.get('norm_topk_prob', False)
    shared = hf.get('shared_expert_intermediate_size', 0) if family == 'qwen2_moe' else 0
    e.update(num_experts=experts, top_k=hf['num_experts_per_tok'], router='top_k',
             gate_norm='renorm' if renorm else 'raw', dispatch='dropless', capacity_factor=0.0,
             eval_capacity_factor=0.0, group_size=0, expert_d_ff=hf.get('moe_intermediate_size', 0),
             num_shared_experts=1 if shared else 0, shared_d_ff=shared, shared_gate=bool(shared),
             aux_loss_weight=float(hf.get('router_aux_loss_coef', 0.0)), aux_loss_norm='tokens',
             z_loss_weight=0.0, jitter=float(hf.get('router_jitter_noise', 0.0)))
    if e.expert_d_ff == m.d_ff:
        e.expert_d_ff = 0
    cfg.data.vocab_size = hf['vocab_size']
    cfg.data.seq_len = min(cfg.data.seq_len, m.max_len)
    return cfg


def _export_refusal(key: str, value, why: str):
    raise ConfigError(key, value, f'cannot be exported to a Hugging Face MoE family: {why}')


def export_family(cfg) -> str:
    """The HF family that computes exactly what this moejax model computes."""
    m, e = cfg.model, cfg.moe
    checks = [('model.activation', m.activation, 'swiglu', 'their FFNs are SwiGLU'),
              ('moe.router', e.router, 'top_k', 'they route by softmax top-k'),
              ('moe.score_fn', e.score_fn, 'softmax', 'they route by softmax top-k'),
              ('moe.num_expert_groups', e.num_expert_groups, 0, 'no group-limited routing'),
              ('moe.routed_scaling_factor', e.routed_scaling_factor, 1.0, 'gates are unscaled'),
              ('moe.balance', e.balance, e.balance if e.balance != 'bias' else 'aux_loss',
               'a selection bias changes routing, and HF has none')]
    for key, value, wanted, why in checks:
        if value != wanted:
            _export_refusal(key, value, why)
    if not m.moe_every:
        _export_refusal('model.moe_every', 0, 'a dense model has no MoE family')
    renorm = e.gate_norm == 'renorm' or (e.gate_norm == 'auto' and e.top_k > 1)
    if m.qk_norm:
        if config_lib.shared_d_ff(cfg) or m.qkv_bias:
            _export_refusal('model.qk_norm', True, 'Qwen3-MoE has no shared expert or qkv bias')
        return 'qwen3_moe'
    if config_lib.shared_d_ff(cfg) or m.qkv_bias or not renorm:
        if e.num_shared_experts and not e.shared_gate:
            _export_refusal('moe.shared_gate', False, "Qwen2-MoE's shared expert is gated")
        if not config_lib.shared_d_ff(cfg):
            key, value = ('model.qkv_bias', True) if m.qkv_bias else ('moe.gate_norm', e.gate_norm)
            _export_refusal(key, value, 'only Qwen2-MoE has q/k/v biases or raw gates without '
                            'QK-norm, and it needs a gated shared expert (moe.num_shared_experts, '
                            'moe.shared_gate); Mixtral renormalises the top-k gates')
        return 'qwen2_moe'
    if m.moe_every != 1 or config_lib.dense_layers(cfg):
        _export_refusal('model.dense_layers', list(config_lib.dense_layers(cfg)),
                        'Mixtral has an MoE FFN in every layer')
    return 'mixtral'


def from_moejax(cfg, tokenizer_ids: dict | None = None) -> dict:
    """The HF config.json of a moejax model (see export_family)."""
    m, e = cfg.model, cfg.moe
    family = export_family(cfg)
    head_dim = config_lib.head_dim(cfg)
    renorm = e.gate_norm == 'renorm' or (e.gate_norm == 'auto' and e.top_k > 1)
    hf = {'architectures': [ARCHITECTURE[family]], 'model_type': family,
          'vocab_size': cfg.data.vocab_size, 'hidden_size': m.d_model,
          'intermediate_size': m.d_ff, 'num_hidden_layers': m.num_layers,
          'num_attention_heads': m.num_heads, 'num_key_value_heads': m.num_kv_heads or m.num_heads,
          'head_dim': head_dim, 'hidden_act': 'silu', 'max_position_embeddings': m.max_len,
          'rms_norm_eps': m.norm_eps, 'tie_word_embeddings': False,
          'rope_parameters': {'rope_type': 'default', 'rope_theta': m.rope_base},
          'num_experts_per_tok': e.top_k, 'router_aux_loss_coef': e.aux_loss_weight,
          'dtype': 'bfloat16' if m.dtype == 'bfloat16' else 'float32',
          'use_sliding_window': False, 'sliding_window': None, 'initializer_range': 0.02}
    if family == 'mixtral':
        hf.update(num_local_experts=e.num_experts, router_jitter_noise=e.jitter)
    else:
        hf.update(num_experts=e.num_experts, moe_intermediate_size=config_lib.expert_d_ff(cfg),
                  norm_topk_prob=renorm, decoder_sparse_step=m.moe_every,
                  mlp_only_layers=list(config_lib.dense_layers(cfg)))
    if family == 'qwen2_moe':
        hf.update(shared_expert_intermediate_size=config_lib.shared_d_ff(cfg),
                  qkv_bias=bool(m.qkv_bias))
    if family == 'qwen3_moe':
        hf['attention_bias'] = False
    hf.update(tokenizer_ids or {})
    return hf


def write_json(out_dir: str, hf: dict) -> None:
    with open(os.path.join(out_dir, 'config.json'), 'w', encoding='utf-8') as f:
        json.dump(hf, f, indent=2, sort_keys=True)
