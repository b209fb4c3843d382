"""DeepSeek-V3 (`DeepseekV3ForCausalLM`, model_type deepseek_v3) <-> moejax: config, tensor
layout, FP8 block-scaled weights and the multi-token prediction layers.

The published layout: layers 0..L-1 (the first `first_k_dense_replace` dense, the rest MoE with
shared experts and a sigmoid group-limited router whose `e_score_correction_bias` is moejax's
selection bias), MLA attention (`q_a_proj`/`q_b_proj` or `q_proj`, `kv_a_proj_with_mqa`,
`kv_b_proj`, `o_proj`), and `num_nextn_predict_layers` MTP layers L.. (`enorm`, `hnorm`,
`eh_proj`, `shared_head.norm`, a decoder layer, and copies of the embedding and head, which
moejax shares: ignored on import, written back on export). Rotary channels are interleaved
pairs (rope_interleave), moejax's are split halves: import permutes those rows, export undoes
it. FP8 checkpoints hold float8_e4m3fn weights with a float32 `weight_scale_inv` per block of
`quantization_config.weight_block_size` (128 x 128): dequantised on import, in float32 or
rounded to bfloat16 (convert --fp8_dtype).
"""
import ml_dtypes
import numpy as np

from moejax import config as config_lib
from moejax.errors import ConfigError
from moejax.hf import config as hf_config
from moejax.hf.weights import Leaf
from moejax.model import transformer as model_lib

FAMILY, ARCHITECTURE = 'deepseek_v3', 'DeepseekV3ForCausalLM'
FP8_DTYPES = ('float32', 'bfloat16')
FFN = {'w_gate': 'gate_proj', 'w_in': 'up_proj', 'w_out': 'down_proj'}


def _refuse(hf_dir: str, field: str, value, why: str):
    raise ConfigError('--from_hf', hf_dir, f'config.json {field}={value!r}: {why}')


def _rope(hf: dict, hf_dir: str) -> dict:
    """moejax's rope keys from rope_parameters (or rope_scaling): default or YaRN."""
    p = hf.get('rope_parameters') or hf.get('rope_scaling') or {}
    kind = p.get('rope_type', p.get('type', 'default'))
    base = float(p.get('rope_theta', hf.get('rope_theta', 10_000.0)))
    if kind == 'default':
        return {'rope_base': base, 'rope_scaling': 'none'}
    if kind != 'yarn':
        _refuse(hf_dir, 'rope_type', kind, "moejax builds 'default' and 'yarn' rotary positions")
    orig = p.get('original_max_position_embeddings') or 4096
    factor = p.get('factor') or hf.get('max_position_embeddings', orig) / orig
    return {'rope_base': base, 'rope_scaling': 'yarn', 'rope_factor': float(factor),
            'rope_original_max_len': int(orig), 'rope_beta_fast': float(p.get('beta_fast') or 32),
            'rope_beta_slow': float(p.get('beta_slow') or 1),
            'rope_mscale': float(p.get('mscale') or 0.0),
            'rope_mscale_all_dim': float(p.get('mscale_all_dim') or 0.0)}


def mtp_layers_present(hf: dict, names) -> int:
    """How many MTP layers (num_nextn_predict_layers) the checkpoint really holds."""
    L = hf['num_hidden_layers']
    return sum(any(n.startswith(f'model.layers.{L + k}.') for n in names)
               for k in range(hf.get('num_nextn_predict_layers') or 0))


SIZES = ('kv_lora_rank', 'qk_nope_head_dim', 'qk_rope_head_dim', 'v_head_dim', 'n_routed_experts',
         'moe_intermediate_size')
OPTIONAL_COUNTS = ('q_lora_rank', 'first_k_dense_replace', 'n_shared_experts', 'n_group',
                   'topk_group', 'num_nextn_predict_layers')


