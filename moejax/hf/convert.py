"""Workdirs from Hugging Face checkpoints and dense runs, and Hugging Face checkpoints from runs.

- `import_hf`: HF config.json + safetensors (+ tokenizer) -> a moejax workdir holding config.json,
  the tokenizer and a checkpoint at step 0 with a fresh optimizer state; `launch/train.py` then
  continues from step 0 like any run.
- `export_hf`: a run's step -> the published layout, loadable by transformers' from_pretrained.
- `upcycle`: a dense run -> an MoE workdir (sparse upcycling, Komatsuzaki et al. 2022): every
  expert a copy of its layer's dense FFN, the router near zero, so the step-0 loss is the dense one.
"""
import os

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from moejax import config as config_lib
from moejax import mesh as mesh_lib
from moejax import validate
from moejax.errors import ConfigError
from moejax.hf import config as hf_config
from moejax.hf import deepseek, staging
from moejax.hf import tensors as tensors_lib
from moejax.hf import tokenizer as hf_tokenizer
from moejax.hf import weights as hf_weights
from moejax.model import transformer as model_lib
from moejax.readers import saved_run
from moejax.run import checkpoint as checkpoint_lib
from moejax.run import state as state_lib

IGNORED_TENSORS = ('rotary_emb.inv_freq',)  # buffers older checkpoints saved; recomputed here
UPCYCLE_ROUTER_STD = 1e-4  # x 1/sqrt(d_model): softmax gates equal to 1e-4, experts still apart


def save_step0(cfg, workdir: str, build_params, build_extra=None) -> int:
    """Write config.json and a step-0 checkpoint: params from build_params(abstract params,
    with shardings), extra state from build_extra (default: zeros; DeepSeek-V3's selection
    biases), a fresh optimizer state. Returns the parameter count."""
    setup = state_lib.make_setup(cfg, mesh_lib.make_mesh(cfg.mesh))
    abstract = setup.abstract_state
    params = build_params(abstract.params)
    with jax.set_mesh(setup.mesh):
        extra = build_extra(abstract.extra) if build_extra else jax.tree.map(
            lambda a: jnp.zeros(a.shape, a.dtype, device=a.sharding), abstract.extra)
        opt_state = jax.jit(setup.tx.init, out_shardings=setup.state_shardings.opt_state)(params)
    rng = jax.random.key_data(jax.random.fold_in(jax.random.key(cfg.train.seed), 1))
    state = state_lib.TrainState(jnp.zeros((), jnp.int32), params, extra, opt_state, rng)
    config_lib.save_json(cfg, workdir)
    checkpointer = checkpoint_lib.Checkpointer(workdir, cfg.train.keep_checkpoints,
                                               async_save=False)
    try:
        checkpointer.save(0, state, {'next_batch': 0})
    finally:
        checkpointer.close()
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params))


def _fill(abstract_params, make):
    """abstract_params (an nnx.State) with each leaf replaced by make(key path, abstract leaf)."""
    pure = nnx.to_pure_dict(abstract_params)
    arrays = jax.tree_util.tree_map_with_path(
        lambda path, a: make(tuple(k.key for k in path), a), pure)
    state = jax.tree.map(lambda x: x, abstract_params)
    nnx.replace_by_pure_dict(state, arrays)
    return state


# ---- import -----------------------------------------------------------------------------------

