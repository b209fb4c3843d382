"""Multi-token prediction against a direct NumPy computation (on a mesh against one device:
test_transformer's dense-prefix model, which has MTP).

Truth: a float64 NumPy forward of a tiny dense model that runs each MTP depth literally as
DeepSeek-V3 section 2.2 writes it, one document at a time on its shortened sequence (no
masking tricks): depth k at position i combines RMSNorm(Emb(t_{i+k})) and RMSNorm(h^{k-1}_i),
projects, runs one block and predicts t_{i+k+1} with the shared head.
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from moejax import validate
from moejax.run import evaluate as evaluate_lib
from moejax.run import step as step_lib
from tests.helpers import jitted, tiny_config
from tests.test_mla import rms, rotate

DEPTH = 2


def np_block(p, x, pos, m):
    """A pre-norm block (rotary multi-head attention, SwiGLU FFN) on one document [T, D]."""
    a = p['attn']
    h = rms(x, p['attn_norm']['scale'])
    q, k, v = (np.einsum('td,dhk->thk', h, a[w]) for w in ('wq_DHK', 'wk_DHK', 'wv_DHK'))
    q, k = (rotate(t[None], pos[None], m.rope_base)[0] for t in (q, k))
    T, K = x.shape[0], q.shape[-1]
    s = np.where(np.tril(np.ones((T, T), bool)), np.einsum('thk,shk->hts', q, k) / np.sqrt(K),
                 -np.inf)
    probs = np.exp(s - s.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    x = x + np.einsum('thk,hkd->td', np.einsum('hts,shk->thk', probs, v), a['wo_HKD'])
    f = p['ffn']
    h = rms(x, p['ffn_norm']['scale'])
    gate = h @ f['w_gate_DF']
    return x + (gate / (1 + np.exp(-gate)) * (h @ f['w_in_DF'])) @ f['w_out_FD']


def nll(logits, labels):
    z = logits.max(-1, keepdims=True)
    logz = np.log(np.exp(logits - z).sum(-1)) + z[:, 0]
    return logz - logits[np.arange(len(labels)), labels]


def numpy_losses(p, batch, m):
    """Main CE and each depth's loss (NLL sum / the batch's real tokens), document by document."""
    head = lambda h, norm: rms(h, norm['scale']) @ p['head_DV']
    main, depth_sums = 0.0, np.zeros(DEPTH)
    seg_all = batch['segment_ids']
    for b in range(seg_all.shape[0]):
        for doc in set(seg_all[b][seg_all[b] > 0]):
            idx = np.flatnonzero(seg_all[b] == doc)
            x_in, y = batch['inputs'][b, idx], batch['targets'][b, idx]
            pos = batch['positions'][b, idx].astype(np.float64)
            h = p['embed']['table_VD'][x_in]
            for i in range(m.num_layers):
                h = np_block(p['blocks'][i], h, pos, m)
            main += nll(head(h, p['final_norm']), y).sum()
            for k in range(1, DEPTH + 1):
                n = len(idx) - k  # positions with a label k+1 ahead in this document
                if n <= 0:
                    break
                mod = p['mtp'][k - 1]
                e = p['embed']['table_VD'][y[k - 1:k - 1 + n]]
                x = np.concatenate([rms(e, mod['emb_norm']['scale']),
                                    rms(h[:n], mod['hidden_norm']['scale'])], -1) @ mod['proj_XD']
                h = np_block(mod['block'], x, pos[:n], m)
                depth_sums[k - 1] += nll(head(h, mod['out_norm']), y[k:k + n]).sum()
    tokens = np.sum(seg_all > 0)
    return main / tokens, depth_sums / tokens


def mtp_config(**overrides):
    cfg = tiny_config(moe_every=0, activation='swiglu', **overrides)
    cfg.model.update(mtp_depth=DEPTH, mtp_loss_weight=0.3)
    return cfg


def packed_batch(vocab, B=2, T=12):
    rng = np.random.default_rng(0)
    seg = np.ones((B, T), np.int32)
    seg[0, 5:9], seg[0, 9:] = 2, 0  # two documents (5 and 4 tokens), then padding
    seg[1, 10:] = 3  # a 2-token document: depth 2 has no position in it
    pos = np.zeros_like(seg)
    for t in range(1, T):
        pos[:, t] = np.where(seg[:, t] == seg[:, t - 1], pos[:, t - 1] + 1, 0)
    ids = rng.integers(3, vocab, (B, T + 1), dtype=np.int32)
    return {'inputs': ids[:, :-1], 'targets': ids[:, 1:], 'segment_ids': seg,
            'positions': (pos * (seg > 0)).astype(np.int32)}


def test_mtp_losses_match_numpy_per_document():
    from moejax.model import transformer as model_lib
    cfg = mtp_config()
    model = model_lib.Transformer(cfg, rngs=nnx.Rngs(params=jax.random.key(0)))
    batch = packed_batch(cfg.data.vocab_size)
    p = jax.tree.map(lambda a: np.asarray(a, np.float64), nnx.to_pure_dict(nnx.state(model)))
    want_main, want_depths = numpy_losses(p, batch, cfg.model)
    jb = jax.tree.map(jnp.asarray, batch)
    logits, stats, heads = jitted('forward_with_mtp')(model, jb['inputs'], jb['segment_ids'],
                                                      jb['positions'], jb['targets'])
    tokens = jnp.float32(np.sum(batch['segment_ids'] > 0))
    parts = dict(jax.jit(step_lib.loss_parts)(logits, jb, stats, tokens),
                 **jax.jit(step_lib.mtp_parts)(heads, tokens, 0.3))
    np.testing.assert_allclose(parts['ce_loss'], want_main, rtol=1e-5)
    for k in range(DEPTH):
        np.testing.assert_allclose(parts[f'mtp_loss_{k + 1}'], want_depths[k], rtol=1e-5)
    np.testing.assert_allclose(parts['mtp_loss'], 0.3 / DEPTH * want_depths.sum(), rtol=1e-5)
    total = jax.jit(functools.partial(step_lib.total_loss, moe_cfg=cfg.moe))(parts)
    np.testing.assert_allclose(total, want_main + 0.3 / DEPTH * want_depths.sum(), rtol=1e-5)
    # Evaluation reports the next-token loss alone.
    graphdef, params, extra = nnx.split(model, nnx.Param, ...)
    sums = jax.jit(functools.partial(evaluate_lib.eval_step, graphdef))(
        params, extra, jb, jnp.ones(cfg.data.vocab_size))
    np.testing.assert_allclose(sums['nll'] / sums['tokens'], want_main, rtol=1e-5)


@pytest.mark.parametrize('bad', [dict(mtp_depth=-1), dict(mtp_loss_weight=-0.1)])
def test_bad_mtp_config_names_the_key(bad):
    from moejax.errors import ConfigError
    cfg = tiny_config()
    cfg.model.update(**bad)
    with pytest.raises(ConfigError, match=f'model.{next(iter(bad))}'):
        validate.check(cfg, 1)
