"""Dispatch engines against a NumPy loop reference of capacity dispatch, and against each other."""
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from moejax.moe import dispatch as D
from moejax.moe import experts, grouped
from moejax.moe.routing import Soft, TokenChoice, expert_choice_routing
from tests.helpers import route

nnx.use_eager_sharding(False)

ENGINES = ('einsum', 'sort', 'dropless')
G, S, DM, E, F = 2, 8, 4, 4, 6


def np_gelu(v):
    return 0.5 * v * (1.0 + np.tanh(math.sqrt(2.0 / math.pi) * (v + 0.044715 * v ** 3)))


def np_expert(w, e, x_D):
    """One expert's FFN on one token, float64."""
    w_in, w_gate, w_out = (None if a is None else np.asarray(a, np.float64)[e] for a in w)
    h = x_D @ w_in
    if w_gate is None:
        h = np_gelu(h)
    else:  # SwiGLU: silu(x @ w_gate) * (x @ w_in)
        g = x_D @ w_gate
        h = g / (1.0 + np.exp(-g)) * h
    return h @ w_out


def np_capacity_reference(x, mask, expert, gate, w, cap):
    """Per group: walk choices k-major, then tokens, giving each expert its first `cap` pairs."""
    g_, s_, k_ = expert.shape
    x = np.asarray(x, np.float64)
    y, kept = np.zeros(x.shape), np.zeros(expert.shape, bool)
    for g in range(g_):
        fill = [0] * w[0].shape[0]
        for k in range(k_):
            for s in range(s_):
                e = expert[g, s, k]
                if mask[g, s] and fill[e] < cap:
                    fill[e] += 1
                    kept[g, s, k] = True
                    y[g, s] += gate[g, s, k] * np_expert(w, e, x[g, s])
    return y, kept, 1.0 - kept.sum() / (mask.sum() * k_)


def make_weights(seed, swiglu, num_experts=E, dtype=jnp.float32):
    ks = jax.random.split(jax.random.key(seed), 3)
    w_in = jax.random.normal(ks[0], (num_experts, DM, F), dtype) / math.sqrt(DM)
    w_gate = jax.random.normal(ks[1], (num_experts, DM, F), dtype) / math.sqrt(DM)
    w_out = jax.random.normal(ks[2], (num_experts, F, DM), dtype) / math.sqrt(F)
    return experts.ExpertWeights(w_in, w_gate if swiglu else None, w_out)