def _check_sizes(hf: dict, hf_dir: str) -> None:
    """DeepSeek-V3's own config.json fields: integers of the kind each must be."""
    is_int = lambda v: isinstance(v, int) and not isinstance(v, bool) and v < hf_config.MAX_SIZE
    for name in SIZES:
        if not (is_int(hf.get(name)) and hf[name] >= 1):
            _refuse(hf_dir, name, hf.get(name), 'must be a positive integer')
    for name in OPTIONAL_COUNTS:
        if hf.get(name) is not None and not (is_int(hf[name]) and hf[name] >= 0):
            _refuse(hf_dir, name, hf[name], 'must be an integer >= 0 (or null)')


def to_moejax(hf: dict, hf_dir: str, base, names):
    """The moejax config of a DeepSeek-V3 config.json (data/opt/train from `base`)."""
    _check_sizes(hf, hf_dir)
    checks = [('hidden_act', 'silu'), ('attention_bias', False), ('scoring_func', 'sigmoid'),
              ('topk_method', 'noaux_tc')]
    for field, wanted in checks:
        if hf.get(field, wanted) != wanted:
            _refuse(hf_dir, field, hf.get(field), f'moejax builds DeepSeek-V3 with {wanted!r}')
    heads = hf['num_attention_heads']
    if hf.get('num_key_value_heads', heads) != heads:
        _refuse(hf_dir, 'num_key_value_heads', hf['num_key_value_heads'], 'MLA expands the '
                f'latent for every head: must equal num_attention_heads={heads}')
    cfg = base.copy_and_resolve_references()
    m, e = cfg.model, cfg.moe
    m.update(d_model=hf['hidden_size'], num_layers=hf['num_hidden_layers'], num_heads=heads,
             num_kv_heads=0, head_dim=0, d_ff=hf['intermediate_size'], activation='swiglu',
             max_len=hf.get('max_position_embeddings', 4096), qk_norm=False, qkv_bias=False,
             norm_eps=float(hf.get('rms_norm_eps', 1e-6)), moe_every=1,
             # the base's choice when it makes one (the dense prefix stays unrolled), else
             # unrolled, as DeepSeek imports were before scanning took a prefix
             scan_layers=bool(base.model.scan_layers),
             dense_layers=list(range(hf.get('first_k_dense_replace', 0))),
             dtype='bfloat16' if hf.get('dtype', hf.get('torch_dtype')) in (
                 'bfloat16', 'float16') else 'float32',
             attention_kind='mla', q_lora_rank=hf.get('q_lora_rank') or 0,
             kv_lora_rank=hf['kv_lora_rank'], qk_nope_head_dim=hf['qk_nope_head_dim'],
             qk_rope_head_dim=hf['qk_rope_head_dim'], v_head_dim=hf['v_head_dim'],
             mtp_depth=mtp_layers_present(hf, names), **_rope(hf, hf_dir))
    groups = hf.get('n_group') or 1
    e.update(num_experts=hf['n_routed_experts'], top_k=hf['num_experts_per_tok'], router='top_k',
             score_fn='sigmoid', gate_norm='renorm' if hf.get('norm_topk_prob', True) else 'raw',
             routed_scaling_factor=float(hf.get('routed_scaling_factor', 1.0)),
             num_expert_groups=groups if groups > 1 else 0,
             top_expert_groups=(hf.get('topk_group') or groups) if groups > 1 else 0,
             dispatch='dropless', capacity_factor=0.0, eval_capacity_factor=0.0, group_size=0,
             expert_d_ff=hf['moe_intermediate_size'],
             num_shared_experts=hf.get('n_shared_experts') or 0, shared_d_ff=0,
             shared_gate=False, balance='bias', aux_loss_weight=0.0, z_loss_weight=0.0,
             jitter=0.0, seq_aux_loss_weight=1e-4)  # DeepSeek-V3's training balance
    cfg.data.vocab_size = hf['vocab_size']
    cfg.data.seq_len = min(cfg.data.seq_len, m.max_len)
    return cfg


