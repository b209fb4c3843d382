"""Routing decisions with a clear margin: the premise of every test that compares layouts.

A top-k choice, an expert-choice pick or a batch-prioritized capacity slot is a discrete
decision on float scores. Two layouts (meshes, engines, scan or not, micro-batches) compute those
scores with different rounding, and after a step or two with slightly different weights, so a
near-tie may break one way on one side and the other way on the other: the losses then differ by
far more than the tolerance, and by how much depends on the CPU (issue 28: an AMD EPYC rounds
differently from an Intel Xeon). Priority cannot be made layout-invariant: once a data-parallel
gradient is summed in another order the weights themselves differ by ulps.

So a comparison first records the reference side's decisions (`record()`), checks that each has
a clear margin (`assert_clear`: the gap to the nearest opposite decision is far above the noise
between layouts), and only then compares values. `perturbed(ulps)` moves one side's router
logits by a few ulps: a test whose verdict depends on rounding fails under it; one with clear
margins does not notice.

Margins are computed here in NumPy from the router's own inputs, independently of the code
under test: for top-k, the gap between each real token's k-th and (k+1)-th selection score; for
batch-prioritized capacity, the gap between the last kept and the first dropped assignment of
each expert when both have the same choice rank (GShard: all first choices rank before any
second choice, so only same-rank neighbours can trade places); for expert choice, the gap
between each expert's C-th and (C+1)-th token.
"""
import contextlib
from unittest import mock

import jax
import jax.numpy as jnp
import numpy as np

from moejax.moe import routing

# Scores differ between layouts by ~1e-7 after a few steps (float32 ulps of O(0.1) values,
# grown by a few optimizer steps); a margin 20x that is a decision no rounding can flip.
CLEAR_MARGIN = 2e-6
# `pytest --router_ulps=N` (conftest.py): layout sides nudge their router logits by N ulps.
LAYOUT_ULPS = 0


def topk_margin(select_GSE, mask_GS, k: int) -> float:
    """Smallest gap between a real token's k-th and (k+1)-th selection scores."""
    if select_GSE.shape[-1] <= k:
        return np.inf
    top_GSE = -np.sort(-select_GSE, axis=-1)
    gap_GS = top_GSE[..., k - 1] - top_GSE[..., k]
    gap_GS = np.where(np.isfinite(gap_GS), gap_GS, np.inf)  # group-limited -inf: no near-tie
    return float(np.min(gap_GS, where=mask_GS.astype(bool), initial=np.inf))


def priority_margin(expert_GSK, priority_GS, mask_GS, capacity: int) -> float:
    """Smallest gap at a capacity edge under batch-prioritized routing (module docstring)."""
    margin = np.inf
    for g in range(expert_GSK.shape[0]):
        for e in np.unique(expert_GSK[g]):
            rank_s, choice_s = np.nonzero((expert_GSK[g] == e) & mask_GS[g, :, None])
            if len(rank_s) <= capacity:
                continue
            # GShard order: by choice rank, then by descending priority
            order = np.lexsort((-priority_GS[g, rank_s], choice_s))
            last_kept, first_dropped = order[capacity - 1], order[capacity]
            if choice_s[last_kept] == choice_s[first_dropped]:
                gap = priority_GS[g, rank_s[last_kept]] - priority_GS[g, rank_s[first_dropped]]
                margin = min(margin, float(gap))
    return margin


def expert_choice_margin(probs_GSE, mask_GS, capacity: int) -> float:
    """Smallest gap between an expert's C-th and (C+1)-th real token."""
    probs_GES = np.where(mask_GS[:, None, :], np.swapaxes(probs_GSE, 1, 2), -1.0)
    if probs_GES.shape[-1] <= capacity:
        return np.inf
    top_GEC = -np.sort(-probs_GES, axis=-1)
    gap = top_GEC[..., capacity - 1] - top_GEC[..., capacity]
    return float(np.min(np.where(top_GEC[..., capacity] >= 0, gap, np.inf)))


class Recorder:
    """Margins of every routing decision made while `record()` was open (one per call)."""

    def __init__(self):
        self.margins: list[tuple[str, float]] = []

    def add(self, kind: str, value) -> None:
        self.margins.append((kind, float(value)))

    def smallest(self) -> tuple[str, float]:
        """The decision nearest a tie (('none', inf) for a model that routed nothing)."""
        return min(self.margins, key=lambda km: km[1], default=('none', np.inf))

    def assert_clear(self, margin: float = CLEAR_MARGIN) -> None:
        """The premise of a layout comparison: no decision within `margin` of a tie."""
        kind, value = self.smallest()
        assert value > margin, (
            f'premise failed: a {kind} decision is {value:.2e} from a tie (< {margin:.0e}), so '
            'layouts may round it either way; give this test inputs with a clear margin')