def make_token_choice(seed, k, skew=True):
    """Random x, mask with padding, distinct expert choices per token (skewed to expert 0)."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(G, S, DM)).astype(np.float32)
    mask = np.ones((G, S), bool)
    mask[0, 2] = mask[1, 6:] = False
    p = np.array([0.55, 0.25, 0.1, 0.1]) if skew else np.full(E, 0.25)
    expert = np.stack([np.stack([rng.choice(E, k, replace=False, p=p) for _ in range(S)])
                       for _ in range(G)]).astype(np.int32)
    gate = rng.uniform(0.1, 1.0, size=(G, S, k)).astype(np.float32) * mask[..., None]
    return x, mask, expert, gate


def token_routing(expert, gate):
    return TokenChoice(jnp.asarray(expert), jnp.asarray(gate), {}, {})


@functools.partial(jax.jit, static_argnames=('engine', 'capacity'))
def run(x, mask, routing, w, *, engine, capacity):
    return D.dispatch_combine(x, mask, routing, w, engine=engine, capacity=capacity)


# Compiled whole, as run is (eager, JAX compiles each primitive on its own).
sorted_slots = jax.jit(D._sorted_slots, static_argnums=(2, 3))
left_behind = jax.jit(D.tokens_left_behind, static_argnames=('engine', 'capacity', 'num_experts'))
choose = jax.jit(expert_choice_routing, static_argnums=2)


@pytest.mark.parametrize('engine', ['einsum', 'sort'])
@pytest.mark.parametrize('k', [1, 2])
@pytest.mark.parametrize('swiglu', [False, True])
def test_capacity_engines_match_loop_reference_with_drops(engine, k, swiglu):
    x, mask, expert, gate = make_token_choice(k, k)
    w = make_weights(0, swiglu)
    cap = 2 if k == 1 else 3
    y_want, kept, dropped_want = np_capacity_reference(x, mask, expert, gate, w, cap)
    assert 0.0 < dropped_want < 0.7 and not kept[~mask].any()
    y, dropped = run(jnp.asarray(x), jnp.asarray(mask), token_routing(expert, gate), w,
                     engine=engine, capacity=cap)
    np.testing.assert_allclose(y, y_want, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(dropped, dropped_want, rtol=1e-6)
    # Which pairs dropped: with one pair's gate raised, only a kept pair changes the output.
    for g, s, kk in [(0, 5, k - 1), (1, 3, 0), (1, 7, 0)]:
        bumped = gate.copy()
        bumped[g, s, kk] += 1.0
        y2, _ = run(jnp.asarray(x), jnp.asarray(mask), token_routing(expert, bumped), w,
                    engine=engine, capacity=cap)
        changed = not np.allclose(y2[g, s], y[g, s], rtol=0, atol=1e-7)
        assert changed == kept[g, s, kk], (g, s, kk)


def test_hand_example_gshard_priority():
    # 1 group, 3 tokens, 2 experts, capacity 1, k=2: all first choices before any second.
    expert = np.array([[[1, 0], [0, 1], [1, 0]]], np.int32)
    gate = np.full((1, 3, 2), 0.5, np.float32)
    mask = np.ones((1, 3), bool)
    # first choices: t0->e1 (kept), t1->e0 (kept), t2->e1 (full); second choices all dropped.
    x = np.arange(1.0, 4.0, dtype=np.float32)[None, :, None] * np.ones((1, 3, DM), np.float32)
    w = make_weights(1, False, num_experts=2)
    for engine in ('einsum', 'sort'):
        y, dropped = run(jnp.asarray(x), jnp.asarray(mask), token_routing(expert, gate), w,
                         engine=engine, capacity=1)
        np.testing.assert_allclose(dropped, 4.0 / 6.0, rtol=1e-6)
        np.testing.assert_allclose(y[0, 0], 0.5 * np_expert(w, 1, x[0, 0]), rtol=1e-5)
        np.testing.assert_allclose(y[0, 1], 0.5 * np_expert(w, 0, x[0, 1]), rtol=1e-5)
        np.testing.assert_array_equal(y[0, 2], 0.0)


def grads_of(engine, x, mask, routing, w, cap):
    """Gradients of a scalar loss w.r.t. x, the gates and every expert weight."""
    probe = jax.random.normal(jax.random.key(7), x.shape)

    token_choice = isinstance(routing, TokenChoice)

    def loss(x, gate, w):
        r = routing._replace(gate_GSK=gate) if token_choice else routing._replace(gate_GEC=gate)
        y, _ = D.dispatch_combine(x, mask, r, w, engine=engine, capacity=cap)
        return jnp.sum(y * probe)
    gate = routing.gate_GSK if token_choice else routing.gate_GEC
    return jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(x, gate, w)


@pytest.mark.parametrize('swiglu', [False, True])
def test_engines_agree_without_drops_outputs_and_grads(swiglu):
    x, mask, expert, gate = make_token_choice(3, 2)
    w = make_weights(2, swiglu)
    y_want, kept, _ = np_capacity_reference(x, mask, expert, gate, w, S)
    assert kept[mask].all()
    args = (jnp.asarray(x), jnp.asarray(mask), token_routing(expert, gate), w)
    outs = {e: run(*args, engine=e, capacity=S) for e in ENGINES}
    grads = {e: grads_of(e, *args, S) for e in ENGINES}
    for e in ENGINES:
        np.testing.assert_allclose(outs[e][0], y_want, rtol=1e-5, atol=1e-6)
        assert float(outs[e][1]) == 0.0
        for a, b in zip(jax.tree.leaves(grads[e]), jax.tree.leaves(grads['einsum'])):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
    gx = np.asarray(grads['sort'][0])
    assert np.all(gx[~mask] == 0.0) and np.any(gx[mask] != 0.0)


def np_expert_choice_reference(x, mask, token, gate, w):
    x = np.asarray(x, np.float64)
    y = np.zeros(x.shape)
    for g in range(token.shape[0]):
        for e in range(token.shape[1]):
            for c in range(token.shape[2]):
                s = token[g, e, c]
                if mask[g, s]:
                    y[g, s] += gate[g, e, c] * np_expert(w, e, x[g, s])
    return y


@pytest.mark.parametrize('swiglu', [False, True])
def test_expert_choice_through_each_engine(swiglu):
    x, mask, _, _ = make_token_choice(5, 1)
    logits = np.random.default_rng(5).normal(size=(G, S, E)).astype(np.float32)
    routing = choose(jnp.asarray(logits), jnp.asarray(mask), 7)  # > real tokens
    token, gate = np.asarray(routing.token_GEC), np.asarray(routing.gate_GEC)
    assert not mask[1][token[1]].all()  # some slots hold padding (gate 0)
    routing = routing._replace(gate_GEC=jnp.asarray(gate + 0.3 * (gate > 0)))  # gates matter
    w = make_weights(3, swiglu)
    y_want = np_expert_choice_reference(x, mask, token, np.asarray(routing.gate_GEC), w)
    args = (jnp.asarray(x), jnp.asarray(mask), routing, w)
    grads = {e: grads_of(e, *args, 0) for e in ENGINES}
    for e in ENGINES:
        y, dropped = run(*args, engine=e, capacity=0)
        np.testing.assert_allclose(y, y_want, rtol=1e-5, atol=1e-6)
        assert float(dropped) == 0.0
        for a, b in zip(jax.tree.leaves(grads[e]), jax.tree.leaves(grads['einsum'])):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize('engine', ENGINES)
def test_soft_routing_matches_reference(engine):
    x, mask, _, _ = make_token_choice(6, 1)
    rng = np.random.default_rng(6)
    gate = rng.dirichlet(np.ones(E), size=(G, S)).astype(np.float32)
    w = make_weights(4, True)
    y_want = np.zeros(x.shape)
    for g in range(G):
        for s in range(S):
            if mask[g, s]:
                for e in range(E):
                    y_want[g, s] += gate[g, s, e] * np_expert(w, e, x[g, s].astype(np.float64))
    routing = Soft(jnp.asarray(gate), {}, {})
    y, dropped = run(jnp.asarray(x), jnp.asarray(mask), routing, w, engine=engine, capacity=1)
    np.testing.assert_allclose(y, y_want, rtol=1e-5, atol=1e-6)
    assert float(dropped) == 0.0


@pytest.mark.parametrize('engine', ENGINES)
@pytest.mark.parametrize('swiglu', [False, True])
def test_one_expert_with_gate_one_is_a_plain_ffn(engine, swiglu):
    x, mask, _, _ = make_token_choice(7, 1)
    w = make_weights(5, swiglu, num_experts=1)
    x64 = x.astype(np.float64)
    w_in, w_out = np.asarray(w.w_in_EDF[0], np.float64), np.asarray(w.w_out_EFD[0], np.float64)
    if swiglu:  # silu(x @ w_gate) * (x @ w_in)
        g = x64 @ np.asarray(w.w_gate_EDF[0], np.float64)
        h = g / (1.0 + np.exp(-g)) * (x64 @ w_in)
    else:
        h = np_gelu(x64 @ w_in)
    y_want = (h @ w_out) * mask[..., None]
    routing = token_routing(np.zeros((G, S, 1), np.int32), mask[..., None].astype(np.float32))
    y, dropped = run(jnp.asarray(x), jnp.asarray(mask), routing, w, engine=engine, capacity=S)
    np.testing.assert_allclose(y, y_want, rtol=1e-5, atol=1e-6)
    assert float(dropped) == 0.0


def test_expert_ffn_shapes_and_dtype():
    w = make_weights(6, True)
    x_ECD = jax.random.normal(jax.random.key(0), (E, 3, DM), jnp.bfloat16)
    y_ECD = jax.jit(experts.expert_ffn)(w, x_ECD)
    assert y_ECD.shape == (E, 3, DM) and y_ECD.dtype == jnp.bfloat16
    x, mask, expert, gate = make_token_choice(8, 2)
    for engine in ENGINES:
        y, _ = run(jnp.asarray(x, jnp.bfloat16), jnp.asarray(mask), token_routing(expert, gate),
                   w, engine=engine, capacity=4)
        assert y.dtype == jnp.bfloat16 and y.shape == (G, S, DM)


def test_unknown_engine_is_rejected():
    x, mask, expert, gate = make_token_choice(9, 1)
    with pytest.raises(ValueError, match='engine'):
        D.dispatch_combine(jnp.asarray(x), jnp.asarray(mask), token_routing(expert, gate),
                           make_weights(0, False), engine='magic', capacity=2)


@pytest.mark.parametrize('blocks, swiglu', [((4, 2), False), ((8, 4, 1), True)])
def test_fast_engines_with_several_cpu_block_sizes(blocks, swiglu, monkeypatch):
    """Big blocks, tail blocks and padding of the CPU block loops, through sort and dropless."""
    x, mask, expert, gate = make_token_choice(11, 2)
    w = make_weights(12, swiglu)
    args = (jnp.asarray(x), jnp.asarray(mask), token_routing(expert, gate), w)
    monkeypatch.setattr(grouped, 'MIN_BLOCK', 10 ** 9)  # the reference: einsums throughout
    want = grads_of('einsum', *args, S)
    monkeypatch.setattr(grouped, 'CPU_BLOCKS', blocks)
    monkeypatch.setattr(grouped, 'MIN_BLOCK', 1)
    for cap in (3, S):  # with drops (sort only) and without
        y_want, _, dropped_want = np_capacity_reference(x, mask, expert, gate, w, cap)
        y, dropped = jax.jit(functools.partial(D.dispatch_combine, engine='sort',
                                               capacity=cap))(*args)
        np.testing.assert_allclose(y, y_want, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(dropped, dropped_want, rtol=1e-6)
    y, _ = jax.jit(functools.partial(D.dispatch_combine, engine='dropless', capacity=0))(*args)
    np.testing.assert_allclose(y, y_want, rtol=1e-5, atol=1e-6)
    for engine in ('sort', 'dropless'):
        for a, b in zip(jax.tree.leaves(grads_of(engine, *args, S)), jax.tree.leaves(want)):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


# ------------------------------------------- batch-prioritized slots and both drop metrics

def flaxformer_logits(tokens, num_experts=4):
    """Logits whose softmax gives each token the stated top choices: tokens[g][s] lists
    (expert, prob) best first; the other experts share what is left equally (all lower)."""
    out = np.zeros((len(tokens), len(tokens[0]), num_experts))
    for g, group in enumerate(tokens):
        for s, choices in enumerate(group):
            p = np.full(num_experts, (1 - sum(q for _, q in choices))
                        / (num_experts - len(choices)))
            for e, q in choices:
                p[e] = q
            assert sorted(p, reverse=True)[:len(choices)] == [q for _, q in choices]
            out[g, s] = np.log(p)
    return out


# flaxformer routing_test.py, TokensChooseScatterRouter (G=2, S=4, E=4, capacity 2). Published:
# each token's top-1 probability (its combine weight when kept) and dispatch_indices (expert,
# slot). Probabilities of choices that were dropped are not published; these stand-ins keep
# the published order (a dropped first choice ranks below the kept ones of its expert).
TOP1 = [[[(2, .25390625), (3, .2505)], [(3, .2578125), (2, .2505)],
         [(2, .25585938), (3, .25390625)], [(2, .252), (0, .25)]],
        [[(3, .2578125), (2, .2505)], [(2, .25390625), (3, .2505)],
         [(3, .25585938), (2, .2505)], [(2, .25585938), (3, .2505)]]]


FLAXFORMER_SLOTS = {
    # test_tokens_choose_one_expert_scatter_router(_no_bpr): k=1
    (1, True): [[[[2, 1]], [[3, 0]], [[2, 0]], [[2, 2]]],
                [[[3, 0]], [[2, 1]], [[3, 1]], [[2, 0]]]],
    (1, False): [[[[2, 0]], [[3, 0]], [[2, 1]], [[2, 2]]],
                 [[[3, 0]], [[2, 0]], [[3, 1]], [[2, 1]]]],
    # test_tokens_choose_multiple_experts_scatter_router: k=2, batch-prioritized
    (2, True): [[[[2, 1], [3, 2]], [[3, 0], [2, 3]], [[2, 0], [3, 1]], [[2, 2], [0, 0]]],
                [[[3, 0], [2, 2]], [[2, 1], [3, 3]], [[3, 1], [2, 3]], [[2, 0], [3, 2]]]],
}


FLAXFORMER_WEIGHTS = {  # combine weights: raw top-k probabilities, 0 where dropped
    1: [[[.25390625], [.2578125], [.25585938], [0.]],
        [[.2578125], [.25390625], [.25585938], [.25585938]]],
    2: [[[.25390625, 0.], [.2578125, 0.], [.25585938, .25390625], [0., .25]],
        [[.2578125, 0.], [.25390625, 0.], [.25585938, 0.], [.25585938, 0.]]],
}


def buffers_of(engine, routing, capacity, num_experts=4):
    """Which token fills each (expert, slot) of each group's capacity buffer (-1: empty), read
    from the buffers an engine hands to the experts (x = one-hot token ids)."""
    g, s = routing.expert_GSK.shape[:2]
    x_GSD = jnp.broadcast_to(jnp.eye(s, dtype=jnp.float32), (g, s, s))

    def handed_to_experts(routing):  # compiled whole: the buffers come back as its output
        seen = []

        def recording_experts(w, x_GECD):
            seen.append(x_GECD)
            return jnp.zeros_like(x_GECD)
        w = experts.ExpertWeights(jnp.zeros((num_experts, s, 1)), None,
                                  jnp.zeros((num_experts, 1, s)))
        D.dispatch_combine(x_GSD, None, routing, w, engine=engine, capacity=capacity,
                           experts=recording_experts, num_experts=num_experts)
        return seen[0]
    x_GECS = np.asarray(jax.jit(handed_to_experts)(routing))
    return np.where(x_GECS.sum(-1) > 0, x_GECS.argmax(-1), -1)


def expected_buffers(slots, capacity, num_experts=4):
    """The (expert, slot) -> token table that flaxformer's dispatch_indices describe."""
    slots = np.asarray(slots)
    table = np.full((slots.shape[0], num_experts, capacity), -1)
    for g, s, k in np.ndindex(slots.shape[:3]):
        e, c = slots[g, s, k]
        if c < capacity:
            table[g, e, c] = s
    return table