def check_counts(hf: dict, names, hf_dir: str) -> None:
    """Layers 0..L-1 (+ MTP layers) and n_routed_experts, against the tensors present."""
    layers = {int(m.group(1)) for m in map(hf_config.LAYER.match, names) if m}
    main = hf['num_hidden_layers'] + mtp_layers_present(hf, names)
    if layers != set(range(main)):
        _refuse(hf_dir, 'num_hidden_layers', hf['num_hidden_layers'], f'the weights hold '
                f'layers {sorted(layers)[:4]}... ({len(layers)}), with num_nextn_predict_layers='
                f'{hf.get("num_nextn_predict_layers")}')
    experts = {int(m.group(1)) for m in map(hf_config.EXPERT.search, names) if m}
    if experts and len(experts) != hf.get('n_routed_experts'):
        _refuse(hf_dir, 'n_routed_experts', hf.get('n_routed_experts'),
                f'the weights hold {len(experts)} experts')


# ---- tensor layout ----------------------------------------------------------------------------

def _leaf(path: tuple, name: str, hf_shape: tuple, transpose: bool = False) -> Leaf:
    return Leaf(path, np.array(name, dtype=object), tuple(hf_shape), transpose)


def _ffn(path: tuple, prefix: str, D: int, F: int) -> list[Leaf]:
    return [_leaf(path + ('w_gate_DF',), f'{prefix}.gate_proj.weight', (F, D), True),
            _leaf(path + ('w_in_DF',), f'{prefix}.up_proj.weight', (F, D), True),
            _leaf(path + ('w_out_FD',), f'{prefix}.down_proj.weight', (D, F), True)]


def _mla(cfg, at: tuple, p: str) -> list[Leaf]:
    m = cfg.model
    D, H, Q, C = m.d_model, m.num_heads, m.q_lora_rank, m.kv_lora_rank
    K, R, U = m.qk_nope_head_dim + m.qk_rope_head_dim, m.qk_rope_head_dim, m.v_head_dim
    a = at + ('attn',)
    out = ([_leaf(a + ('wq_a_DQ',), p + 'q_a_proj.weight', (Q, D), True),
            _leaf(a + ('q_norm', 'scale'), p + 'q_a_layernorm.weight', (Q,)),
            _leaf(a + ('wq_b_QHK',), p + 'q_b_proj.weight', (H * K, Q), True)] if Q else
           [_leaf(a + ('wq_DHK',), p + 'q_proj.weight', (H * K, D), True)])
    return out + [
        _leaf(a + ('wkv_a_DM',), p + 'kv_a_proj_with_mqa.weight', (C + R, D), True),
        _leaf(a + ('kv_norm', 'scale'), p + 'kv_a_layernorm.weight', (C,)),
        _leaf(a + ('wkv_b_CHZ',), p + 'kv_b_proj.weight', (H * (m.qk_nope_head_dim + U), C), True),
        _leaf(a + ('wo_HUD',), p + 'o_proj.weight', (D, H * U), True)]


def _block(cfg, at: tuple, layer: int) -> list[Leaf]:
    """One decoder layer's parameters (at: its path in the moejax state)."""
    m = cfg.model
    D, E, F = m.d_model, cfg.moe.num_experts, config_lib.expert_d_ff(cfg)
    p = f'model.layers.{layer}.'
    out = [_leaf(at + ('attn_norm', 'scale'), p + 'input_layernorm.weight', (D,)),
           _leaf(at + ('ffn_norm', 'scale'), p + 'post_attention_layernorm.weight', (D,))]
    out += _mla(cfg, at, p + 'self_attn.')
    ffn = at + ('ffn',)
    if not model_lib.is_moe_layer(cfg, layer):
        return out + _ffn(ffn, p + 'mlp', D, m.d_ff)
    each = lambda w: np.array([f'{p}mlp.experts.{e}.{FFN[w]}.weight' for e in range(E)], object)
    out += [_leaf(ffn + ('router', 'w_DE'), p + 'mlp.gate.weight', (E, D), True),
            Leaf(ffn + ('w_gate_EDF',), each('w_gate'), (F, D), True),
            Leaf(ffn + ('w_in_EDF',), each('w_in'), (F, D), True),
            Leaf(ffn + ('w_out_EFD',), each('w_out'), (D, F), True)]
    shared = config_lib.shared_d_ff(cfg)
    return out + (_ffn(ffn + ('shared',), p + 'mlp.shared_experts', D, shared) if shared else [])