def on_host(fn, *arrays) -> None:
    """jax.debug.callback(fn, *arrays), fn given NumPy arrays: the callback hands it jax.Arrays,
    and every JAX op on those would be compiled on its own (hundreds in one layout test)."""
    jax.debug.callback(lambda *values: fn(*map(np.asarray, values)), *arrays)


def _record_top_k(recorder, capacity, original):
    def top_k_routing(logits_GSE, mask_GS, top_k, *, balance='aux_loss', bias_E=None,
                      conv=routing.Conventions(), seq_len=0):
        route = original(logits_GSE, mask_GS, top_k, balance=balance, bias_E=bias_E, conv=conv,
                         seq_len=seq_len)
        scores_GSE, _ = routing.router_scores(logits_GSE, conv.score_fn)
        select_GSE = scores_GSE if bias_E is None else scores_GSE + bias_E

        def host(select, expert, priority, mask):
            recorder.add('top-k', topk_margin(select, mask, top_k))
            if conv.batch_prioritized and capacity is not None:
                recorder.add('priority', priority_margin(expert, priority, mask, capacity))

        priority = route.priority_GS if route.priority_GS is not None else select_GSE[..., 0]
        on_host(host, select_GSE, route.expert_GSK, priority, mask_GS)
        return route
    return top_k_routing


def _record_noisy_top_k(recorder, original):
    def noisy_top_k_routing(clean_GSE, noise_std_GSE, eps_GSE, mask_GS, top_k, **kw):
        route = original(clean_GSE, noise_std_GSE, eps_GSE, mask_GS, top_k, **kw)
        noisy_GSE = clean_GSE if eps_GSE is None else clean_GSE + eps_GSE * noise_std_GSE
        on_host(lambda noisy, mask: recorder.add('top-k', topk_margin(noisy, mask, top_k)),
                noisy_GSE, mask_GS)
        return route
    return noisy_top_k_routing


def _record_expert_choice(recorder, original):
    def expert_choice_routing(logits_GSE, mask_GS, capacity_per_expert):
        route = original(logits_GSE, mask_GS, capacity_per_expert)
        on_host(lambda probs, mask: recorder.add('expert-choice', expert_choice_margin(
            probs, mask, capacity_per_expert)), jax.nn.softmax(logits_GSE, axis=-1), mask_GS)
        return route
    return expert_choice_routing


@contextlib.contextmanager
def record(capacity: int | None = None):
    """Records the margin of each top-k, noisy top-k and expert-choice routing traced inside the
    context (capacity: the slots per expert, for batch-prioritized edges; None: none checked)."""
    recorder = Recorder()
    wrappers = {'top_k_routing': _record_top_k(recorder, capacity, routing.top_k_routing),
                'noisy_top_k_routing': _record_noisy_top_k(recorder, routing.noisy_top_k_routing),
                'expert_choice_routing': _record_expert_choice(recorder,
                                                               routing.expert_choice_routing)}
    with contextlib.ExitStack() as stack:
        for name, wrapper in wrappers.items():
            stack.enter_context(mock.patch.object(routing, name, wrapper))
        yield recorder


def nudge(logits, ulps: int, seed: int = 0):
    """logits moved by `ulps` float steps, each element up or down at random."""
    up = jax.random.bernoulli(jax.random.key(seed), 0.5, logits.shape)
    target = jnp.where(up, jnp.inf, -jnp.inf).astype(logits.dtype)
    for _ in range(ulps):
        logits = jax.lax.nextafter(logits, target)
    return logits


@contextlib.contextmanager
def perturbed(ulps: int):
    """Every router's logits traced inside the context are nudged by `ulps` ulps."""
    originals = {name: getattr(routing, name) for name in
                 ('top_k_routing', 'noisy_top_k_routing', 'expert_choice_routing', 'soft_routing')}
    patches = [mock.patch.object(routing, name, lambda logits, *a, _f=fn, **kw:
                                 _f(nudge(logits, ulps), *a, **kw))
               for name, fn in originals.items()]
    with contextlib.ExitStack() as stack:
        for patch in patches:
            stack.enter_context(patch)
        yield