@pytest.mark.parametrize('k,bpr', [(1, True), (1, False), (2, True)])
def test_flaxformer_batch_prioritized_slots(k, bpr):
    """Hand check of the k=2 case, group 0 (top-1 probs t1 .2578 > t2 .2559 > t0 .2539 > t3):
    first choices in that order: t1->e3 slot 0, t2->e2 0, t0->e2 1, t3->e2 2 (full: dropped);
    then second choices, same order: t1->e2 3 (dropped), t2->e3 1, t0->e3 2 (dropped),
    t3->e0 0 -- flaxformer's published indices. Without priority, position order instead."""
    r = route(flaxformer_logits(TOP1), k=k, gate_norm='raw', batch_prioritized=bpr)
    want = np.asarray(FLAXFORMER_SLOTS[(k, bpr)])
    np.testing.assert_array_equal(r.expert_GSK, want[..., 0])
    pos_GSK, keep_GSK, *_ = sorted_slots(r.expert_GSK, jnp.ones((2, 4), bool), 4, 2,
                                         r.priority_GS)
    np.testing.assert_array_equal(pos_GSK, want[..., 1])
    np.testing.assert_array_equal(keep_GSK, want[..., 1] < 2)
    for engine in ('einsum', 'sort'):
        np.testing.assert_array_equal(buffers_of(engine, r, 2), expected_buffers(want, 2),
                                      err_msg=engine)
    if bpr:
        np.testing.assert_allclose(r.gate_GSK * keep_GSK, FLAXFORMER_WEIGHTS[k], atol=2e-6)


