"""Routers: which experts see which tokens, with what weight, and the balance losses.

Token-choice routers (top-k: Switch k=1, GShard k=2; noisy top-k: Shazeer et al. 2017) give
each token its k preferred experts; expert choice (Zhou et al. 2022) gives each expert its C
preferred tokens; soft routing weights every expert for every token. Everything here is float32.
Tokens are grouped (x_GSD) and mask_GS marks real tokens: padding is never routed and is left out
of every loss and statistic.

Where peers' conventions differ, `Conventions` picks one (the defaults: moejax's own):
softmax or sigmoid scores, raw or renormalised gates, DeepSeek-V3 group-limited selection
and scaling, batch-prioritized capacity (V-MoE), and the aux loss's normalisation (README table).
"""
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

ROUTERS = ('top_k', 'noisy_top_k', 'expert_choice', 'soft')
BALANCES = ('aux_loss', 'bias', 'none')
SCORE_FNS = ('softmax', 'sigmoid')
GATE_NORMS = ('auto', 'raw', 'renorm')
CAPACITY_RULES = ('gshard', 't5x')
AUX_LOSS_NORMS = ('assignments', 'tokens')


# Every routing carries losses (scalars 'aux_loss', unweighted, 0 if unused; 'z_loss'; with
# DeepSeek-V3's sequence-wise loss, 'seq_aux_loss') and stats ('expert_load' [E],
# 'router_entropy', 'top1_prob').

class TokenChoice(NamedTuple):
    """Top-k and noisy top-k: each token's k experts, best first, and their combine weights."""
    expert_GSK: jax.Array  # int32
    gate_GSK: jax.Array    # float32; 0 for masked tokens
    losses: dict
    stats: dict
    # Batch-prioritized routing (V-MoE): capacity slots go to tokens in descending order of this
    # score (their first choice's router score); None: in token order (GShard).
    priority_GS: jax.Array | None = None


class ExpertChoice(NamedTuple):
    """Expert choice: each expert's C tokens (indices in [0, S)) and their weights."""
    token_GEC: jax.Array  # int32
    gate_GEC: jax.Array   # float32; 0 for empty or masked slots
    losses: dict
    stats: dict


class Soft(NamedTuple):
    """Soft routing: every expert's weight for every token."""
    gate_GSE: jax.Array  # float32; 0 for masked tokens
    losses: dict
    stats: dict


Routing = TokenChoice | ExpertChoice | Soft


class Conventions(NamedTuple):
    """How a token-choice router scores, selects, weights and balances; the defaults are
    moejax's behaviour before these options existed (moe.* keys of the same names)."""
    score_fn: str = 'softmax'  # 'sigmoid': independent per-expert scores (DeepSeek-V3)
    gate_norm: str = 'auto'  # 'auto': renormalise the k gates when k > 1; 'raw'; 'renorm'
    routed_scaling_factor: float = 1.0  # gates are multiplied by it (DeepSeek-V3: 2.5)
    num_expert_groups: int = 0  # > 0: experts in this many groups (DeepSeek-V3 n_group)
    top_expert_groups: int = 0  # each token picks experts from its best groups only (topk_group)
    aux_loss_norm: str = 'assignments'  # f_e over k*n assignments; 'tokens': over n (T5X)
    batch_prioritized: bool = False  # V-MoE / flaxformer BPR: capacity by score, not position


def conventions(moe_cfg) -> Conventions:
    """The router conventions of a moe config."""
    return Conventions(**{k: moe_cfg[k] for k in Conventions._fields})


class ExpertBias(nnx.Variable):
    """Per-expert selection bias for auxiliary-loss-free balancing: state, not trained by grads."""


