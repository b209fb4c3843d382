"""The decoder-only MoE language model, and its parameter and FLOP counts."""
import jax
import jax.numpy as jnp
from flax import nnx

from moejax import config as config_lib
from moejax import sharding
from moejax.model import layers, mla, mtp
from moejax.model.counts import flops_per_token, is_moe_layer, param_counts  # noqa: F401
from moejax.moe import experts
from moejax.moe.block import MoEBlock

DTYPES = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16}
ATTENTION_KINDS = ('mha', 'mla')  # model.attention_kind: standard (GQA) or latent attention




class Block(nnx.Module):
    """Pre-norm residual block: attention, then a dense or MoE FFN."""

    def __init__(self, cfg, use_moe: bool, *, rngs: nnx.Rngs):
        m = cfg.model
        eps = m.norm_eps
        self.attn_norm = layers.RMSNorm(m.d_model, eps)
        if m.attention_kind == 'mla':
            self.attn = mla.MLA(cfg, rngs=rngs)
        else:
            self.attn = layers.Attention(
                m.d_model, m.num_heads, m.num_kv_heads or m.num_heads, m.rope_base,
                implementation=m.attention, block=m.attention_block,
                head_dim=m.head_dim, qkv_bias=m.qkv_bias,
                qk_norm=m.qk_norm, norm_eps=eps, rngs=rngs)
        self.ffn_norm = layers.RMSNorm(m.d_model, eps)
        self.ffn = (MoEBlock(cfg, rngs=rngs) if use_moe
                    else experts.MLP(m.d_model, m.d_ff, m.activation, rngs=rngs))

    def __call__(self, x_BTD, segment_ids_BT, positions_BT, *, train, rng):
        x_BTD = x_BTD + self.attn(self.attn_norm(x_BTD), segment_ids_BT, positions_BT)
        h_BTD = self.ffn_norm(x_BTD)
        if isinstance(self.ffn, MoEBlock):
            y_BTD, stats = self.ffn(h_BTD, segment_ids_BT, train=train, rng=rng)
        else:
            y_BTD, stats = self.ffn(h_BTD), None
        x_BTD = sharding.constrain(x_BTD + y_BTD, ('batch', 'length', 'act_embed'))
        return x_BTD, stats

    def extend(self, x_BTD, cache: layers.KVCache, start):
        """The block on T new tokens with a KV cache (see Transformer.extend)."""
        a_BTD, cache = self.attn.cached(self.attn_norm(x_BTD), cache, start)
        x_BTD = x_BTD + a_BTD
        h_BTD = self.ffn_norm(x_BTD)
        y_BTD = self.ffn.decode(h_BTD) if isinstance(self.ffn, MoEBlock) else self.ffn(h_BTD)
        return x_BTD + y_BTD, cache


# model.remat -> the jax.checkpoint policy of each block ('none': no remat).
# 'block' keeps only the block's inputs; 'minimal' (MaxText's name) also keeps the outputs of
# weight matmuls without batch dims (attention projections, router, dense FFN), the cheap-to-keep
# activations whose recomputation would cost a matmul, and recomputes norms, activations and
# attention scores.
REMAT_POLICIES = {
    'block': jax.checkpoint_policies.nothing_saveable,
    'minimal': jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}
REMATS = ('none', *REMAT_POLICIES)




def rematted(fn, remat: str, prevent_cse: bool = True):
    """fn under jax.checkpoint with model.remat's policy ('none': fn itself)."""
    if remat == 'none':
        return fn
    return jax.checkpoint(fn, policy=REMAT_POLICIES[remat], prevent_cse=prevent_cse)


def run_block(block, x_BTD, segment_ids_BT, positions_BT, rng, *, train, remat):
    """The block, rematerialised per model.remat.

    The forward pass never mutates model state, so a pure function of the split state is
    enough (and avoids lifting variable updates across trace levels).
    """
    if remat == 'none':
        return block(x_BTD, segment_ids_BT, positions_BT, train=train, rng=rng)
    graphdef, state = nnx.split(block)
    pure = lambda state, *args: nnx.merge(graphdef, state)(*args[:3], train=train, rng=args[3])
    return rematted(pure, remat)(state, x_BTD, segment_ids_BT, positions_BT, rng)


