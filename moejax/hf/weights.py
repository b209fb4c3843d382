"""The published Hugging Face tensor layout <-> moejax parameters, read and written as safetensors.

Published checkpoints (and `save_pretrained`) hold one tensor per expert, torch Linear weights as
[out, in]: e.g. `model.layers.0.block_sparse_moe.experts.3.w1.weight` (Mixtral) or
`model.layers.0.mlp.experts.3.gate_proj.weight` (Qwen). moejax stacks experts (and, when layers are
scanned, layers) on leading axes and stores weights as [in, out]. A `Leaf` names, for one moejax
parameter, the HF tensor behind each of its leading indices; reading fills any slice of the
parameter from just the tensors that slice needs, so an import streams shard by shard straight
into the parameters' device shardings (jax.make_array_from_callback) and never holds a model twice.
"""
import json
import os
import re
from typing import NamedTuple

import jax
import numpy as np
from safetensors import SafetensorError
from safetensors.numpy import save_file

from moejax import config as config_lib
from moejax.errors import ConfigError
from moejax.hf.tensors import Tensors, check_dtype
from moejax.model import transformer as model_lib

# moejax expert weight -> each family's per-expert tensor (MoE block prefix, weight names)
EXPERT_NAMES = {
    'mixtral': ('block_sparse_moe', {'w_gate': 'w1', 'w_in': 'w3', 'w_out': 'w2'}),
    'qwen2_moe': ('mlp', {'w_gate': 'gate_proj', 'w_in': 'up_proj', 'w_out': 'down_proj'}),
    'qwen3_moe': ('mlp', {'w_gate': 'gate_proj', 'w_in': 'up_proj', 'w_out': 'down_proj'}),
}
FFN_NAMES = {'w_gate': 'gate_proj', 'w_in': 'up_proj', 'w_out': 'down_proj'}


class Leaf(NamedTuple):
    """One moejax parameter: its key path in the model's pure state dict, the HF tensor name at
    each of its leading indices (names.shape = those axes), each tensor's HF shape, and whether
    the tensor is a torch Linear weight ([out, in]: transposed)."""
    path: tuple
    names: np.ndarray
    hf_shape: tuple
    transpose: bool


def to_moejax(leaf: Leaf, tensor: np.ndarray, shape: tuple) -> np.ndarray:
    """One HF tensor as the moejax parameter's slice at one leading index (float32)."""
    tensor = np.asarray(tensor, np.float32)
    return (tensor.T if leaf.transpose else tensor).reshape(shape)


def to_hf(leaf: Leaf, value: np.ndarray) -> np.ndarray:
    """The inverse of to_moejax: one leading index of a moejax parameter as the HF tensor."""
    if leaf.transpose:
        return np.ascontiguousarray(value.reshape(leaf.hf_shape[::-1]).T)
    return value.reshape(leaf.hf_shape)


def _one(path, name, hf_shape, transpose=False) -> Leaf:
    return Leaf(path, np.array(name, dtype=object), tuple(hf_shape), transpose)


def _attention(cfg, i: int) -> list[Leaf]:
    m = cfg.model
    D, H, K = m.d_model, m.num_heads, config_lib.head_dim(cfg)
    KV = m.num_kv_heads or H
    p, at = f'model.layers.{i}.self_attn.', ('blocks', i, 'attn')
    out = [_one(at + ('wq_DHK',), p + 'q_proj.weight', (H * K, D), True),
           _one(at + ('wk_DHK',), p + 'k_proj.weight', (KV * K, D), True),
           _one(at + ('wv_DHK',), p + 'v_proj.weight', (KV * K, D), True),
           _one(at + ('wo_HKD',), p + 'o_proj.weight', (D, H * K), True)]
    if m.qkv_bias:
        out += [_one(at + ('bq_HK',), p + 'q_proj.bias', (H * K,)),
                _one(at + ('bk_HK',), p + 'k_proj.bias', (KV * K,)),
                _one(at + ('bv_HK',), p + 'v_proj.bias', (KV * K,))]
    if m.qk_norm:
        out += [_one(at + ('q_norm', 'scale'), p + 'q_norm.weight', (K,)),
                _one(at + ('k_norm', 'scale'), p + 'k_norm.weight', (K,))]
    return out