def capacity(group_size: int, num_experts: int, top_k: int, capacity_factor: float, *,
             rule: str = 'gshard', min_capacity: int = 1) -> int:
    """Expert slots per group, at least min_capacity, at most S.

    rule 'gshard' (GShard): ceil(S * k * factor / E); 't5x' (T5X/flaxformer): round(factor *
    S / E), without k, with Python's round as flaxformer has it (min_capacity 4 there). At most S
    because a token's k choices are distinct experts, so no expert can receive more than S
    assignments from a group; hence a capacity_factor <= 0 ('no drops') gives S.
    """
    if capacity_factor <= 0:
        return group_size
    if rule == 't5x':
        slots = round(capacity_factor * group_size / num_experts)
    else:
        slots = math.ceil(round(group_size * top_k * capacity_factor / num_experts, 6))
    return int(min(group_size, max(min_capacity, slots)))


def expert_capacity(moe_cfg, group_size: int, capacity_factor: float) -> int:
    """`capacity` with a moe config's num_experts, top_k, capacity_rule and min_capacity."""
    return capacity(group_size, moe_cfg.num_experts, moe_cfg.top_k, capacity_factor,
                    rule=moe_cfg.capacity_rule,
                    min_capacity=moe_cfg.min_capacity)


def updated_bias(bias_E: jax.Array, expert_load_E: jax.Array, rate: float) -> jax.Array:
    """DeepSeek-V3 bias update: raise the bias of under-loaded experts, lower over-loaded ones."""
    return bias_E + rate * jnp.sign(jnp.mean(expert_load_E) - expert_load_E)


def _real_mean(value_GS: jax.Array, mask_GS: jax.Array) -> jax.Array:
    """Mean of a per-token value over real tokens (0 when there are none)."""
    m = mask_GS.astype(jnp.float32)
    return jnp.sum(value_GS * m) / jnp.maximum(jnp.sum(m), 1.0)


def _group_mean(loss_G: jax.Array, mask_GS: jax.Array) -> jax.Array:
    """Mean of a per-group loss over the groups that hold at least one real token."""
    has_real_G = jnp.any(mask_GS, axis=-1).astype(jnp.float32)
    return jnp.sum(loss_G * has_real_G) / jnp.maximum(jnp.sum(has_real_G), 1.0)


def z_loss(logits_GSE: jax.Array, mask_GS: jax.Array) -> jax.Array:
    """ST-MoE router z-loss: mean over real tokens of logsumexp(logits)^2; keeps logits small."""
    return _real_mean(jax.nn.logsumexp(logits_GSE, axis=-1) ** 2, mask_GS)


def _prob_stats(probs_GSE: jax.Array, mask_GS: jax.Array, load_E: jax.Array) -> dict:
    """Router statistics over real tokens: load per expert, mean entropy, mean top-1 prob."""
    entropy_GS = jnp.sum(jax.scipy.special.entr(probs_GSE), axis=-1)
    return {'expert_load': load_E,
            'router_entropy': _real_mean(entropy_GS, mask_GS),
            'top1_prob': _real_mean(jnp.max(probs_GSE, axis=-1), mask_GS)}


def expert_counts(expert_GSK: jax.Array, weight_GS: jax.Array, num_experts: int) -> jax.Array:
    """[G, E]: each group's (token, choice) assignments per expert, weighted by their token's
    weight_GS. A scatter-add, O(G S K): a one-hot [G, S, K, E] would cost 64x more at 8x the
    experts and k (fine-grained experts), and dominated their routing time."""
    group_GSK = jnp.broadcast_to(jnp.arange(expert_GSK.shape[0])[:, None, None], expert_GSK.shape)
    weight_GSK = jnp.broadcast_to(weight_GS[..., None], expert_GSK.shape).astype(jnp.float32)
    counts_GE = jnp.zeros((expert_GSK.shape[0], num_experts), jnp.float32)
    return counts_GE.at[group_GSK, expert_GSK].add(weight_GSK)


def _assignment_load(expert_GSK: jax.Array, mask_GS: jax.Array, num_experts: int) -> jax.Array:
    """Fraction of real (token, choice) assignments per expert, before capacity (sums to 1)."""
    counts_E = jnp.sum(expert_counts(expert_GSK, mask_GS, num_experts), axis=0)
    return counts_E / jnp.maximum(jnp.sum(counts_E), 1.0)