class Period(nnx.Module):
    """The unit a scanned model repeats: moe_every - 1 dense blocks and one MoE block."""

    def __init__(self, blocks: list[Block]):
        self.blocks = nnx.List(blocks)

    def __call__(self, x_BTD, segment_ids_BT, positions_BT, rng, first, *, train):
        """Layers first .. first+len-1; returns x and the MoE block's stats ({} if none).
        Layer i draws its noise from fold_in(rng, i), exactly as the unrolled model does."""
        stats = {}
        for j, block in enumerate(self.blocks):
            block_rng = None if rng is None else jax.random.fold_in(rng, first + j)
            x_BTD, block_stats = block(x_BTD, segment_ids_BT, positions_BT, train=train,
                                       rng=block_rng)
            stats = block_stats if block_stats is not None else stats
        return x_BTD, stats


def stacked_periods(blocks: list[Block], length: int) -> Period:
    """The blocks grouped into Periods of `length`, their variables stacked on a leading
    'layers' axis. Built from the unrolled blocks, so one seed gives one model either way."""
    periods = [Period(blocks[i:i + length]) for i in range(0, len(blocks), length)]
    graphdefs, states = zip(*(nnx.split(p) for p in periods))
    stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *states)

    def add_layers_axis(variable):
        names = variable.get_metadata().get('out_sharding')
        if names:
            variable.set_metadata(out_sharding=('layers',) + tuple(names))
        return variable
    stacked = jax.tree.map(add_layers_axis, stacked,
                           is_leaf=lambda x: isinstance(x, nnx.Variable))
    return nnx.merge(graphdefs[0], stacked)


class StackedMoELayer:
    """One layer's view of a scanned model's stacked MoE block, for loss-free balancing."""

    def __init__(self, stacked: MoEBlock, index: int):
        self.stacked, self.index = stacked, index

    def update_bias(self, expert_load_E) -> None:
        bias = self.stacked.router.expert_bias
        all_LE = bias[...]
        bias.set_value(all_LE[self.index])  # MoEBlock.update_bias acts on this layer's row alone
        self.stacked.update_bias(expert_load_E)
        bias.set_value(all_LE.at[self.index].set(bias[...]))


