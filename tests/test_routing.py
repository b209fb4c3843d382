"""Routers against hand-written NumPy references (loops), on tiny shapes."""
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from moejax.moe import routing as R
from tests.helpers import jitted, moe_cfg, route

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
    out = jitted(train=True, rng=None)(router, jnp.asarray(LOGITS), jnp.asarray(MASK))
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
    out = jitted(train=False, rng=None)(router, jnp.asarray(logits), jnp.ones((1, 2), bool))
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
    call = jitted(train=False, rng=None, capacity=2)
    a = call(router, x, jnp.asarray(MASK))
    b = call(router, other, jnp.asarray(MASK))
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
        out = jitted(train=True, rng=None, capacity=2)(identity_router(router=kind),
                                                       jnp.asarray(LOGITS), jnp.asarray(MASK))
        _, z = np_aux_and_z(LOGITS.astype(np.float64), MASK, np.zeros((2, 4, 1), int), 1)
        assert float(out.losses['aux_loss']) == 0.0
        np.testing.assert_allclose(out.losses['z_loss'], z, rtol=1e-5)


def test_soft_gates_are_probs():
    out = jitted(train=True, rng=None)(identity_router(router='soft'), jnp.asarray(LOGITS),
                                       jnp.asarray(MASK))
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
    evaluate, train = jitted(train=False), jitted(train=True)
    ref = evaluate(clean, x, mask, rng=None)
    for out in (evaluate(router, x, mask, rng=key), evaluate(router, x, mask, rng=key),
                train(router, x, mask, rng=None)):
        np.testing.assert_array_equal(out.expert_GSK, ref.expert_GSK)
        np.testing.assert_allclose(out.gate_GSK, ref.gate_GSK, rtol=1e-6)
    a = train(router, x, mask, rng=key)
    b = train(router, x, mask, rng=jax.random.key(4))
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
    out = jax.jit(R.noisy_top_k_routing, static_argnums=4)(
        *(jnp.asarray(v, jnp.float32) for v in (clean, std, eps)), jnp.asarray(mask), 2)
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
        out = jitted(train=True, rng=None, capacity=c)(router, jnp.asarray(logits),
                                                       jnp.asarray(mask))
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
    grads = nnx.jit(nnx.grad(loss))(router)
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
    top_k = functools.partial(R.top_k_routing, top_k=K, balance='bias',
                              conv=R.Conventions(score_fn='sigmoid'))
    route = jax.jit(functools.partial(top_k, seq_len=T))(logits_GSE,
                                                         jnp.asarray(mask.reshape(-1, 4)))
    s = 1 / (1 + np.exp(-np.asarray(logits_GSE, np.float64).reshape(B, T, E)))
    chosen = np.asarray(route.expert_GSK).reshape(B, T, K)
    losses = []
    for b in range(B):
        real = mask[b]
        f = np.array([np.sum(chosen[b][real] == i) for i in range(E)]) * E / (K * real.sum())
        p = (s[b][real] / s[b][real].sum(-1, keepdims=True)).mean(0)
        losses.append(np.sum(f * p))
    np.testing.assert_allclose(route.losses['seq_aux_loss'], np.mean(losses), rtol=1e-5)
    plain = jax.jit(top_k)(logits_GSE, jnp.asarray(mask.reshape(-1, 4)))
    assert 'seq_aux_loss' not in plain.losses  # off by default: old runs' losses unchanged


# ------------------------------- peers' conventions: gates, scores, DeepSeek-V3, the aux loss

def test_noisy_top_k_priority_is_its_first_gate():
    """Noise is off at eval: the gates are the softmax over the kept logits (2, 1): .731, .269;
    the priority is the first (.731 and, for logits (0, 3), .953), or None without BPR."""
    logits = [[[2.0, 1.0, 0.0, -1.0], [0.0, 3.0, -1.0, -2.0]]]
    r = route(logits, k=2, router='noisy_top_k', batch_prioritized=True)
    np.testing.assert_allclose(r.priority_GS, [[1 / (1 + math.exp(-1)), 1 / (1 + math.exp(-3))]],
                               rtol=1e-6)
    assert route(logits, k=2, router='noisy_top_k').priority_GS is None


LOGITS_1 = np.log(np.array([[[0.5, 0.3, 0.15, 0.05]]]))


@pytest.mark.parametrize('norm,k,want', [
    ('auto', 1, [0.5]), ('auto', 2, [0.625, 0.375]),      # renormalised only for k > 1
    ('raw', 1, [0.5]), ('raw', 2, [0.5, 0.3]),            # Switch / ST-MoE / flaxformer
    ('renorm', 1, [1.0]), ('renorm', 2, [0.625, 0.375]),  # Mixtral, DeepSeek-V3
])
def test_gate_norm_hand_values(norm, k, want):
    r = route(LOGITS_1, k=k, gate_norm=norm)
    np.testing.assert_array_equal(r.expert_GSK[0, 0], [0, 1][:k])
    np.testing.assert_allclose(r.gate_GSK[0, 0], want, rtol=1e-6)