def load_balancing_loss(probs_GSE, expert_GSK, mask_GS, norm: str = 'assignments') -> jax.Array:
    """Switch/GShard aux loss: mean over groups of E * sum_e f_e * P_e.

    Per group, over its real tokens: P_e = mean router prob of e, and f_e = (number of
    (token, choice) assignments to e) / (k * n) for norm='assignments' (DeepSeek-V3's
    sequence-wise loss; uniform routing gives 1 for any k), or / n for norm='tokens' (the
    fraction of tokens sent to e: Switch/ST-MoE in T5X/flaxformer, MaxText, HF Mixtral; uniform
    routing gives k). For k=1 the two agree. Groups without real tokens are left out.
    """
    num_experts, k = probs_GSE.shape[-1], expert_GSK.shape[-1]
    m_GS = mask_GS.astype(jnp.float32)
    n_G = jnp.maximum(jnp.sum(m_GS, axis=-1), 1.0)
    per_token = k if norm == 'assignments' else 1
    f_GE = expert_counts(expert_GSK, m_GS, num_experts) / (per_token * n_G[:, None])
    p_GE = jnp.sum(probs_GSE * m_GS[..., None], axis=1) / n_G[:, None]
    return _group_mean(num_experts * jnp.sum(f_GE * p_GE, axis=-1), mask_GS)


def router_scores(logits_GSE: jax.Array, score_fn: str) -> tuple[jax.Array, jax.Array]:
    """(scores, probs): softmax probs for both, or per-expert sigmoids and those normalised to
    sum to 1 over experts (DeepSeek-V3's balance-loss probabilities; also the statistics')."""
    if score_fn == 'softmax':
        probs_GSE = jax.nn.softmax(logits_GSE, axis=-1)
        return probs_GSE, probs_GSE
    scores_GSE = jax.nn.sigmoid(logits_GSE)
    return scores_GSE, scores_GSE / jnp.sum(scores_GSE, axis=-1, keepdims=True)