def test_batch_priority_is_per_group_and_ignores_padding():
    """S=4, every token sent to one expert with capacity 2, group 0 padded at token 2 (its
    best score): the slots go to the two best real tokens; group 1 is ordered on its own."""
    logits = np.log(np.array([[[.2, .8], [.9, .1], [.05, .95], [.3, .7]],
                              [[.4, .6], [.45, .55], [.1, .9], [.35, .65]]]))
    mask = jnp.asarray([[True, True, False, True], [True] * 4])
    r = route(logits, k=1, mask=mask, batch_prioritized=True)
    assert r.expert_GSK[0, 1, 0] == 0 and (r.expert_GSK.ravel() == 1).sum() == 7
    routing = r._replace(expert_GSK=jnp.ones_like(r.expert_GSK))  # all to expert 1 of 2
    _, keep_GSK, *_ = sorted_slots(routing.expert_GSK, mask, 2, 2, r.priority_GS)
    # group 0 real scores (top-1 prob): t0 .8, t1 .9, t3 .7 -> t1, t0 kept; group 1: t2 .9, t3 .65
    np.testing.assert_array_equal(keep_GSK[..., 0], [[1, 1, 0, 0], [0, 0, 1, 1]])


def test_dropped_assignments_and_tokens_left_behind_hand_example():
    """S=3 tokens all choosing (e0, e1), capacity 1, one padded token added: t0 takes both
    slots; t1, t2 get none: 4 of 6 assignments dropped, 2 of 3 tokens left behind."""
    expert = jnp.asarray([[[0, 1], [0, 1], [0, 1], [1, 0]]], jnp.int32)
    gate = jnp.full((1, 4, 2), 0.5)
    mask = jnp.asarray([[True, True, True, False]])
    r = TokenChoice(expert, gate, {}, {})
    w = experts.ExpertWeights(jnp.ones((2, 3, 5)), None, jnp.ones((2, 5, 3)))
    x = jnp.ones((1, 4, 3))
    for engine in ('einsum', 'sort'):
        _, dropped = run(x, mask, r, w, engine=engine, capacity=1)
        np.testing.assert_allclose(dropped, 4 / 6, rtol=1e-6)
        left = left_behind(mask, r, engine=engine, capacity=1, num_experts=2)
        np.testing.assert_allclose(left, 2 / 3, rtol=1e-6)
    assert float(left_behind(mask, r, engine='dropless', capacity=1, num_experts=2)) == 0
    # Batch priority t2 > t1 > t0: t2 takes both slots instead; still 2 of 3 left behind.
    bpr = r._replace(priority_GS=jnp.asarray([[0.1, 0.2, 0.3, 0.9]]))
    _, keep, *_ = sorted_slots(expert, mask, 2, 1, bpr.priority_GS)
    np.testing.assert_array_equal(keep, [[[0, 0], [0, 0], [1, 1], [0, 0]]])
    np.testing.assert_allclose(left_behind(mask, bpr, engine='sort', capacity=1,
                                           num_experts=2), 2 / 3, rtol=1e-6)


def test_tokens_left_behind_under_expert_choice():
    """E=2 experts each take their top-1 of 3 tokens: e0 takes t1 (.6), e1 takes t2 (.55), so
    t0 is picked by none: 1 of 3 left behind. With t2 padding, e1 takes t0: none left behind."""
    logits = jnp.log(jnp.asarray([[[.5, .5], [.6, .4], [.45, .55]]]))
    probs = jax.nn.softmax(logits, -1)
    assert probs[0, 1, 0] > probs[0, 0, 0] and probs[0, 2, 1] > probs[0, 0, 1]
    r = choose(logits, jnp.ones((1, 3), bool), 1)  # t1 for e0, t2 for e1
    left = left_behind(jnp.ones((1, 3), bool), r, engine='sort', capacity=1, num_experts=2)
    np.testing.assert_allclose(left, 1 / 3, rtol=1e-6)
    mask = jnp.asarray([[True, True, False]])
    r = choose(logits, mask, 1)  # e1 then takes t0 (t2 is padding)
    np.testing.assert_allclose(left_behind(mask, r, engine='sort', capacity=1, num_experts=2),
                               0.0, atol=1e-7)
