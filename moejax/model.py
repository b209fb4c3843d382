"""The decoder-only MoE language model, and its parameter and FLOP counts."""
import functools

import jax
import jax.numpy as jnp
from flax import nnx

from moejax import dispatch, layers, moe, routing, sharding

# Parameters carry logical names as metadata only; shardings are applied by jit (see train.py).
nnx.use_eager_sharding(False)

DTYPES = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16}


def is_moe_layer(cfg, i: int) -> bool:
    """Every moe_every-th FFN is an MoE block, counting from 1 (Switch: layers 2, 4, ...)."""
    return cfg.model.moe_every > 0 and (i + 1) % cfg.model.moe_every == 0


class Block(nnx.Module):
    """Pre-norm residual block: attention, then a dense or MoE FFN."""

    def __init__(self, cfg, use_moe: bool, *, rngs: nnx.Rngs):
        m = cfg.model
        self.attn_norm = layers.RMSNorm(m.d_model)
        self.attn = layers.Attention(m.d_model, m.num_heads, m.num_kv_heads or m.num_heads,
                                     m.rope_base, rngs=rngs)
        self.ffn_norm = layers.RMSNorm(m.d_model)
        self.ffn = (moe.MoEBlock(cfg, rngs=rngs) if use_moe
                    else layers.MLP(m.d_model, m.d_ff, m.activation, rngs=rngs))

    def __call__(self, x_BTD, segment_ids_BT, positions_BT, *, train, rng):
        x_BTD = x_BTD + self.attn(self.attn_norm(x_BTD), segment_ids_BT, positions_BT)
        h_BTD = self.ffn_norm(x_BTD)
        if isinstance(self.ffn, moe.MoEBlock):
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
        if isinstance(self.ffn, moe.MoEBlock):
            y_BTD = moe_by_row(self.ffn, h_BTD)
        else:
            y_BTD = self.ffn(h_BTD)
        return x_BTD + y_BTD, cache


def moe_by_row(block: moe.MoEBlock, x_BTD):
    """The MoE block for cached decoding: each row's T new tokens form one routing group.

    Deterministic (no noise, eval capacity factor). Decoding one token at a time makes every
    group a single token, so token-choice routing never drops there; the full forward routes a
    whole sequence per group and can drop when the eval capacity is short. The two agree
    whenever the full forward drops nothing (dropless, or eval_capacity_factor <= 0 or large).
    Expert choice picks tokens within a group, so decoding it per token differs by design.
    """
    e = block.moe_cfg
    B, T, _ = x_BTD.shape
    mask_BT = jnp.ones((B, T), bool)
    route = block.router(x_BTD, mask_BT, train=False, rng=None)
    capacity = routing.capacity(T, e.num_experts, e.top_k, e.eval_capacity_factor)
    y_BTD, _ = dispatch.dispatch_combine(x_BTD, mask_BT, route, block.expert_weights(x_BTD.dtype),
                                         engine=e.dispatch, capacity=capacity)
    if block.shared is not None:
        y_BTD = y_BTD + block.shared(x_BTD)
    return y_BTD


def call_block(block, x_BTD, segment_ids_BT, positions_BT, rng, *, train):
    return block(x_BTD, segment_ids_BT, positions_BT, train=train, rng=rng)


def remat_block(block, x_BTD, segment_ids_BT, positions_BT, rng, *, train):
    """The block under jax.checkpoint: only its inputs are kept for the backward pass.

    The forward pass never mutates model state, so a pure function of the split state is
    enough (and avoids lifting variable updates across trace levels).
    """
    graphdef, state = nnx.split(block)
    pure = lambda state, *args: call_block(nnx.merge(graphdef, state), *args, train=train)
    return jax.checkpoint(pure)(state, x_BTD, segment_ids_BT, positions_BT, rng)


