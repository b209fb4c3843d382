"""Multi-token prediction (DeepSeek-V3 section 2.2): D sequential modules, depth k predicting
the token k+1 places past the next one.

Module k takes the previous depth's hidden state h^{k-1}_i (the main model's last block output
for k = 1) and the embedding of token t_{i+k}, normalises each (RMSNorm), projects their
concatenation [embedding; hidden] from 2D to D, runs one Transformer block, and the shared
output head (after its own RMSNorm) predicts t_{i+k+1}. The causal chain is kept: position i
at depth k sees tokens up to t_{i+k} only.

On packed rows, t_{i+k} is targets[i+k-1] and the label targets[i+k]; position i takes part at
depth k only if position i+k is in its document (the last k tokens of each document have no
such label). Positions that do not take part are padding (segment 0) for the block's attention
and routing, so the module sees exactly the shortened sequence of the paper.
"""
import jax
import jax.numpy as jnp
from flax import nnx

from moejax.model.layers import RMSNorm
from moejax.sharding import param


class MTPModule(nnx.Module):
    """One depth: two input norms, the 2D -> D projection, a block, the head's input norm."""

    def __init__(self, d_model: int, eps: float, block, *, rngs: nnx.Rngs):
        self.emb_norm = RMSNorm(d_model, eps)
        self.hidden_norm = RMSNorm(d_model, eps)
        self.proj_XD = param(rngs, (2 * d_model, d_model), ('mtp_in', 'embed'), 2 * d_model)
        self.block = block
        self.out_norm = RMSNorm(d_model, eps)

    def combine(self, h_BTD, emb_BTD):
        """M_k [RMSNorm(Emb(t_{i+k})); RMSNorm(h^{k-1}_i)] (the published weights' order)."""
        x_BTX = jnp.concatenate([self.emb_norm(emb_BTD), self.hidden_norm(h_BTD)], axis=-1)
        return jnp.einsum('btx,xd->btd', x_BTX, self.proj_XD[...].astype(h_BTD.dtype))


def shift_left(x_BT, n: int, fill=0):
    """x[:, i + n] at position i, `fill` past the end."""
    if n == 0:
        return x_BT
    pad = jnp.full(x_BT.shape[:1] + (n,) + x_BT.shape[2:], fill, x_BT.dtype)
    return jnp.concatenate([x_BT[:, n:], pad], axis=1)


def depth_inputs(targets_BT, segment_ids_BT, k: int):
    """For depth k: the tokens to embed (t_{i+k}), the labels (t_{i+k+1}) and the segment ids
    with positions that have no label in their document set to 0."""
    valid_BT = (shift_left(segment_ids_BT, k) == segment_ids_BT) & (segment_ids_BT > 0)
    return (shift_left(targets_BT, k - 1), shift_left(targets_BT, k),
            jnp.where(valid_BT, segment_ids_BT, 0))


def run_depths(modules, h_BTD, embed, targets_BT, segment_ids_BT, positions_BT, rng, *,
               run_block, first_layer: int):
    """Each depth's (output hidden state, labels, segment ids, block stats or None).

    `embed(ids)` is the shared embedding; `run_block(block, x, seg, pos, rng)` runs a block as
    the main model does (remat); depth k draws its noise from fold_in(rng, first_layer + k - 1).
    """
    out = []
    for k, module in enumerate(modules, start=1):
        ids_BT, labels_BT, seg_BT = depth_inputs(targets_BT, segment_ids_BT, k)
        x_BTD = module.combine(h_BTD, embed(ids_BT))
        block_rng = None if rng is None else jax.random.fold_in(rng, first_layer + k - 1)
        h_BTD, stats = run_block(module.block, x_BTD, seg_BT, positions_BT, block_rng)
        out.append((h_BTD, labels_BT, seg_BT, stats))
    return out