def node_limited(select_GSE: jax.Array, num_nodes: int, top_nodes: int) -> jax.Array:
    """DeepSeek-V3's node-limited routing (moe.num_expert_groups, moe.top_expert_groups): the
    experts sit on `num_nodes` nodes, E / num_nodes consecutive experts each (X: nodes, Y: their
    experts); scores outside each token's `top_nodes` best nodes become -inf. A node's score is
    the sum of its two best scores (its best if it has one expert)."""
    g, s, e = select_GSE.shape
    select_GSXY = select_GSE.reshape(g, s, num_nodes, e // num_nodes)
    best_GSX2, _ = jax.lax.top_k(select_GSXY, min(2, e // num_nodes))
    _, chosen_GST = jax.lax.top_k(jnp.sum(best_GSX2, axis=-1), top_nodes)
    keep_GSX = jnp.any(jax.nn.one_hot(chosen_GST, num_nodes, dtype=bool), axis=-2)
    return jnp.where(keep_GSX[..., None], select_GSXY, -jnp.inf).reshape(g, s, e)


def combine_weights(score_GSK: jax.Array, gate_norm: str, scale: float) -> jax.Array:
    """Gates from the chosen experts' scores: kept as they are ('raw': Switch, ST-MoE, T5X),
    divided by their sum ('renorm': Mixtral, DeepSeek-V3), or 'auto' (raw for k=1, renormalised
    for k>1, as moejax always did); then times the routed scaling factor."""
    renorm = gate_norm == 'renorm' or (gate_norm == 'auto' and score_GSK.shape[-1] > 1)
    if renorm:
        score_GSK = score_GSK / jnp.sum(score_GSK, axis=-1, keepdims=True)
    return score_GSK * scale if scale != 1.0 else score_GSK


def top_k_routing(logits_GSE, mask_GS, top_k: int, *, balance: str = 'aux_loss',
                  bias_E: jax.Array | None = None, conv: Conventions = Conventions(),
                  seq_len: int = 0) -> Routing:
    """Switch (k=1) / GShard (k>1) / DeepSeek-V3 routing: each token picks its top-k experts.

    Selection is by score (softmax prob or sigmoid), plus bias_E (DeepSeek-V3 loss-free
    balancing) if given, within the token's best expert groups if conv asks for groups. The
    bias shifts only the selection, never the gate: gates come from the unbiased scores
    (see combine_weights). With conv.batch_prioritized the first choice's score is the
    token's capacity priority. seq_len > 0 adds losses['seq_aux_loss'] (see sequence_wise_loss).
    """
    scores_GSE, probs_GSE = router_scores(logits_GSE, conv.score_fn)
    select_GSE = scores_GSE if bias_E is None else scores_GSE + bias_E
    if conv.num_expert_groups > 1:
        select_GSE = node_limited(select_GSE, conv.num_expert_groups, conv.top_expert_groups)
    _, expert_GSK = jax.lax.top_k(select_GSE, top_k)
    score_GSK = jnp.take_along_axis(scores_GSE, expert_GSK, axis=-1)
    gate_GSK = combine_weights(score_GSK, conv.gate_norm, conv.routed_scaling_factor)
    gate_GSK = gate_GSK * mask_GS[..., None]
    aux = (load_balancing_loss(probs_GSE, expert_GSK, mask_GS, conv.aux_loss_norm)
           if balance == 'aux_loss' else jnp.zeros((), jnp.float32))
    load_E = _assignment_load(expert_GSK, mask_GS, logits_GSE.shape[-1])
    priority_GS = score_GSK[..., 0] if conv.batch_prioritized else None
    losses = {'aux_loss': aux, 'z_loss': z_loss(logits_GSE, mask_GS)}
    if seq_len:
        losses['seq_aux_loss'] = sequence_wise_loss(probs_GSE, expert_GSK, mask_GS, seq_len)
    return TokenChoice(expert_GSK.astype(jnp.int32), gate_GSK, losses,
                       _prob_stats(probs_GSE, mask_GS, load_E), priority_GS)


def sequence_wise_loss(probs_GSE, expert_GSK, mask_GS, seq_len: int) -> jax.Array:
    """DeepSeek-V3's complementary sequence-wise balance loss (eq. 17-20), unweighted: mean over
    sequences of E * sum_e f_e P_e, f_e = E/(k T) x the sequence's assignments to e and P_e its
    mean normalised score, whatever the routing groups are (groups are consecutive tokens, so
    regrouping by rows of seq_len is a reshape). f counts the experts really chosen (bias and
    expert groups included), as Megatron-Core and torchtitan do; padding is left out."""
    E, K = probs_GSE.shape[-1], expert_GSK.shape[-1]
    return load_balancing_loss(probs_GSE.reshape(-1, seq_len, E),
                               expert_GSK.reshape(-1, seq_len, K),
                               mask_GS.reshape(-1, seq_len), 'assignments')


def _cv_squared(x_GE: jax.Array) -> jax.Array:
    """Squared coefficient of variation across experts, per group (Shazeer et al. 2017)."""
    mean_G = jnp.mean(x_GE, axis=-1)
    return jnp.var(x_GE, axis=-1) / (mean_G ** 2 + 1e-10)


def noisy_top_k_loss(clean_GSE, noisy_GSE, noise_std_GSE, gates_GSE, mask_GS, top_k):
    """Importance loss CV^2(sum of gates) + load loss CV^2(smooth load), over groups' real tokens.

    The smooth load of expert i is sum over tokens of P(i kept) = Phi((clean_i - threshold_i) /
    noise_std_i), threshold_i = k-th largest noisy logit among the other experts.
    """
    m_GS1 = mask_GS.astype(jnp.float32)[..., None]
    pad_GS1 = jnp.full(noisy_GSE.shape[:-1] + (1,), -jnp.inf, noisy_GSE.dtype)
    top_GSK1, _ = jax.lax.top_k(jnp.concatenate([noisy_GSE, pad_GS1], axis=-1), top_k + 1)
    kth_GS1, next_GS1 = top_GSK1[..., top_k - 1:top_k], top_GSK1[..., top_k:]
    threshold_GSE = jnp.where(noisy_GSE >= kth_GS1, next_GS1, kth_GS1)
    prob_kept_GSE = jax.scipy.stats.norm.cdf((clean_GSE - threshold_GSE) / noise_std_GSE)
    importance_GE = jnp.sum(gates_GSE * m_GS1, axis=1)
    load_GE = jnp.sum(prob_kept_GSE * m_GS1, axis=1)
    return _group_mean(_cv_squared(importance_GE) + _cv_squared(load_GE), mask_GS)


def noisy_top_k_routing(clean_GSE, noise_std_GSE, eps_GSE, mask_GS, top_k: int, *,
                        balance: str = 'aux_loss', batch_prioritized: bool = False) -> Routing:
    """Noisy top-k gating (Shazeer et al. 2017): H = clean + eps * noise_std; keep H's top-k.

    Gates are the softmax over the k kept noisy logits. eps_GSE=None means no noise (eval).
    Stats and z-loss use the clean logits. batch_prioritized: the first gate is the priority.
    """
    noisy_GSE = clean_GSE if eps_GSE is None else clean_GSE + eps_GSE * noise_std_GSE
    top_GSK, expert_GSK = jax.lax.top_k(noisy_GSE, top_k)
    gate_GSK = jax.nn.softmax(top_GSK, axis=-1)
    priority_GS = gate_GSK[..., 0] if batch_prioritized else None
    gate_GSK = gate_GSK * mask_GS[..., None]
    num_experts = clean_GSE.shape[-1]
    if balance == 'aux_loss':
        gates_GSE = jnp.sum(jax.nn.one_hot(expert_GSK, num_experts) * gate_GSK[..., None], 2)
        aux = noisy_top_k_loss(clean_GSE, noisy_GSE, noise_std_GSE, gates_GSE, mask_GS, top_k)
    else:
        aux = jnp.zeros((), jnp.float32)
    load_E = _assignment_load(expert_GSK, mask_GS, num_experts)
    probs_GSE = jax.nn.softmax(clean_GSE, axis=-1)
    return TokenChoice(expert_GSK.astype(jnp.int32), gate_GSK,
                       {'aux_loss': aux, 'z_loss': z_loss(clean_GSE, mask_GS)},
                       _prob_stats(probs_GSE, mask_GS, load_E), priority_GS)


def expert_choice_routing(logits_GSE, mask_GS, capacity_per_expert: int) -> Routing:
    """Expert choice (Zhou et al. 2022): each expert takes its top-C tokens by softmax prob.

    Padding tokens get selection score -1 so they are picked only when C exceeds the real
    tokens, and then with gate 0. C is clipped to S. No balance loss is needed (aux_loss 0).
    """
    num_tokens = logits_GSE.shape[1]
    probs_GSE = jax.nn.softmax(logits_GSE, axis=-1)
    probs_GES = jnp.swapaxes(probs_GSE, 1, 2)
    select_GES = jnp.where(mask_GS[:, None, :], probs_GES, -1.0)
    _, token_GEC = jax.lax.top_k(select_GES, min(capacity_per_expert, num_tokens))
    real_GEC = jnp.take_along_axis(mask_GS[:, None, :], token_GEC, axis=-1)
    gate_GEC = jnp.take_along_axis(probs_GES, token_GEC, axis=-1) * real_GEC
    counts_E = jnp.sum(real_GEC, axis=(0, 2)).astype(jnp.float32)
    load_E = counts_E / jnp.maximum(jnp.sum(counts_E), 1.0)
    return ExpertChoice(token_GEC.astype(jnp.int32), gate_GEC,
                        {'aux_loss': jnp.zeros((), jnp.float32),
                         'z_loss': z_loss(logits_GSE, mask_GS)},
                        _prob_stats(probs_GSE, mask_GS, load_E))


def soft_routing(logits_GSE, mask_GS) -> Routing:
    """Soft (dense) mixture: every expert sees every real token, weighted by its softmax prob.

    expert_load is the mean prob per expert over real tokens (the soft assignment).
    """
    probs_GSE = jax.nn.softmax(logits_GSE, axis=-1)
    gate_GSE = probs_GSE * mask_GS[..., None]
    m = mask_GS.astype(jnp.float32)
    load_E = jnp.sum(gate_GSE, axis=(0, 1)) / jnp.maximum(jnp.sum(m), 1.0)
    return Soft(gate_GSE,
                {'aux_loss': jnp.zeros((), jnp.float32), 'z_loss': z_loss(logits_GSE, mask_GS)},
                _prob_stats(probs_GSE, mask_GS, load_E))


class Router(nnx.Module):
    """Linear float32 router over the model dim, dispatching to the configured routing rule."""

    def __init__(self, d_model: int, moe_cfg, *, rngs: nnx.Rngs):
        if moe_cfg.router not in ROUTERS or moe_cfg.balance not in BALANCES:
            raise ValueError(f'router={moe_cfg.router!r} / balance={moe_cfg.balance!r}: '
                             f'allowed {ROUTERS} / {BALANCES}')
        self.num_experts, self.kind, self.top_k = moe_cfg.num_experts, moe_cfg.router, moe_cfg.top_k
        self.balance, self.jitter = moe_cfg.balance, float(moe_cfg.jitter)
        self.conv = conventions(moe_cfg)
        init = nnx.initializers.variance_scaling(0.1, 'fan_in', 'truncated_normal')
        shape_DE = (d_model, self.num_experts)
        self.w_DE = nnx.Param(init(rngs.params(), shape_DE, jnp.float32),
                              out_sharding=('embed', 'router'))
        if self.kind == 'noisy_top_k':  # zero init as in the paper: noise std softplus(0)
            self.w_noise_DE = nnx.Param(jnp.zeros(shape_DE, jnp.float32),
                                        out_sharding=('embed', 'router'))
        self.expert_bias = ExpertBias(jnp.zeros((self.num_experts,), jnp.float32))

    def __call__(self, x_GSD, mask_GS, *, train: bool, rng: jax.Array | None,
                 capacity: int = 0, seq_len: int = 0) -> Routing:
        """Route grouped tokens; noise (jitter, noisy top-k) only when train and rng is given.
        capacity: each expert's slots (expert choice). seq_len > 0 (top_k): also the
        sequence-wise balance loss over rows of that length."""
        x_GSD = x_GSD.astype(jnp.float32)
        if mask_GS is None:
            mask_GS = jnp.ones(x_GSD.shape[:2], bool)
        noisy = train and rng is not None
        if noisy:
            jitter_rng, noise_rng = jax.random.split(rng)
        if noisy and self.jitter > 0:
            x_GSD = x_GSD * jax.random.uniform(jitter_rng, x_GSD.shape, jnp.float32,
                                               1.0 - self.jitter, 1.0 + self.jitter)
        logits_GSE = jnp.einsum('gsd,de->gse', x_GSD, self.w_DE[...])
        if self.kind == 'top_k':
            bias_E = self.expert_bias[...] if self.balance == 'bias' else None
            return top_k_routing(logits_GSE, mask_GS, self.top_k, balance=self.balance,
                                 bias_E=bias_E, conv=self.conv, seq_len=seq_len)
        if self.kind == 'noisy_top_k':
            noise_std_GSE = jax.nn.softplus(jnp.einsum('gsd,de->gse', x_GSD, self.w_noise_DE[...]))
            eps_GSE = jax.random.normal(noise_rng, logits_GSE.shape) if noisy else None
            return noisy_top_k_routing(logits_GSE, noise_std_GSE, eps_GSE, mask_GS, self.top_k,
                                       balance=self.balance,
                                       batch_prioritized=self.conv.batch_prioritized)
        if self.kind == 'expert_choice':
            if capacity < 1:
                raise ValueError('expert choice needs each expert\'s capacity (slots >= 1)')
            return expert_choice_routing(logits_GSE, mask_GS, capacity)
        return soft_routing(logits_GSE, mask_GS)