class Transformer(nnx.Module):
    def __init__(self, cfg, *, rngs: nnx.Rngs):
        m = cfg.model
        self.dtype = DTYPES[m.dtype]
        self.remat = m.remat == 'block'
        self.embed = layers.Embed(cfg.data.vocab_size, m.d_model, rngs=rngs)
        self.blocks = nnx.List([Block(cfg, is_moe_layer(cfg, i), rngs=rngs)
                                for i in range(m.num_layers)])
        self.final_norm = layers.RMSNorm(m.d_model)
        self.head_DV = layers.param(rngs, (m.d_model, cfg.data.vocab_size), ('embed', 'vocab'),
                                    m.d_model)

    def __call__(self, inputs_BT, segment_ids_BT, positions_BT, *, train: bool = False,
                 rng: jax.Array | None = None):
        """Logits [B, T, V] in float32, and MoE statistics stacked over MoE layers."""
        x_BTD = self.embed(inputs_BT, self.dtype)
        layer_stats = []
        run_block = functools.partial(remat_block if self.remat else call_block, train=train)
        for i, block in enumerate(self.blocks):
            block_rng = None if rng is None else jax.random.fold_in(rng, i)
            x_BTD, stats = run_block(block, x_BTD, segment_ids_BT, positions_BT, block_rng)
            if stats is not None:
                layer_stats.append(stats)
        x_BTD = self.final_norm(x_BTD)
        logits_BTV = jnp.einsum('btd,dv->btv', x_BTD, self.head_DV[...].astype(self.dtype))
        logits_BTV = sharding.constrain(logits_BTV, ('batch', 'length', 'act_vocab'))
        return logits_BTV.astype(jnp.float32), stack_stats(layer_stats)

    def init_cache(self, batch: int, max_len: int) -> list[layers.KVCache]:
        """An empty KV cache per block, [B, max_len, KV heads, K] in the model dtype."""
        return [b.attn.empty_cache(batch, max_len, self.dtype) for b in self.blocks]

    def extend(self, inputs_BT, cache: list[layers.KVCache], start):
        """Logits [B, T, V] of T new tokens at positions start.. (one document per row, no
        padding), reading and updating the KV cache: prefill a prompt at start=0, then decode one
        token at a time. Evaluation mode; MoE routing groups are the new tokens of a row."""
        x_BTD = self.embed(inputs_BT, self.dtype)
        new_cache = []
        for block, layer_cache in zip(self.blocks, cache):
            x_BTD, layer_cache = block.extend(x_BTD, layer_cache, start)
            new_cache.append(layer_cache)
        x_BTD = self.final_norm(x_BTD)
        logits_BTV = jnp.einsum('btd,dv->btv', x_BTD, self.head_DV[...].astype(self.dtype))
        return logits_BTV.astype(jnp.float32), new_cache

    def moe_blocks(self) -> list[moe.MoEBlock]:
        return [b.ffn for b in self.blocks if isinstance(b.ffn, moe.MoEBlock)]


def stack_stats(layer_stats: list[dict]) -> dict:
    """{name: [num_moe_layers, ...]}; empty for a dense model."""
    if not layer_stats:
        return {}
    return {k: jnp.stack([s[k] for s in layer_stats]) for k in layer_stats[0]}


def param_counts(cfg) -> dict[str, int]:
    """Total and active (per token) parameters, counted from the config alone."""
    m, e = cfg.model, cfg.moe
    D, F, V, L = m.d_model, m.d_ff, cfg.data.vocab_size, m.num_layers
    head_dim = D // m.num_heads
    kv = m.num_kv_heads or m.num_heads
    attn = D * head_dim * (2 * m.num_heads + 2 * kv) + 2 * D
    ffn = (3 if m.activation == 'swiglu' else 2) * D * F
    n_moe = sum(is_moe_layer(cfg, i) for i in range(L))
    router = D * e.num_experts * (2 if e.router == 'noisy_top_k' else 1)
    shared = ffn * e.num_shared_experts
    total = (2 * V * D + D + L * attn + (L - n_moe) * ffn
             + n_moe * (e.num_experts * ffn + router + shared))
    experts_per_token = e.num_experts if e.router == 'soft' else e.top_k
    active = total - n_moe * (e.num_experts - experts_per_token) * ffn
    return {'params': total, 'active_params': active, 'embedding_params': V * D}


def flops_per_token(cfg) -> float:
    """Training FLOPs per token: 6 x active matmul params + attention scores (MaxText's count)."""
    counts = param_counts(cfg)
    matmul_params = counts['active_params'] - counts['embedding_params']
    attn = 12 * cfg.model.num_layers * cfg.data.seq_len * cfg.model.d_model
    return 6 * matmul_params + attn
