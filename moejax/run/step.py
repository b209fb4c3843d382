"""The pure train step: loss, gradients over micro-batches, the guarded update; compiled.

Everything random derives from (seed, step), so a resumed run repeats the uninterrupted run bit
for bit. The step is a pure function of (state, batch): the loop (moejax.run.loop) owns the rest.
"""
import functools

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from moejax import mesh as mesh_lib
from moejax import optim
from moejax.run import evaluate as evaluate_lib
from moejax.run.state import Setup, TrainState


def loss_parts(logits_BTV, batch, stats, num_tokens) -> dict:
    """Token-summed NLL / num_tokens, and the balance and z losses summed over MoE layers."""
    nll = evaluate_lib.nll_sum(logits_BTV, batch['targets'], batch['segment_ids'])
    aux = jnp.sum(stats['aux_loss']) if stats else 0.0
    z = jnp.sum(stats['z_loss']) if stats else 0.0
    parts = {'ce_loss': nll / num_tokens, 'aux_loss': aux, 'z_loss': z}
    if 'seq_aux_loss' in stats:  # moe.seq_aux_loss_weight > 0
        parts['seq_aux_loss'] = jnp.sum(stats['seq_aux_loss'])
    return parts


def mtp_parts(heads, num_tokens, weight: float) -> dict:
    """Multi-token prediction: mtp_loss_k, depth k's NLL summed over its labelled tokens / the
    batch's tokens (DeepSeek-V3 eq. 24's 1/T), and mtp_loss = weight / D x their sum (eq. 25)."""
    parts = {}
    for k, (logits_BTV, labels_BT, segment_ids_BT) in enumerate(heads, start=1):
        nll = evaluate_lib.nll_sum(logits_BTV, labels_BT, segment_ids_BT)
        parts[f'mtp_loss_{k}'] = nll / num_tokens
    parts['mtp_loss'] = weight / len(heads) * sum(parts[f'mtp_loss_{k}']
                                                  for k in range(1, len(heads) + 1))
    return parts


def total_loss(parts: dict, moe_cfg):
    """The training objective: CE plus the weighted balance and z losses (and the sequence-wise
    balance loss and the weighted MTP loss when they are on)."""
    loss = (parts['ce_loss'] + moe_cfg.aux_loss_weight * parts['aux_loss']
            + moe_cfg.z_loss_weight * parts['z_loss'])
    if 'seq_aux_loss' in parts:
        loss = loss + moe_cfg.seq_aux_loss_weight * parts['seq_aux_loss']
    if 'mtp_loss' in parts:
        loss = loss + parts['mtp_loss']
    return loss


def micro_grads(setup: Setup, state: TrainState, batch, rng, num_tokens, share):
    """Gradients of one micro-batch, scaled so that micro-batches add up to the whole batch's.

    CE is a token sum over the whole batch's num_tokens; the balance loss (a mean over routing
    groups with real tokens) and the z-loss and router statistics (means over real tokens) are
    weighted by this micro-batch's share of those groups and tokens.
    """
    def loss_fn(params):
        model = nnx.merge(setup.graphdef, params, state.extra)
        m = setup.cfg.model
        if m.mtp_depth:
            logits, stats, heads = model.forward_with_mtp(
                batch['inputs'], batch['segment_ids'], batch['positions'], batch['targets'],
                train=True, rng=rng)
        else:
            logits, stats = model(batch['inputs'], batch['segment_ids'], batch['positions'],
                                  train=True, rng=rng)
        parts = loss_parts(logits, batch, stats, num_tokens)
        parts = dict(parts, aux_loss=share['groups'] * parts['aux_loss'],
                     z_loss=share['tokens'] * parts['z_loss'])
        if 'seq_aux_loss' in parts:  # a mean over rows with real tokens
            parts['seq_aux_loss'] = share['rows'] * parts['seq_aux_loss']
        if m.mtp_depth:
            parts.update(mtp_parts(heads, num_tokens, m.mtp_loss_weight))
        stats = jax.tree.map(lambda x: share['tokens'] * x, stats)
        return total_loss(parts, setup.cfg.moe), (parts, stats)
    return jax.grad(loss_fn, has_aux=True)(state.params)


def micro_shares(cfg, segment_ids_BT, num_micro: int) -> dict:
    """Each micro-batch's share [M] of the batch's real tokens and of its routing groups that
    hold one (groups are moe.group_size tokens, or a row; validate makes them whole)."""
    real_MN = (segment_ids_BT > 0).reshape(num_micro, -1)
    group = cfg.moe.group_size or segment_ids_BT.shape[1]
    tokens_M = jnp.sum(real_MN, axis=1)
    groups_M = jnp.sum(jnp.any(real_MN.reshape(num_micro, -1, group), axis=-1), axis=1)
    rows_M = jnp.sum(jnp.any(real_MN.reshape(num_micro, -1, segment_ids_BT.shape[1]), axis=-1),
                     axis=1)
    share = lambda n_M: n_M.astype(jnp.float32) / jnp.maximum(jnp.sum(n_M), 1).astype(jnp.float32)
    return {'tokens': share(tokens_M), 'groups': share(groups_M), 'rows': share(rows_M)}