class Transformer(nnx.Module):
    """Embedding, num_layers blocks (unrolled in `blocks`, or when model.scan_layers scanned in
    `stack`, after a dense prefix kept unrolled in `prefix`), final norm and the output head."""

    def __init__(self, cfg, *, rngs: nnx.Rngs):
        m = cfg.model
        self.dtype = DTYPES[m.dtype]
        self.remat = m.remat
        self.scan = config_lib.scans_layers(cfg)
        self.embed = layers.Embed(cfg.data.vocab_size, m.d_model, rngs=rngs)
        blocks = [Block(cfg, is_moe_layer(cfg, i), rngs=rngs) for i in range(m.num_layers)]
        if self.scan:
            first, period, _ = config_lib.scan_layout(cfg)
            if first:  # DeepSeek's first dense layers: not a period, so kept out of the scan
                self.prefix = nnx.List(blocks[:first])
            self.stack = stacked_periods(blocks[first:], period)
        else:
            self.blocks = nnx.List(blocks)
        self.final_norm = layers.RMSNorm(m.d_model, m.norm_eps)
        self.head_DV = sharding.param(rngs, (m.d_model, cfg.data.vocab_size), ('embed', 'vocab'),
                                    m.d_model)
        self.num_layers = m.num_layers
        if m.mtp_depth:  # built last: models without MTP keep their initial weights
            self.mtp = nnx.List([mtp.MTPModule(
                m.d_model, m.norm_eps,
                Block(cfg, is_moe_layer(cfg, m.num_layers + k), rngs=rngs), rngs=rngs)
                for k in range(m.mtp_depth)])

    def prefix_blocks(self) -> list:
        """Scanned models: the unrolled blocks before the stack (layers 0..k-1; often none)."""
        return list(self.prefix) if hasattr(self, 'prefix') else []

    def mtp_modules(self) -> list:
        """The multi-token prediction modules, depth 1 first (none without model.mtp_depth)."""
        return list(self.mtp) if hasattr(self, 'mtp') else []

    def __call__(self, inputs_BT, segment_ids_BT, positions_BT, *, train: bool = False,
                 rng: jax.Array | None = None):
        """Logits [B, T, V] in float32, and MoE statistics stacked over MoE layers."""
        h_BTD, stats = self.hidden(inputs_BT, segment_ids_BT, positions_BT, train=train, rng=rng)
        return self.logits(h_BTD, self.final_norm), stats

    def hidden(self, inputs_BT, segment_ids_BT, positions_BT, *, train: bool, rng):
        """The last block's output [B, T, D] (before the final norm) and the MoE statistics."""
        x_BTD = self.embed(inputs_BT, self.dtype)
        run = self._scanned if self.scan else self._unrolled
        return run(x_BTD, segment_ids_BT, positions_BT, rng, train=train)

    def logits(self, h_BTD, norm):
        """The shared output head on norm(h): float32 logits [B, T, V]."""
        logits_BTV = jnp.einsum('btd,dv->btv', norm(h_BTD), self.head_DV[...].astype(self.dtype))
        logits_BTV = sharding.constrain(logits_BTV, ('batch', 'length', 'act_vocab'))
        return logits_BTV.astype(jnp.float32)

    def forward_with_mtp(self, inputs_BT, segment_ids_BT, positions_BT, targets_BT, *,
                         train: bool = False, rng: jax.Array | None = None):
        """The main logits and statistics (the MTP blocks' MoE layers appended after the main
        ones), and per depth k = 1..mtp_depth (logits [B, T, V], labels t_{i+k+1}, segment ids
        with 0 where position i has no such label): see moejax/model/mtp.py."""
        h_BTD, stats = self.hidden(inputs_BT, segment_ids_BT, positions_BT, train=train, rng=rng)
        run = lambda block, x, seg, pos, r: run_block(block, x, seg, pos, r, train=train,
                                                      remat=self.remat)
        modules = self.mtp_modules()
        depths = mtp.run_depths(modules, h_BTD, lambda ids: self.embed(ids, self.dtype),
                                targets_BT, segment_ids_BT, positions_BT, rng, run_block=run,
                                first_layer=self.num_layers)
        stats = concat_stats(stats, stack_stats([s for *_, s in depths if s is not None]))
        heads = [(self.logits(h, module.out_norm), labels, seg)
                 for module, (h, labels, seg, _) in zip(modules, depths)]
        return self.logits(h_BTD, self.final_norm), stats, heads

    def _unrolled(self, x_BTD, segment_ids_BT, positions_BT, rng, *, train, blocks=None):
        """The blocks (default: all) one after another; block i is layer i."""
        layer_stats = []
        for i, block in enumerate(self.blocks if blocks is None else blocks):
            block_rng = None if rng is None else jax.random.fold_in(rng, i)
            x_BTD, stats = run_block(block, x_BTD, segment_ids_BT, positions_BT, block_rng,
                                     train=train, remat=self.remat)
            if stats is not None:
                layer_stats.append(stats)
        return x_BTD, stack_stats(layer_stats)

    def _scanned(self, x_BTD, segment_ids_BT, positions_BT, rng, *, train):
        """The prefix unrolled, then one compiled period scanned over the stacked layers; stats
        stack as the scan's ys, after the prefix's (layer order)."""
        prefix = self.prefix_blocks()
        x_BTD, prefix_stats = self._unrolled(x_BTD, segment_ids_BT, positions_BT, rng,
                                             train=train, blocks=prefix)
        graphdef, state = nnx.split(self.stack)

        def body(x_BTD, state_and_first):
            state, first = state_and_first
            period = nnx.merge(graphdef, state)
            return period(x_BTD, segment_ids_BT, positions_BT, rng, first, train=train)
        # prevent_cse=False: inside a scan, CSE cannot merge the recomputation into the forward.
        body = rematted(body, self.remat, prevent_cse=False)
        firsts = len(prefix) + self.period_length() * jnp.arange(self.num_periods())
        x_BTD, stats = jax.lax.scan(body, x_BTD, (state, firsts))
        return x_BTD, concat_stats(prefix_stats, stats)

    def num_periods(self) -> int:
        """Scanned models: how many periods the stack holds."""
        return jax.tree.leaves(nnx.state(self.stack))[0].shape[0]

    def period_length(self) -> int:
        """Scanned models: layers per period."""
        return len(self.stack.blocks)

    def init_cache(self, batch: int, max_len: int) -> list[layers.KVCache]:
        """An empty KV cache per block, [B, max_len, KV heads, K] in the model dtype (scanned:
        one per prefix block, then one per block of a period with a leading [num_periods] axis)."""
        empty = lambda blocks: [b.attn.empty_cache(batch, max_len, self.dtype) for b in blocks]
        if not self.scan:
            return empty(self.blocks)
        graphdef, state = nnx.split(self.stack)
        one = nnx.merge(graphdef, jax.tree.map(
            lambda a: jax.ShapeDtypeStruct(a.shape[1:], a.dtype), state))
        n = self.num_periods()
        stacked = lambda c: jnp.zeros((n,) + c.shape, c.dtype)
        return empty(self.prefix_blocks()) + [jax.tree.map(stacked, c) for c in empty(one.blocks)]

    def extend(self, inputs_BT, cache: list[layers.KVCache], start):
        """Logits [B, T, V] of T new tokens at positions start.. (one document per row, no
        padding), reading and updating the KV cache: prefill a prompt at start=0, then decode one
        token at a time. Evaluation mode; MoE routing groups are the new tokens of a row."""
        x_BTD = self.embed(inputs_BT, self.dtype)
        if self.scan:
            prefix = self.prefix_blocks()
            x_BTD, new_cache = extend_blocks(prefix, x_BTD, cache[:len(prefix)], start)
            graphdef, state = nnx.split(self.stack)

            def body(x_BTD, state_and_cache):
                state, period_cache = state_and_cache
                period = nnx.merge(graphdef, state)
                return extend_blocks(period.blocks, x_BTD, period_cache, start)
            x_BTD, stacked_cache = jax.lax.scan(body, x_BTD, (state, cache[len(prefix):]))
            new_cache += stacked_cache
        else:
            x_BTD, new_cache = extend_blocks(self.blocks, x_BTD, cache, start)
        x_BTD = self.final_norm(x_BTD)
        logits_BTV = jnp.einsum('btd,dv->btv', x_BTD, self.head_DV[...].astype(self.dtype))
        return logits_BTV.astype(jnp.float32), new_cache

    def moe_blocks(self) -> list:
        """Each MoE layer's block, in layer order (scanned: the prefix's, then views of the
        stacked block), then the MTP modules' MoE blocks (forward_with_mtp's statistics have the
        same order)."""
        moe = lambda blocks: [b.ffn for b in blocks if isinstance(b.ffn, MoEBlock)]
        extra = [m.block.ffn for m in self.mtp_modules() if isinstance(m.block.ffn, MoEBlock)]
        if not self.scan:
            return moe(self.blocks) + extra
        ffn = self.stack.blocks[-1].ffn
        stacked = ([StackedMoELayer(ffn, p) for p in range(self.num_periods())]
                   if isinstance(ffn, MoEBlock) else [])
        return moe(self.prefix_blocks()) + stacked + extra