def leaves(cfg) -> list[Leaf]:
    """Every parameter of the unrolled model (MTP modules included) in the published names
    (hf.weights.model_layout puts them in a scanned model's layout)."""
    m = cfg.model
    D, V, L = m.d_model, cfg.data.vocab_size, m.num_layers
    out = [_leaf(('embed', 'table_VD'), 'model.embed_tokens.weight', (V, D)),
           _leaf(('final_norm', 'scale'), 'model.norm.weight', (D,)),
           _leaf(('head_DV',), 'lm_head.weight', (V, D), True)]
    for i in range(L):
        out += _block(cfg, ('blocks', i), i)
    for k in range(m.mtp_depth):
        p, at = f'model.layers.{L + k}.', ('mtp', k)
        out += [_leaf(at + ('emb_norm', 'scale'), p + 'enorm.weight', (D,)),
                _leaf(at + ('hidden_norm', 'scale'), p + 'hnorm.weight', (D,)),
                _leaf(at + ('proj_XD',), p + 'eh_proj.weight', (D, 2 * D), True),
                _leaf(at + ('out_norm', 'scale'), p + 'shared_head.norm.weight', (D,))]
        out += _block(cfg, at + ('block',), L + k)
    return out


def bias_leaves(cfg) -> list[Leaf]:
    """The routers' selection biases (model state, not parameters): e_score_correction_bias."""
    L, E = cfg.model.num_layers, cfg.moe.num_experts
    at = [(('blocks', i), i) for i in range(L)] + [
        (('mtp', k, 'block'), L + k) for k in range(cfg.model.mtp_depth)]
    return [_leaf(path + ('ffn', 'router', 'expert_bias'),
                  f'model.layers.{layer}.mlp.gate.e_score_correction_bias', (E,))
            for path, layer in at if model_lib.is_moe_layer(cfg, layer)]


def shared_copies(cfg) -> list[Leaf]:
    """The MTP layers' copies of the embedding and head (export writes them; import skips)."""
    m, L = cfg.model, cfg.model.num_layers
    V, D = cfg.data.vocab_size, m.d_model
    return [leaf for k in range(m.mtp_depth) for leaf in (
        _leaf(('embed', 'table_VD'), f'model.layers.{L + k}.embed_tokens.weight', (V, D)),
        _leaf(('head_DV',), f'model.layers.{L + k}.shared_head.head.weight', (V, D), True))]


def rope_rows(name: str, hf_shape: tuple, cfg) -> np.ndarray | None:
    """Row order taking a torch weight's interleaved rotary rows to moejax's split halves
    (rows[i] = the HF row that becomes row i); None for tensors without rotary rows."""
    m = cfg.model
    N, R, C = m.qk_nope_head_dim, m.qk_rope_head_dim, m.kv_lora_rank
    pairs = np.concatenate([np.arange(0, R, 2), np.arange(1, R, 2)])
    if name.endswith(('q_b_proj.weight', 'self_attn.q_proj.weight')):
        per_head = np.concatenate([np.arange(N), N + pairs])
        heads = hf_shape[0] // (N + R)
        return (np.arange(heads)[:, None] * (N + R) + per_head).reshape(-1)
    if name.endswith('kv_a_proj_with_mqa.weight'):
        return np.concatenate([np.arange(C), C + pairs])
    return None


# ---- reading: FP8 dequantisation and rotary rows ----------------------------------------------

