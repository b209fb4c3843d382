"""Routers against hand-written NumPy references (loops), on tiny shapes."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from moejax.moe import routing as R
from tests.helpers import moe_cfg

nnx.use_eager_sharding(False)


def identity_router(**overrides):
    """A router whose logits equal its input (w_DE = I), so tests can choose the logits."""
    cfg = moe_cfg(**overrides)
    router = R.Router(cfg.num_experts, cfg, rngs=nnx.Rngs(0))
    router.w_DE[...] = jnp.eye(cfg.num_experts)
    return router


def np_softmax(v):
    e = np.exp(v - np.max(v))
    return e / e.sum()


def np_top_k_reference(logits, mask, k):
    """Per token: softmax, k best experts (descending), gates (renormalised when k>1)."""
    g_, s_, e_ = logits.shape
    expert = np.zeros((g_, s_, k), np.int64)
    gate = np.zeros((g_, s_, k))
    for g in range(g_):
        for s in range(s_):
            p = np_softmax(logits[g, s])
            order = sorted(range(e_), key=lambda e: -p[e])[:k]
            expert[g, s] = order
            chosen = np.array([p[e] for e in order])
            if k > 1:
                chosen = chosen / chosen.sum()
            gate[g, s] = chosen if mask[g, s] else 0.0
    return expert, gate


def np_aux_and_z(logits, mask, expert, k):
    """Aux loss: mean over groups of E * sum_e f_e P_e (f = assignments / (k n)); z-loss."""
    g_, s_, e_ = logits.shape
    aux_groups, z_terms = [], []
    for g in range(g_):
        real = [s for s in range(s_) if mask[g, s]]
        if not real:
            continue
        f, p = np.zeros(e_), np.zeros(e_)
        for s in real:
            p += np_softmax(logits[g, s]) / len(real)
            for e in expert[g, s]:
                f[e] += 1.0 / (k * len(real))
            z_terms.append(math.log(sum(math.exp(v) for v in logits[g, s])) ** 2)
        aux_groups.append(e_ * float(np.dot(f, p)))
    return np.mean(aux_groups), np.mean(z_terms)


LOGITS = np.array([[[2.0, 1.0, 0.0, -1.0],
                    [0.5, 3.0, 0.2, 0.1],
                    [0.0, 0.1, 0.3, 1.5],
                    [1.0, 0.9, -2.0, 0.0]],
                   [[-1.0, 0.0, 2.5, 2.4],
                    [0.3, 0.2, 0.1, 0.0],
                    [4.0, -3.0, 3.5, 0.0],
                    [0.0, 0.0, 0.0, 0.01]]], np.float32)
MASK = np.array([[True, True, True, False], [True, True, True, True]])


@pytest.mark.parametrize('k', [1, 2])
def test_top_k_assignments_gates_and_losses(k):
    router = identity_router(top_k=k)
    out = router(jnp.asarray(LOGITS), jnp.asarray(MASK), train=True, rng=None)
    expert, gate = np_top_k_reference(LOGITS.astype(np.float64), MASK, k)
    real = MASK[..., None].repeat(k, -1)
    np.testing.assert_array_equal(np.asarray(out.expert_GSK)[real], expert[real])
    np.testing.assert_allclose(out.gate_GSK, gate, atol=1e-6)
    aux, z = np_aux_and_z(LOGITS.astype(np.float64), MASK, expert, k)
    np.testing.assert_allclose(out.losses['aux_loss'], aux, rtol=1e-5)
    np.testing.assert_allclose(out.losses['z_loss'], z, rtol=1e-5)
    load = np.zeros(4)
    for e in expert[real]:
        load[e] += 1.0 / real.sum()
    np.testing.assert_allclose(out.stats['expert_load'], load, atol=1e-6)
    assert isinstance(out, R.TokenChoice)


def test_top1_hand_computed_example():
    # One group, 2 tokens, 2 experts, logits chosen so the numbers are easy to check by hand.
    logits = np.array([[[math.log(3.0), 0.0], [0.0, 0.0]]], np.float32)
    router = identity_router(num_experts=2)
    out = router(jnp.asarray(logits), jnp.ones((1, 2), bool), train=False, rng=None)
    # token 0: probs (3/4, 1/4) -> expert 0, gate 3/4; token 1: (1/2, 1/2) -> tie, expert 0.
    np.testing.assert_array_equal(out.expert_GSK[0, :, 0], [0, 0])
    np.testing.assert_allclose(out.gate_GSK[0, :, 0], [0.75, 0.5], rtol=1e-6)
    # f = (1, 0), P = ((3/4+1/2)/2, (1/4+1/2)/2) = (5/8, 3/8): aux = 2 * 5/8 = 1.25
    np.testing.assert_allclose(out.losses['aux_loss'], 1.25, rtol=1e-6)
    # lse = log 4 and log 2: z = (log(4)^2 + log(2)^2) / 2
    np.testing.assert_allclose(out.losses['z_loss'], (math.log(4) ** 2 + math.log(2) ** 2) / 2,
                               rtol=1e-6)
    np.testing.assert_allclose(out.stats['top1_prob'], (0.75 + 0.5) / 2, rtol=1e-6)
    ent = (-(0.75 * math.log(0.75) + 0.25 * math.log(0.25)) + math.log(2)) / 2
    np.testing.assert_allclose(out.stats['router_entropy'], ent, rtol=1e-6)


@pytest.mark.parametrize('router_kind', ['top_k', 'noisy_top_k', 'expert_choice', 'soft'])
def test_masked_tokens_get_nothing_and_do_not_count(router_kind):
    router = identity_router(router=router_kind, top_k=2)
    x = jnp.asarray(LOGITS)
    other = x.at[0, 3].set(jnp.array([9.0, -9.0, 5.0, 0.0]))  # change only the padding token
    a = router(x, jnp.asarray(MASK), train=False, rng=None, capacity=2)
    b = router(other, jnp.asarray(MASK), train=False, rng=None, capacity=2)
    for name in ('aux_loss', 'z_loss'):
        np.testing.assert_allclose(a.losses[name], b.losses[name], rtol=1e-6)
    for name in ('expert_load', 'router_entropy', 'top1_prob'):
        np.testing.assert_allclose(a.stats[name], b.stats[name], rtol=1e-6)
    if isinstance(a, R.TokenChoice):
        np.testing.assert_array_equal(a.gate_GSK[0, 3], 0.0)
    elif isinstance(a, R.Soft):
        np.testing.assert_array_equal(a.gate_GSE[0, 3], 0.0)
    else:
        picked_pad = np.asarray(a.token_GEC[0]) == 3
        np.testing.assert_array_equal(np.asarray(a.gate_GEC[0])[picked_pad], 0.0)


def test_expert_choice_and_soft_have_z_loss_but_no_aux_loss():
    for kind in ('expert_choice', 'soft'):
        out = identity_router(router=kind)(jnp.asarray(LOGITS), jnp.asarray(MASK), train=True,
                                           rng=None, capacity=2)
        _, z = np_aux_and_z(LOGITS.astype(np.float64), MASK, np.zeros((2, 4, 1), int), 1)
        assert float(out.losses['aux_loss']) == 0.0
        np.testing.assert_allclose(out.losses['z_loss'], z, rtol=1e-5)


def test_soft_gates_are_probs():
    out = identity_router(router='soft')(jnp.asarray(LOGITS), jnp.asarray(MASK), train=True,
                                         rng=None)
    for g in range(2):
        for s in range(4):
            want = np_softmax(LOGITS[g, s].astype(np.float64)) * MASK[g, s]
            np.testing.assert_allclose(out.gate_GSE[g, s], want, atol=1e-6)


@pytest.mark.parametrize('kind', ['top_k', 'noisy_top_k'])
def test_noise_off_at_eval_and_on_in_training(kind):
    router = R.Router(6, moe_cfg(router=kind, top_k=2, jitter=0.3 if kind == 'top_k' else 0.0),
                      rngs=nnx.Rngs(1))
    if kind == 'noisy_top_k':
        router.w_noise_DE[...] = jnp.full((6, 4), 0.5)
    clean = R.Router(6, moe_cfg(router=kind, top_k=2), rngs=nnx.Rngs(1))
    x = jax.random.normal(jax.random.key(0), (2, 16, 6))
    mask = jnp.ones((2, 16), bool)
    key = jax.random.key(3)
    ref = clean(x, mask, train=False, rng=None)
    for out in (router(x, mask, train=False, rng=key), router(x, mask, train=False, rng=key),
                router(x, mask, train=True, rng=None)):
        np.testing.assert_array_equal(out.expert_GSK, ref.expert_GSK)
        np.testing.assert_allclose(out.gate_GSK, ref.gate_GSK, rtol=1e-6)
    a = router(x, mask, train=True, rng=key)
    b = router(x, mask, train=True, rng=jax.random.key(4))
    assert not np.allclose(a.gate_GSK, ref.gate_GSK)
    assert not np.allclose(a.gate_GSK, b.gate_GSK)


def np_noisy_top_k_reference(clean, std, eps, mask, k):
    """Shazeer et al. 2017, per token: keep top-k of H, softmax over them; losses over groups."""
    g_, s_, e_ = clean.shape
    expert, gate = np.zeros((g_, s_, k), int), np.zeros((g_, s_, k))
    norm_cdf = lambda v: 0.5 * (1.0 + math.erf(v / math.sqrt(2.0)))
    cv2 = lambda v: np.var(v) / (np.mean(v) ** 2 + 1e-10)
    losses = []
    for g in range(g_):
        importance, load = np.zeros(e_), np.zeros(e_)
        for s in range(s_):
            h = clean[g, s] + eps[g, s] * std[g, s]
            order = sorted(range(e_), key=lambda e: -h[e])[:k]
            expert[g, s] = order
            if not mask[g, s]:
                continue
            gate[g, s] = np_softmax(h[order])
            importance[order] += gate[g, s]
            for i in range(e_):
                others = sorted((h[j] for j in range(e_) if j != i), reverse=True)
                load[i] += norm_cdf((clean[g, s, i] - others[k - 1]) / std[g, s, i])
        if mask[g].any():
            losses.append(cv2(importance) + cv2(load))
    return expert, gate, np.mean(losses)


def test_noisy_top_k_matches_reference_given_the_noise():
    rng = np.random.default_rng(0)
    clean = rng.normal(size=(2, 5, 6))
    std = np.log1p(np.exp(rng.normal(size=(2, 5, 6))))
    eps = rng.normal(size=(2, 5, 6))
    mask = np.array([[True] * 5, [True, True, True, False, False]])
    out = R.noisy_top_k_routing(*(jnp.asarray(v, jnp.float32) for v in (clean, std, eps)),
                                jnp.asarray(mask), 2)
    expert, gate, loss = np_noisy_top_k_reference(clean, std, eps, mask, 2)
    np.testing.assert_array_equal(np.asarray(out.expert_GSK)[mask], expert[mask])
    np.testing.assert_allclose(out.gate_GSK, gate, atol=1e-6)
    np.testing.assert_allclose(out.losses['aux_loss'], loss, rtol=1e-4)


def test_expert_choice_picks_each_experts_top_c_tokens():
    rng = np.random.default_rng(1)
    logits = rng.normal(size=(2, 8, 4)).astype(np.float32)
    mask = np.ones((2, 8), bool)
    mask[1, 5:] = False
    router = identity_router(router='expert_choice', top_k=2)
    for c in (4, 8, 9):  # 9: clipped to S=8
        out = router(jnp.asarray(logits), jnp.asarray(mask), train=True, rng=None, capacity=c)
        c = min(c, 8)
        assert out.token_GEC.shape == (2, 4, c)
        for g in range(2):
            probs = np.stack([np_softmax(l) for l in logits[g].astype(np.float64)])
            for e in range(4):
                score = np.where(mask[g], probs[:, e], -1.0)
                want = np.argsort(-score, kind='stable')[:c]
                np.testing.assert_array_equal(out.token_GEC[g, e], want)
                want_gate = np.where(mask[g][want], probs[want, e], 0.0)
                np.testing.assert_allclose(out.gate_GEC[g, e], want_gate, atol=1e-6)
        assert float(out.losses['aux_loss']) == 0.0


def test_capacity_values():
    assert R.capacity(8, 4, 1, 1.0) == 2
    assert R.capacity(8, 4, 2, 1.0) == 4
    assert R.capacity(8, 4, 2, 1.25) == 5
    assert R.capacity(10, 4, 1, 1.0) == 3  # ceil(2.5)
    assert R.capacity(16, 8, 2, 1.1) == 5  # ceil(4.4)
    assert R.capacity(4, 64, 1, 1.0) == 1  # at least 1
    assert R.capacity(8, 2, 2, 4.0) == 8  # at most S: an expert gets each token at most once
    assert R.capacity(8, 4, 2, 0.0) == 8  # no drops
    assert R.capacity(8, 4, 2, -1.0) == 8


def test_updated_bias_formula():
    load = jnp.array([0.5, 0.25, 0.25, 0.0])
    np.testing.assert_allclose(R.updated_bias(jnp.zeros(4), load, 0.1), [-0.1, 0.0, 0.0, 0.1])


def test_bias_balancing_moves_load_toward_uniform():
    router = R.Router(8, moe_cfg(balance='bias', top_k=1), rngs=nnx.Rngs(0))
    # logits = x[:4] + (1.5, 0.5, 0, 0): a constant feature skews the router toward expert 0
    x = jax.random.normal(jax.random.key(0), (4, 64, 8)).at[..., 7].set(1.0)
    router.w_DE[...] = jnp.eye(8, 4).at[7].set(jnp.array([1.5, 0.5, 0.0, 0.0]))
    mask = jnp.ones((4, 64), bool)
    route = nnx.jit(lambda r, x: r(x, mask, train=True, rng=None))
    first = route(router, x)
    assert isinstance(router.expert_bias, R.ExpertBias)
    assert not isinstance(router.expert_bias, nnx.Param)
    for _ in range(50):
        out = route(router, x)
        router.expert_bias[...] = R.updated_bias(router.expert_bias[...],
                                                 out.stats['expert_load'], 0.01)
    last = route(router, x)
    assert float(jnp.max(first.stats['expert_load'])) > 0.6
    assert float(jnp.max(last.stats['expert_load'])) < 0.3
    assert float(router.expert_bias[0]) < 0.0  # the over-loaded expert was pushed down
    # gates stay the unbiased probs of the (bias-)chosen expert
    probs = jax.nn.softmax(jnp.einsum('gsd,de->gse', x, router.w_DE[...]), axis=-1)
    want = jnp.take_along_axis(probs, last.expert_GSK, axis=-1)
    np.testing.assert_allclose(last.gate_GSK, want, rtol=1e-6)
    assert float(last.losses['aux_loss']) == 0.0


def test_router_param_metadata_and_grad():
    router = R.Router(6, moe_cfg(router='noisy_top_k', top_k=2), rngs=nnx.Rngs(0))
    assert router.w_DE.out_sharding == ('embed', 'router')
    assert router.w_noise_DE.out_sharding == ('embed', 'router')
    x = jax.random.normal(jax.random.key(0), (2, 8, 6), jnp.bfloat16)
    mask = jnp.ones((2, 8), bool)

    def loss(r):
        out = r(x, mask, train=True, rng=jax.random.key(1))
        assert out.gate_GSK.dtype == jnp.float32
        return out.losses['aux_loss'] + out.losses['z_loss'] + jnp.sum(out.gate_GSK ** 2)
    grads = nnx.grad(loss)(router)
    assert np.all(np.isfinite(grads.w_DE[...])) and np.any(grads.w_DE[...] != 0)
    assert np.any(grads.w_noise_DE[...] != 0)


def test_sequence_wise_balance_loss_is_deepseek_v3s_per_sequence_formula():
    """DeepSeek-V3 eq. 17-20 by hand: per sequence (rows of T tokens, whatever the routing
    groups), f_i = E/(K T') x its tokens routed to i, P_i = mean of s_i / sum_j s_j over its T'
    real tokens, loss = sum_i f_i P_i, averaged over sequences; groups of 4 tokens here."""
    rng = np.random.default_rng(0)
    B, T, E, K = 3, 8, 6, 2
    logits_GSE = jnp.asarray(rng.normal(size=(B * T // 4, 4, E)), jnp.float32)
    mask = np.ones((B, T), bool)
    mask[1, 5:] = False  # padding at the end of a row
    route = R.top_k_routing(logits_GSE, jnp.asarray(mask.reshape(-1, 4)), K,
                                  balance='bias', conv=R.Conventions(score_fn='sigmoid'),
                                  seq_len=T)
    s = 1 / (1 + np.exp(-np.asarray(logits_GSE, np.float64).reshape(B, T, E)))
    chosen = np.asarray(route.expert_GSK).reshape(B, T, K)
    losses = []
    for b in range(B):
        real = mask[b]
        f = np.array([np.sum(chosen[b][real] == i) for i in range(E)]) * E / (K * real.sum())
        p = (s[b][real] / s[b][real].sum(-1, keepdims=True)).mean(0)
        losses.append(np.sum(f * p))
    np.testing.assert_allclose(route.losses['seq_aux_loss'], np.mean(losses), rtol=1e-5)
    plain = R.top_k_routing(logits_GSE, jnp.asarray(mask.reshape(-1, 4)), K, balance='bias',
                                  conv=R.Conventions(score_fn='sigmoid'))
    assert 'seq_aux_loss' not in plain.losses  # off by default: old runs' losses unchanged