def _ffn(path: tuple, prefix: str, D: int, F: int, names=FFN_NAMES) -> list[Leaf]:
    """A SwiGLU FFN's three weights (dense MLP or shared expert)."""
    return [_one(path + ('w_gate_DF',), f'{prefix}.{names["w_gate"]}.weight', (F, D), True),
            _one(path + ('w_in_DF',), f'{prefix}.{names["w_in"]}.weight', (F, D), True),
            _one(path + ('w_out_FD',), f'{prefix}.{names["w_out"]}.weight', (D, F), True)]


def _moe(cfg, family: str, i: int) -> list[Leaf]:
    D, E, F = cfg.model.d_model, cfg.moe.num_experts, config_lib.expert_d_ff(cfg)
    block, names = EXPERT_NAMES[family]
    p, ffn = f'model.layers.{i}.{block}', ('blocks', i, 'ffn')
    each = lambda w: np.array([f'{p}.experts.{e}.{names[w]}.weight' for e in range(E)], object)
    out = [_one(ffn + ('router', 'w_DE'), f'{p}.gate.weight', (E, D), True),
           Leaf(ffn + ('w_gate_EDF',), each('w_gate'), (F, D), True),
           Leaf(ffn + ('w_in_EDF',), each('w_in'), (F, D), True),
           Leaf(ffn + ('w_out_EFD',), each('w_out'), (D, F), True)]
    shared = config_lib.shared_d_ff(cfg)
    if shared:
        out += _ffn(ffn + ('shared',), f'{p}.shared_expert', D, shared)
        out.append(_one(ffn + ('shared_gate_D1',), f'{p}.shared_expert_gate.weight', (1, D),
                        True))
    return out


def unrolled_leaves(cfg, family: str) -> list[Leaf]:
    """Every parameter of the unrolled model (blocks[i]), in the family's HF names."""
    m = cfg.model
    D, V = m.d_model, cfg.data.vocab_size
    out = [_one(('embed', 'table_VD'), 'model.embed_tokens.weight', (V, D)),
           _one(('final_norm', 'scale'), 'model.norm.weight', (D,)),
           _one(('head_DV',), 'lm_head.weight', (V, D), True)]
    for i in range(m.num_layers):
        p = f'model.layers.{i}.'
        out += [_one(('blocks', i, 'attn_norm', 'scale'), p + 'input_layernorm.weight', (D,)),
                _one(('blocks', i, 'ffn_norm', 'scale'), p + 'post_attention_layernorm.weight',
                     (D,))]
        out += _attention(cfg, i)
        if model_lib.is_moe_layer(cfg, i):
            out += _moe(cfg, family, i)
        else:
            out += _ffn(('blocks', i, 'ffn'), p + 'mlp', D, m.d_ff)
    return out


def leaves(cfg, family: str) -> list[Leaf]:
    """The leaves in the model's own layout (see model_layout)."""
    return model_layout(unrolled_leaves(cfg, family), cfg)


def model_layout(flat: list[Leaf], cfg) -> list[Leaf]:
    """Unrolled leaves (blocks[i]) in the model's own layout: as they are, or (model.scan_layers)
    with the dense prefix's layer i as prefix/i and layer prefix + p * period + j stacked as
    stack/blocks/j at leading index p."""
    if not config_lib.scans_layers(cfg):
        return flat
    first, n, periods = config_lib.scan_layout(cfg)
    in_prefix = lambda leaf: leaf.path[0] == 'blocks' and leaf.path[1] < first
    out = [leaf._replace(path=('prefix',) + leaf.path[1:]) if in_prefix(leaf) else leaf
           for leaf in flat if leaf.path[0] != 'blocks' or in_prefix(leaf)]
    by_path = {leaf.path: leaf for leaf in flat}
    for j in range(n):
        for leaf in flat:
            if leaf.path[:2] != ('blocks', first + j):
                continue
            layers = [by_path[('blocks', first + p * n + j) + leaf.path[2:]]
                      for p in range(periods)]
            out.append(leaf._replace(path=('stack', 'blocks', j) + leaf.path[2:],
                                     names=np.stack([x.names for x in layers])))
    return out


