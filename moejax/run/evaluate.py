"""Evaluation: a pure eval_step summing token NLL, and perplexity / bits-per-byte over a split.

Evaluation is deterministic: no router noise or jitter, the eval capacity factor, and a fixed
list of batches, so the same checkpoint gives the same numbers on any mesh.
"""
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx


def token_nll(logits_BTV, targets_BT):
    """Negative log-likelihood of each target token, float32."""
    logz_BT = jax.nn.logsumexp(logits_BTV, axis=-1)
    gold_BT = jnp.take_along_axis(logits_BTV, targets_BT[..., None], axis=-1)[..., 0]
    return logz_BT - gold_BT


def nll_sum(logits_BTV, labels_BT, segment_ids_BT):
    """The labels' NLL summed over real tokens (segment id > 0)."""
    weights_BT = (segment_ids_BT > 0).astype(jnp.float32)
    return jnp.sum(token_nll(logits_BTV, labels_BT) * weights_BT)


def eval_step(graphdef, params, extra, batch, byte_lengths_V):
    """Sums over one batch: nll, real tokens, their UTF-8 bytes, and routed load per layer."""
    model = nnx.merge(graphdef, params, extra)
    logits, stats = model(batch['inputs'], batch['segment_ids'], batch['positions'], train=False)
    weights = (batch['segment_ids'] > 0).astype(jnp.float32)
    sums = {
        'nll': nll_sum(logits, batch['targets'], batch['segment_ids']),
        'tokens': jnp.sum(weights),
        'bytes': jnp.sum(byte_lengths_V[batch['targets']] * weights),
    }
    for key in ('expert_load', 'dropped_fraction', 'tokens_left_behind'):
        if key in stats:
            sums[key] = stats[key]
    return sums


def summarize(totals: dict, num_batches: int) -> dict:
    """Loss, perplexity = exp(loss), bits per byte, tokens; mean routing stats per layer."""
    loss = totals['nll'] / max(totals['tokens'], 1.0)
    out = {
        'loss': loss,
        'perplexity': math.exp(min(loss, 700.0)),
        'bits_per_byte': totals['nll'] / math.log(2) / max(totals['bytes'], 1.0),
        'tokens': int(totals['tokens']),
    }
    for key in ('expert_load', 'dropped_fraction', 'tokens_left_behind'):
        if key in totals:
            out[key] = (np.asarray(totals[key]) / num_batches).tolist()
    return out


def evaluate(step_fn, params, extra, batches, byte_lengths_V) -> dict:
    """Run a jitted eval step over global batches and reduce on the host in float64."""
    totals, count = {}, 0
    for batch in batches:
        sums = jax.device_get(step_fn(params, extra, batch, byte_lengths_V))
        for k, v in sums.items():
            totals[k] = totals.get(k, 0.0) + np.asarray(v, np.float64)
        count += 1
    totals = {k: (float(v) if np.ndim(v) == 0 else v) for k, v in totals.items()}
    return summarize(totals, count)


def summary(result: dict) -> str:
    """The readable part of an evaluation, as training prints it and eval does:
    loss | perplexity | bits/byte (when known) | tokens."""
    parts = [f'loss {result["loss"]:.4f}', f'perplexity {result["perplexity"]:.2f}']
    if result.get('bits_per_byte') is not None:
        parts.append(f'bits/byte {result["bits_per_byte"]:.4f}')
    parts.append(f'{result["tokens"]:,} tokens')
    return ' | '.join(parts)