def import_hf(hf_dir: str, workdir: str, base_cfg, fp8_dtype: str = 'float32') -> dict:
    """HF_DIR -> a new workdir (see the module docstring); refusals are one-line ConfigErrors.

    Everything is checked before anything is written or allocated: the files (hf/tensors.py),
    config.json against the tensors present, every tensor's shape and dtype, the tokenizer's
    size against the vocabulary. The workdir is then built aside and renamed into place."""
    hf = hf_config.read_hf_json(hf_dir)
    family = hf_config.family_of(hf, hf_dir)
    tensors = tensors_lib.Tensors(hf_dir)
    extra_leaves = []
    if family == deepseek.FAMILY:  # MLA, MTP layers, FP8 weights, selection biases
        deepseek.check_counts(hf, tensors.names(), hf_dir)
        cfg = deepseek.to_moejax(hf, hf_dir, base_cfg, tensors.names())
        tensors = deepseek.Tensors(tensors, hf, cfg, fp8_dtype)
    else:
        hf_config.check_counts(hf, tensors.names(), hf_dir)
        cfg = hf_config.to_moejax(hf, hf_dir, base_cfg)
    kind, tokenizer = hf_tokenizer.find_tokenizer(hf_dir, cfg.data.vocab_size)
    cfg.data.tokenizer, cfg.data.tokenizer_path = kind or 'none', None
    validate.check(cfg, jax.device_count())  # before the leaves: their layout needs a valid scan
    if family == deepseek.FAMILY:
        all_leaves = hf_weights.model_layout(deepseek.leaves(cfg), cfg)
        extra_leaves = hf_weights.model_layout(deepseek.bias_leaves(cfg), cfg)
    else:
        all_leaves = hf_weights.leaves(cfg, family)
    if hf.get('tie_word_embeddings') and 'lm_head.weight' not in tensors.names():
        # A tied head is the embedding; moejax's head is its own parameter, so it starts as a copy.
        all_leaves = [leaf._replace(names=np.array('model.embed_tokens.weight', object))
                      if leaf.path == ('head_DV',) else leaf for leaf in all_leaves]
    hf_weights.check_tensors(tensors, all_leaves + extra_leaves)
    _refuse_unknown(tensors, all_leaves + extra_leaves, hf_dir)
    by_path = {leaf.path: leaf for leaf in all_leaves + extra_leaves}

    def streamed(path, a):
        leaf = by_path[path]
        return jax.make_array_from_callback(
            a.shape, a.sharding, lambda index: hf_weights.read_slice(tensors, leaf, a.shape, index))
    with staging.staged(workdir, '--workdir', lock=True) as tmp:
        count = save_step0(cfg, tmp, lambda abstract: _fill(abstract, streamed),
                           (lambda abstract: _fill(abstract, streamed)) if extra_leaves else None)
        hf_tokenizer.import_tokenizer(hf_dir, tmp, tokenizer)
    return {'workdir': workdir, 'family': family, 'params': count, 'step': 0,
            'tokenizer': kind}


def _refuse_unknown(tensors: tensors_lib.Tensors, all_leaves, hf_dir: str) -> None:
    """A tensor no moejax parameter takes means a feature moejax lacks: refuse, naming it."""
    used = {name for leaf in all_leaves for name in leaf.names.flat}
    unknown = sorted(n for n in tensors.names() - used if not n.endswith(IGNORED_TENSORS))
    if unknown and unknown != ['lm_head.weight']:
        raise ConfigError('--from_hf', hf_dir, f'tensor {unknown[0]} has no place in the moejax '
                          f'model ({len(unknown)} such tensors); its config.json describes a '
                          'feature moejax does not build')


# ---- export -----------------------------------------------------------------------------------

def export_hf(workdir: str, out_dir: str, step: int | None = None,
              max_shard_bytes: int = 5 << 30) -> dict:
    """A run's step -> OUT_DIR in the published layout (float32), with its tokenizer (a run
    imported without one exports its weights alone), built aside and renamed into place."""
    staging.check_target(os.path.abspath(out_dir), '--to_hf')  # before the weights are read
    run = saved_run.open_run(workdir, step)
    if run.cfg.model.attention_kind == 'mla':
        family = deepseek.FAMILY
        deepseek.check_export(run.cfg)  # refusals come before anything is written
        params = deepseek.export_state(nnx.to_pure_dict(nnx.state(run.model)), run.cfg)
        all_leaves = (deepseek.leaves(run.cfg) + deepseek.bias_leaves(run.cfg)
                      + deepseek.shared_copies(run.cfg))
    else:
        family = hf_config.export_family(run.cfg)  # refusals come before anything is written
        params = nnx.to_pure_dict(nnx.state(run.model, nnx.Param))
        all_leaves = hf_weights.leaves(run.cfg, family)
    items = []
    for leaf in all_leaves:
        value = _path_value(params, leaf.path)
        for index, name in np.ndenumerate(leaf.names):
            items.append((name, leaf, value, index))
    with staging.staged(out_dir, '--to_hf', lock=False) as tmp:
        files = hf_weights.write_streamed(tmp, items, max_shard_bytes)
        kind = hf_tokenizer.export_tokenizer(workdir, tmp)
        tok = run.tokenizer if kind else None
        ids = {'bos_token_id': tok.bos_id, 'eos_token_id': tok.eos_id,
               'pad_token_id': tok.pad_id} if tok else {}
        hf_config.write_json(tmp, deepseek.from_moejax(run.cfg, ids) if family == deepseek.FAMILY
                             else hf_config.from_moejax(run.cfg, ids))
    return {'out': out_dir, 'family': family, 'step': run.step, 'files': len(files),
            'tokenizer': kind}


def _path_value(tree: dict, path: tuple):
    for key in path:
        tree = tree[key]
    return tree


# ---- upcycle ----------------------------------------------------------------------------------

# Keys an upcycled model may set apart from its dense run: the MoE ones and how it computes.
FREE_KEYS = ('model.moe_every', 'model.dense_layers', 'model.scan_layers', 'model.remat',
             'model.attention', 'model.attention_block', 'model.dtype')