def test_sigmoid_scores_hand_values():
    """sigmoid(ln 3) = .75, sigmoid(0) = .5, sigmoid(-ln 3) = .25: the gates are the scores
    ('raw') or .75/1.25, .5/1.25; statistics use the scores normalised over experts."""
    logits = [[[0.0, math.log(3), -math.log(3), -math.log(9)]]]  # scores .5 .75 .25 .1
    raw = route(logits, k=2, score_fn='sigmoid', gate_norm='raw')
    np.testing.assert_array_equal(raw.expert_GSK[0, 0], [1, 0])
    np.testing.assert_allclose(raw.gate_GSK[0, 0], [0.75, 0.5], rtol=1e-6)
    norm = route(logits, k=2, score_fn='sigmoid', routed_scaling_factor=2.0)
    np.testing.assert_allclose(norm.gate_GSK[0, 0], [1.2, 0.8], rtol=1e-6)
    np.testing.assert_allclose(norm.stats['top1_prob'], 0.75 / 1.6, rtol=1e-6)


def np_deepseek_v3_gate(logits, bias, n_group, topk_group, k, scale):
    """DeepSeek-V3's published gate (inference/model.py Gate.forward, sigmoid scoring, with the
    selection bias), as a loop: group score = sum of its top-2 biased scores; masked groups -inf;
    top-k of the biased scores; weights = unbiased scores of the chosen, normalised, scaled."""
    experts, weights = [], []
    for x in logits.reshape(-1, logits.shape[-1]):
        s = 1 / (1 + np.exp(-x.astype(np.float64)))
        sel = (s + bias).reshape(n_group, -1)
        group_score = np.sort(sel, axis=-1)[:, -2:].sum(-1)
        best = np.argsort(-group_score, kind='stable')[:topk_group]
        sel = np.where(np.isin(np.arange(n_group), best)[:, None], sel, -np.inf).ravel()
        idx = np.argsort(-sel, kind='stable')[:k]
        experts.append(idx)
        weights.append(s[idx] / s[idx].sum() * scale)
    shape = logits.shape[:-1] + (k,)
    return np.reshape(experts, shape), np.reshape(weights, shape)


def deepseek(logits, bias=None, **overrides):
    conv = dict(k=2, score_fn='sigmoid', gate_norm='renorm', routed_scaling_factor=2.5,
                num_expert_groups=4, top_expert_groups=2, balance='bias')
    conv.update(overrides)
    logits = jnp.asarray(logits, jnp.float32)
    router = R.Router(8, moe_cfg(num_experts=8, top_k=conv.pop('k'), **conv), rngs=nnx.Rngs(0))
    router.w_DE[...] = jnp.eye(8)
    if bias is not None:
        router.expert_bias[...] = jnp.asarray(bias, jnp.float32)
    return jitted(train=False, rng=None)(router, logits, None)


def logit(p):
    p = np.asarray(p, np.float64)
    return np.log(p / (1 - p))


SCORES = [0.9, 0.1, 0.6, 0.65, 0.55, 0.55, 0.2, 0.3]  # 4 groups of 2 experts


def test_deepseek_v3_group_limited_hand_values():
    """Group scores (top-2 sums) 1.0, 1.25, 1.1, 0.5: groups 1 and 2 win, so expert 0 (the best
    score, 0.9) is out of reach; top-2 of experts 2..5: e3 (.65), e2 (.6); weights .65/1.25 and
    .6/1.25, times 2.5 = 1.3, 1.2. Without groups: e0, e3."""
    r = deepseek(logit([[SCORES]]))
    np.testing.assert_array_equal(r.expert_GSK[0, 0], [3, 2])
    np.testing.assert_allclose(r.gate_GSK[0, 0], [1.3, 1.2], rtol=1e-5)
    free = deepseek(logit([[SCORES]]), num_expert_groups=0, top_expert_groups=0)
    np.testing.assert_array_equal(free.expert_GSK[0, 0], [0, 3])
    np.testing.assert_allclose(free.gate_GSK[0, 0], [2.5 * .9 / 1.55, 2.5 * .65 / 1.55], rtol=1e-5)