def check_tensors(tensors: Tensors, all_leaves: list[Leaf]) -> None:
    """Every tensor present, floating point, with the shape the config implies; else one line
    naming the tensor."""
    for leaf in all_leaves:
        for name in leaf.names.flat:
            check_dtype(tensors, name)
            shape = tensors.shape(name)
            if shape != leaf.hf_shape:
                raise ConfigError('--from_hf', tensors.hf_dir, f'tensor {name} has shape '
                                  f'{list(shape)}, config.json implies {list(leaf.hf_shape)}')


def read_slice(tensors: Tensors, leaf: Leaf, shape: tuple, index: tuple) -> np.ndarray:
    """The moejax parameter's values at `index` (a tuple of slices, one per axis), read from
    only the HF tensors of the leading indices it covers."""
    lead = leaf.names.ndim
    names = np.asarray(leaf.names[index[:lead]], object)  # 0-d: one tensor
    inner, rest = shape[lead:], index[lead:]
    parts = [to_moejax(leaf, tensors.get(name), inner)[rest] for name in names.flat]
    return np.stack(parts).reshape(names.shape + parts[0].shape) if lead else parts[0]


def shard_plan(sizes: dict[str, int], max_bytes: int) -> list[list[str]]:
    """Tensor names in order, cut into files of at most max_bytes (a bigger tensor alone)."""
    files, current, used = [], [], 0
    for name, size in sizes.items():
        if current and used + size > max_bytes:
            files.append(current)
            current, used = [], 0
        current.append(name)
        used += size
    return files + ([current] if current else [])


def _save(tensors: dict, path: str, metadata: dict) -> None:
    """safetensors' save_file, its I/O failures (a full disk) raised as the OSErrors they are."""
    try:
        save_file(tensors, path, metadata=metadata)
    except SafetensorError as err:
        code = re.search(r'os error (\d+)', str(err))
        if code is None:
            raise
        raise OSError(int(code.group(1)), os.strerror(int(code.group(1))), path) from None


def write_streamed(out_dir: str, items: list, max_bytes: int) -> list[str]:
    """save_pretrained's layout from (HF name, leaf, moejax parameter, leading index) items:
    model.safetensors, or model-0000i-of-0000n.safetensors shards and model.safetensors.index.json
    when they exceed max_bytes. Each parameter is fetched from its devices once, for the file that
    needs it, so the host holds about one file at a time. Returns the files written."""
    size = lambda leaf: int(np.prod(leaf.hf_shape)) * 4  # float32
    plan = shard_plan({name: size(leaf) for name, leaf, _, _ in items}, max_bytes)
    by_name = {name: (leaf, value, index) for name, leaf, value, index in items}
    meta = {'format': 'pt'}  # what transformers expects of a torch checkpoint
    files, weight_map, host = [], {}, {}
    for i, names in enumerate(plan):
        tensors = {}
        for name in names:
            leaf, value, index = by_name[name]
            if leaf.path not in host:
                host = {leaf.path: np.asarray(jax.device_get(value), np.float32)}
            tensors[name] = to_hf(leaf, host[leaf.path][index])
        file = ('model.safetensors' if len(plan) == 1
                else f'model-{i + 1:05d}-of-{len(plan):05d}.safetensors')
        _save(tensors, os.path.join(out_dir, file), meta)
        weight_map.update({k: file for k in names})
        files.append(file)
    if len(plan) > 1:
        index = {'metadata': {'total_size': sum(size(leaf) for _, leaf, _, _ in items)},
                 'weight_map': weight_map}
        with open(os.path.join(out_dir, 'model.safetensors.index.json'), 'w') as f:
            json.dump(index, f, indent=2, sort_keys=True)
        files.append('model.safetensors.index.json')
    return files