def upcycle(dense_workdir: str, workdir: str, cfg, step: int | None = None) -> dict:
    """A dense run's step -> a new MoE workdir whose step-0 function is the dense model's.

    Each expert copies its layer's dense FFN; the router starts near zero, so the softmax gates
    are ~1/E: raw gates (top-1, or gate_norm='raw') are scaled by E/k (moe.routed_scaling_factor,
    as Megatron-Core's upcycling does) so the experts' weighted sum is the dense FFN again;
    renormalised gates need nothing. Equal losses assume no token is dropped (dropless, or a
    capacity factor <= 0)."""
    saved_run.check_workdir(dense_workdir)
    cfg = cfg.copy_and_resolve_references()
    dense_cfg = saved_run.run_config(dense_workdir)
    if dense_cfg.model.moe_every:  # checked before the dense weights are read
        raise ConfigError('--upcycle_from', dense_workdir, 'is an MoE run (model.moe_every='
                          f'{dense_cfg.model.moe_every}); upcycling makes experts of a dense '
                          "run's FFNs: give a run with model.moe_every=0")
    _check_upcycle(dense_cfg, cfg)
    e = cfg.moe
    if e.gate_norm == 'raw' or (e.gate_norm == 'auto' and e.top_k == 1):
        e.routed_scaling_factor = e.routed_scaling_factor * e.num_experts / e.top_k
    validate.check(cfg, jax.device_count())
    staging.check_target(os.path.abspath(workdir), '--workdir')
    dense = saved_run.open_run(dense_workdir, step, cfg=dense_cfg)
    dense_params = nnx.state(model_lib.unrolled_model(dense.model, dense.cfg), nnx.Param)
    flat = upcycled_params(nnx.to_pure_dict(dense_params), cfg)
    if config_lib.scans_layers(cfg):
        flat = model_lib.scanned_params(flat, cfg)

    def place(abstract):
        pure = nnx.to_pure_dict(abstract)
        arrays = jax.tree.map(lambda a, v: jax.device_put(np.asarray(v, a.dtype), a.sharding),
                              pure, flat)
        return _fill(abstract, lambda path, a: _path_value(arrays, path))
    with staging.staged(workdir, '--workdir', lock=True) as tmp:
        count = save_step0(cfg, tmp, place)
        dense.tokenizer.save(tmp)
    return {'workdir': workdir, 'from': dense_workdir, 'dense_step': dense.step, 'params': count,
            'step': 0, 'routed_scaling_factor': e.routed_scaling_factor}


def _check_upcycle(dense_cfg, cfg) -> None:
    """The MoE config must be the dense run's model with MoE layers: same everything else."""
    flat = lambda c: {f'{g}.{k}': v for g in ('model', 'data') for k, v in c[g].items()}
    dense, moe = flat(dense_cfg), flat(cfg)
    for key in sorted(dense):
        if key.startswith('model.') and key not in FREE_KEYS and dense[key] != moe.get(key):
            raise ConfigError(f'--config.{key}', moe.get(key), f'must equal the dense run\'s '
                              f'{dense[key]!r}: upcycling copies its weights')
    for key in ('data.vocab_size', 'data.tokenizer'):
        if dense[key] != moe[key]:
            raise ConfigError(f'--config.{key}', moe[key], f"must equal the dense run's "
                              f'{dense[key]!r}')
    if not cfg.model.moe_every or cfg.moe.router != 'top_k' or cfg.moe.num_shared_experts:
        raise ConfigError('--config.moe.router', cfg.moe.router, 'upcycling needs MoE layers '
                          '(model.moe_every >= 1), the top_k router and no shared experts')
    if config_lib.expert_d_ff(cfg) != cfg.model.d_ff:
        raise ConfigError('--config.moe.expert_d_ff', cfg.moe.expert_d_ff, 'must be 0 or '
                          f'model.d_ff={cfg.model.d_ff}: experts are copies of the dense FFN')


def upcycled_params(dense: dict, cfg) -> dict:
    """The unrolled MoE model's params: everything copied from the dense run, each MoE layer's
    experts stacked copies of its dense FFN, its router N(0, UPCYCLE_ROUTER_STD^2 / d_model)."""
    out = {k: v for k, v in dense.items() if k != 'blocks'}
    out['blocks'] = {}
    key = jax.random.key(cfg.train.seed)
    E, D = cfg.moe.num_experts, cfg.model.d_model
    for i, block in dense['blocks'].items():
        block = dict(block)
        if model_lib.is_moe_layer(cfg, i):
            ffn = block['ffn']
            router = UPCYCLE_ROUTER_STD / D ** 0.5 * jax.random.normal(
                jax.random.fold_in(key, i), (D, E), jnp.float32)
            experts = {f'{name[:-3]}_E{name[-2:]}': jnp.broadcast_to(w, (E,) + w.shape)
                       for name, w in ffn.items() if w is not None}
            block['ffn'] = dict(experts, router={'w_DE': router})
        out['blocks'][i] = block
    return out