def train_step(setup: Setup, state: TrainState, batch, max_loss=None):
    """One optimizer step over the global batch, split into opt.grad_accum micro-batches of
    consecutive rows (with jitter or noisy routing, each micro-batch draws its own noise).
    With max_loss (the spike guard's threshold), a larger loss skips the step too."""
    num_micro = setup.cfg.opt.grad_accum
    num_tokens = jnp.maximum(jnp.sum(batch['segment_ids'] > 0), 1).astype(jnp.float32)
    rng = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
    if num_micro == 1:
        whole = {'tokens': 1.0, 'groups': 1.0, 'rows': 1.0}
        grads, (parts, stats) = micro_grads(setup, state, batch, rng, num_tokens, whole)
        return apply_gradients(setup, state, grads, parts, stats, num_tokens, max_loss)

    micro = jax.tree.map(lambda x: x.reshape(num_micro, -1, *x.shape[1:]), batch)
    shares = micro_shares(setup.cfg, batch['segment_ids'], num_micro)
    grad_fn = lambda i: micro_grads(setup, state, jax.tree.map(lambda x: x[i], micro),
                                    jax.random.fold_in(rng, i), num_tokens,
                                    jax.tree.map(lambda x: x[i], shares))
    accumulate = lambda total, i: (jax.tree.map(jnp.add, total, grad_fn(i)), None)
    zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), jax.eval_shape(grad_fn, 0))
    (grads, (parts, stats)), _ = jax.lax.scan(accumulate, zeros, jnp.arange(num_micro))
    return apply_gradients(setup, state, grads, parts, stats, num_tokens, max_loss)


def apply_gradients(setup, state, grads, parts, stats, num_tokens, max_loss=None):
    """Optimizer update, skipped (and counted) when the loss or a gradient is not finite, or
    the loss exceeds max_loss."""
    cfg = setup.cfg
    grad_norm = optax.tree.norm(grads)
    loss = total_loss(parts, cfg.moe)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    if max_loss is not None:
        finite &= loss <= max_loss
    updates, opt_state = setup.tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)
    extra = update_balance_bias(setup, state, stats) if stats else state.extra
    new_state = state.replace(step=state.step + 1, params=keep(params, state.params),
                              opt_state=keep(opt_state, state.opt_state),
                              extra=keep(extra, state.extra))
    metrics = dict(parts, loss=loss, grad_norm=grad_norm, skipped=1 - finite.astype(jnp.int32),
                   tokens=num_tokens, lr=optim.schedule(cfg.opt, cfg.train.num_steps)(state.step))
    if stats:
        metrics.update(expert_load=stats['expert_load'],
                       dropped_fraction=jnp.mean(stats['dropped_fraction']),
                       tokens_left_behind=jnp.mean(stats['tokens_left_behind']),
                       router_entropy=jnp.mean(stats['router_entropy']),
                       top1_prob=jnp.mean(stats['top1_prob']))
    return new_state, metrics


def update_balance_bias(setup, state, stats):
    """Loss-free balancing: each MoE layer's selection bias moves toward uniform load."""
    if setup.cfg.moe.balance != 'bias':
        return state.extra
    model = nnx.merge(setup.graphdef, state.params, state.extra)
    for layer, block in enumerate(model.moe_blocks()):
        block.update_bias(stats['expert_load'][layer])
    return nnx.split(model, nnx.Param, ...)[2]


def compile_steps(setup: Setup, *, spike_guard: bool = False):
    """The jitted train and eval steps, with shardings pinned and the train state donated.

    Both trace under the mesh, so the model's sharding constraints and shard_maps see it. With
    spike_guard the train step takes a third argument, the largest loss it may apply."""
    in_mesh = functools.partial(mesh_lib.traced_in, setup.mesh)
    in_shardings = (setup.state_shardings, setup.batch_sharding)
    if spike_guard:
        in_shardings += (NamedSharding(setup.mesh, P()),)
    train = jax.jit(in_mesh(functools.partial(train_step, setup)), in_shardings=in_shardings,
                    out_shardings=(setup.state_shardings, None), donate_argnums=0)
    s = setup.state_shardings
    evaluate = jax.jit(in_mesh(functools.partial(evaluate_lib.eval_step, setup.graphdef)),
                       in_shardings=(s.params, s.extra, setup.batch_sharding, None))
    return train, evaluate