class Tensors:
    """A checkpoint's tensors as the moejax import reads them: FP8 weights dequantised with their
    `weight_scale_inv` blocks (and the scales themselves hidden), the MTP layers' copies of the
    embedding and head hidden, rotary rows in moejax's order. Same interface as hf/tensors.py's."""

    def __init__(self, tensors, hf: dict, cfg, fp8_dtype: str = 'float32'):
        if fp8_dtype not in FP8_DTYPES:
            raise ConfigError('--fp8_dtype', fp8_dtype, 'allowed: ' + ', '.join(FP8_DTYPES))
        self.hf_dir, self._tensors, self._cfg = tensors.hf_dir, tensors, cfg
        self._fp8_dtype = fp8_dtype
        quant = hf.get('quantization_config') or {}
        self._block = tuple(quant.get('weight_block_size') or (128, 128))
        names = tensors.names()
        self._scaled = {n[:-len('_scale_inv')] for n in names if n.endswith('.weight_scale_inv')}
        copies = {n for leaf in shared_copies(cfg) for n in leaf.names.flat}
        self._names = {n for n in names if not n.endswith('_scale_inv') and n not in copies}
        self._interleaved = hf.get('rope_interleave', True)

    def names(self) -> set[str]:
        return set(self._names)

    def shape(self, key: str) -> tuple:
        return self._tensors.shape(key)

    def dtype(self, key: str) -> str:
        return 'F32' if key in self._scaled else self._tensors.dtype(key)

    def get(self, key: str) -> np.ndarray:
        w = self._dequantised(key) if key in self._scaled else self._tensors.get(key)
        rows = rope_rows(key, w.shape, self._cfg) if self._interleaved else None
        return w if rows is None else np.asarray(w)[rows]

    def _dequantised(self, key: str) -> np.ndarray:
        """weight (float8) x its block's scale_inv, in float32 (or rounded to bfloat16)."""
        w = self._tensors.get(key)
        scale = np.asarray(self._tensors.get(key + '_scale_inv'), np.float32)
        (b0, b1), (rows, cols) = self._block, w.shape
        if scale.shape != (-(-rows // b0), -(-cols // b1)):
            raise ConfigError('--from_hf', self.hf_dir, f'tensor {key}_scale_inv has shape '
                              f'{list(scale.shape)}; {list(w.shape)} in blocks of {b0}x{b1} '
                              f'needs {[-(-rows // b0), -(-cols // b1)]}')
        full = np.repeat(np.repeat(scale, b0, axis=0), b1, axis=1)[:rows, :cols]
        out = np.asarray(w).astype(np.float32) * full
        if self._fp8_dtype == 'bfloat16':
            out = out.astype(ml_dtypes.bfloat16).astype(np.float32)
        return out


# ---- export -----------------------------------------------------------------------------------

def check_export(cfg) -> None:
    """The moejax models DeepSeek-V3's layout expresses: MLA, SwiGLU, sigmoid top-k routing with
    renormalised (or raw) gates, unscaled shared experts, every layer after the dense ones MoE."""
    m, e = cfg.model, cfg.moe
    checks = [('model.activation', m.activation, 'swiglu'), ('moe.router', e.router, 'top_k'),
              ('moe.score_fn', e.score_fn, 'sigmoid'), ('model.moe_every', m.moe_every, 1),
              ('moe.shared_gate', e.shared_gate, False), ('model.qk_norm', m.qk_norm, False)]
    for key, value, wanted in checks:
        if value != wanted:
            raise ConfigError(key, value, f'cannot be exported as DeepSeek-V3: it needs {wanted!r}')
    dense = list(config_lib.dense_layers(cfg))
    if dense != list(range(len(dense))):
        raise ConfigError('model.dense_layers', dense, 'DeepSeek-V3 keeps the first k layers '
                          'dense (first_k_dense_replace): must be [0, 1, ..., k-1]')
    if e.num_shared_experts and config_lib.shared_d_ff(cfg) != (
            e.num_shared_experts * config_lib.expert_d_ff(cfg)):
        raise ConfigError('moe.shared_d_ff', e.shared_d_ff, 'DeepSeek-V3 shared experts are '
                          'n_shared_experts x moe_intermediate_size wide: leave it 0')


def from_moejax(cfg, tokenizer_ids: dict | None = None) -> dict:
    """The config.json of a moejax MLA model (see check_export)."""
    check_export(cfg)
    m, e = cfg.model, cfg.moe
    rope = {'rope_type': 'default', 'rope_theta': m.rope_base}
    if m.rope_scaling == 'yarn':
        rope.update(rope_type='yarn', factor=m.rope_factor, beta_fast=m.rope_beta_fast,
                    original_max_position_embeddings=m.rope_original_max_len,
                    beta_slow=m.rope_beta_slow, mscale=m.rope_mscale,
                    mscale_all_dim=m.rope_mscale_all_dim)
    hf = {'architectures': [ARCHITECTURE], 'model_type': FAMILY, 'vocab_size': cfg.data.vocab_size,
          'hidden_size': m.d_model, 'intermediate_size': m.d_ff,
          'moe_intermediate_size': config_lib.expert_d_ff(cfg), 'num_hidden_layers': m.num_layers,
          'num_attention_heads': m.num_heads, 'num_key_value_heads': m.num_heads,
          'n_shared_experts': e.num_shared_experts, 'n_routed_experts': e.num_experts,
          'num_experts_per_tok': e.top_k, 'routed_scaling_factor': e.routed_scaling_factor,
          'n_group': e.num_expert_groups or 1, 'topk_group': e.top_expert_groups or 1,
          'norm_topk_prob': e.gate_norm == 'renorm' or (e.gate_norm == 'auto' and e.top_k > 1),
          'first_k_dense_replace': len(config_lib.dense_layers(cfg)),
          'q_lora_rank': m.q_lora_rank or None, 'kv_lora_rank': m.kv_lora_rank,
          'qk_nope_head_dim': m.qk_nope_head_dim, 'qk_rope_head_dim': m.qk_rope_head_dim,
          'v_head_dim': m.v_head_dim, 'hidden_act': 'silu', 'max_position_embeddings': m.max_len,
          'rms_norm_eps': m.norm_eps, 'tie_word_embeddings': False, 'rope_parameters': rope,
          'rope_interleave': True, 'attention_bias': False, 'scoring_func': 'sigmoid',
          'topk_method': 'noaux_tc', 'num_nextn_predict_layers': m.mtp_depth,
          'dtype': 'bfloat16' if m.dtype == 'bfloat16' else 'float32',
          'initializer_range': 0.02}
    hf.update(tokenizer_ids or {})
    return hf


def export_state(state: dict, cfg) -> dict:
    """A moejax state (params and biases, pure dict) with rotary channels interleaved again, in
    the unrolled layout export names; the inverse of Tensors.get's row order."""
    state = model_lib.unrolled_params(state, cfg) if config_lib.scans_layers(cfg) else state
    m = cfg.model
    N, R, C = m.qk_nope_head_dim, m.qk_rope_head_dim, m.kv_lora_rank
    back = np.argsort(np.concatenate([np.arange(0, R, 2), np.arange(1, R, 2)]))

    def fix(attn: dict) -> dict:
        attn = dict(attn)
        q = 'wq_b_QHK' if 'wq_b_QHK' in attn else 'wq_DHK'
        w = np.asarray(attn[q])
        attn[q] = np.concatenate([w[..., :N], w[..., N:][..., back]], axis=-1)
        kv = np.asarray(attn['wkv_a_DM'])
        attn['wkv_a_DM'] = np.concatenate([kv[:, :C], kv[:, C:][:, back]], axis=1)
        return attn
    out = dict(state)
    out['blocks'] = {i: dict(b, attn=fix(b['attn'])) for i, b in state['blocks'].items()}
    if 'mtp' in state:
        out['mtp'] = {k: dict(mod, block=dict(mod['block'], attn=fix(mod['block']['attn'])))
                      for k, mod in state['mtp'].items()}
    return out