def test_deepseek_v3_bias_selects_but_does_not_weight():
    """Bias +.3, +.2 on experts 4, 5: biased group 2 = .85 + .75 = 1.6 beats group 1 (1.25);
    the top-2 biased scores are e4 (.85), e5 (.75); their weights come from the unbiased
    scores .55, .55: 1.25 each."""
    bias = [0, 0, 0, 0, 0.3, 0.2, 0, 0]
    r = deepseek(logit([[SCORES]]), bias=bias)
    np.testing.assert_array_equal(r.expert_GSK[0, 0], [4, 5])
    np.testing.assert_allclose(r.gate_GSK[0, 0], [1.25, 1.25], rtol=1e-5)


def test_deepseek_v3_matches_published_gate_on_random_logits():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(3, 5, 8)) * 2
    bias = rng.normal(size=8) * 0.3
    for n_group, topk_group, k in [(4, 2, 2), (2, 1, 3), (8, 3, 2), (4, 4, 4)]:
        r = deepseek(logits, bias=bias, k=k, num_expert_groups=n_group,
                     top_expert_groups=topk_group)
        want_e, want_w = np_deepseek_v3_gate(logits, bias, n_group, topk_group, k, 2.5)
        np.testing.assert_array_equal(r.expert_GSK, want_e)
        np.testing.assert_allclose(r.gate_GSK, want_w, rtol=1e-5)


def test_t5x_capacity_rule_hand_values():
    t5x = lambda s, e, k, cf, m=1: R.capacity(s, e, k, cf, rule='t5x', min_capacity=m)
    assert t5x(512, 8, 1, 1.25) == 80            # round(1.25 * 512 / 8)
    assert t5x(512, 8, 2, 1.25) == 80            # no k: GShard's rule gives 160
    assert R.capacity(512, 8, 2, 1.25) == 160
    assert t5x(10, 4, 1, 1.0) == 2               # round(2.5) = 2 (half to even); GShard ceil: 3
    assert t5x(14, 4, 1, 1.0) == 4               # round(3.5) = 4
    assert t5x(8, 4, 2, 1.0, m=4) == 4           # min_expert_capacity (flaxformer configs: 4)
    assert t5x(2, 4, 1, 1.0, m=4) == 2           # never more than the group
    assert t5x(8, 4, 2, 0.0) == 8                # no drops
    assert R.capacity(8, 4, 1, 1.0, min_capacity=3) == 3


def test_aux_loss_norm_uniform_routing():
    """Uniform probs, every expert chosen equally often: E * sum_e f_e P_e is 1 when f counts
    assignments (k per token) and k when f counts tokens (ST-MoE/T5X)."""
    e, s = 4, 8
    probs = jnp.full((1, s, e), 1 / e)
    mask = jnp.ones((1, s), bool)
    balance_loss = jax.jit(R.load_balancing_loss, static_argnums=3)
    for k in (1, 2, 4):
        expert = jnp.asarray([[[(t + j) % e for j in range(k)] for t in range(s)]])
        assert float(balance_loss(probs, expert, mask)) == pytest.approx(1.0)
        assert float(balance_loss(probs, expert, mask, 'tokens')) == pytest.approx(k)


def test_aux_loss_norm_hand_values_through_the_router():
    """E=2, S=2, k=1 with probs (.8, .2) and (.3, .7): f = (.5, .5), P = (.55, .45), so
    2 * (.5 * .55 + .5 * .45) = 1 under both norms; k=2 picks both experts for every token:
    f_tokens = (1, 1) gives 2 * (.55 + .45) = 2, f_assignments = (.5, .5) gives 1."""
    logits = np.log([[[.8, .2], [.3, .7]]])
    for k, tokens_want in ((1, 1.0), (2, 2.0)):
        a = route(logits, k=k)
        t = route(logits, k=k, aux_loss_norm='tokens')
        assert float(a.losses['aux_loss']) == pytest.approx(1.0, rel=1e-6)
        assert float(t.losses['aux_loss']) == pytest.approx(tokens_want, rel=1e-6)


def test_flaxformer_published_load_balancing_loss():
    """flaxformer routing_test.test_load_balancing_loss: 5 tokens, 2 experts, k=1, inputs from
    PRNGKey(0) with the (then default) non-partitionable threefry; published value 0.8741045."""
    saved = jax.config.jax_threefry_partitionable
    jax.config.update('jax_threefry_partitionable', False)
    try:
        rng = jax.random.PRNGKey(0)
        probs = jax.random.uniform(rng, (5, 2), minval=0, maxval=1)
        expert = jax.random.randint(rng, (5, 1), minval=0, maxval=2)
    finally:
        jax.config.update('jax_threefry_partitionable', saved)
    for norm in R.AUX_LOSS_NORMS:  # k=1: the two conventions agree
        loss = R.load_balancing_loss(probs[None], expert[None], jnp.ones((1, 5), bool), norm)
        np.testing.assert_allclose(loss, 0.8741045, rtol=1e-6)