def extend_blocks(blocks, x_BTD, cache, start):
    new_cache = []
    for block, layer_cache in zip(blocks, cache):
        x_BTD, layer_cache = block.extend(x_BTD, layer_cache, start)
        new_cache.append(layer_cache)
    return x_BTD, new_cache


def scanned_params(unrolled: dict, cfg) -> dict:
    """An unrolled model's pure state dict (nnx.to_pure_dict) in the scanned layout."""
    out = {k: v for k, v in unrolled.items() if k != 'blocks'}
    first, n, count = config_lib.scan_layout(cfg)
    if first:
        out['prefix'] = {i: unrolled['blocks'][i] for i in range(first)}
    out['stack'] = {'blocks': {j: jax.tree.map(lambda *xs: jnp.stack(xs), *[
        unrolled['blocks'][first + p * n + j] for p in range(count)]) for j in range(n)}}
    return out


def unrolled_params(scanned: dict, cfg) -> dict:
    """A scanned model's pure state dict in the unrolled layout (the inverse of scanned_params)."""
    out = {k: v for k, v in scanned.items() if k not in ('prefix', 'stack')}
    first, n, count = config_lib.scan_layout(cfg)
    out['blocks'] = {i: scanned['prefix'][i] for i in range(first)}
    out['blocks'].update({first + p * n + j: jax.tree.map(lambda x: x[p],
                                                          scanned['stack']['blocks'][j])
                          for p in range(count) for j in range(n)})
    return out


def unrolled_model(model: Transformer, cfg) -> Transformer:
    """The same weights as an unrolled Transformer (model.blocks[i]), for code that walks the
    layers one by one (routing analysis); a model already unrolled is returned as is."""
    if not model.scan:
        return model
    flat_cfg = cfg.copy_and_resolve_references()
    flat_cfg.model.scan_layers = False
    flat = nnx.eval_shape(lambda: Transformer(flat_cfg, rngs=nnx.Rngs(0)))
    state = nnx.state(flat)
    nnx.replace_by_pure_dict(state, unrolled_params(nnx.to_pure_dict(nnx.state(model)), cfg))
    nnx.update(flat, state)
    return flat


def concat_stats(first: dict, then: dict) -> dict:
    """MoE statistics of consecutive layers ({name: [layers, ...]}), first's layers first."""
    if not (first and then):
        return first or then
    return {k: jnp.concatenate([first[k], then[k]]) for k in first}


def stack_stats(layer_stats: list[dict]) -> dict:
    """{name: [num_moe_layers, ...]}; empty for a dense model."""
    if not layer_stats:
        return {}
    return {k: jnp.stack([s[k] for s in layer_stats]) for k in layer_stats[0]}
