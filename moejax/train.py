"""Training: state initialised straight into its shardings, a pure train_step, and the loop.

The loop reads in phases: setup (mesh, data, abstract model, shardings) -> state (restore or
init) -> steps (train, log, evaluate, checkpoint) -> finish. Everything random derives from
(seed, step) and the data position is the step, so a resumed run repeats the uninterrupted
run bit for bit.
"""
import dataclasses
import functools
import json
import os

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from moejax import checkpoint as checkpoint_lib
from moejax import config as config_lib
from moejax import data as data_lib
from moejax import evaluate as evaluate_lib
from moejax import mesh as mesh_lib
from moejax import metrics as metrics_lib
from moejax import model as model_lib
from moejax import optim, sharding
from moejax import workdir as workdir_lib
from moejax.errors import ConfigError
# NonFiniteError and StopSignal are also used as train.NonFiniteError, train.StopSignal.
from moejax.guards import (GoodCheckpoints, NonFiniteError, SkipCounter, SpikeGuard,  # noqa: F401
                           StopSignal, exit_now_130, spike_factor)


@flax.struct.dataclass
class TrainState:
    step: jax.Array          # int32 scalar: steps taken = batches consumed
    params: nnx.State        # trainable parameters (nnx.Param)
    extra: nnx.State         # other model state (the bias of loss-free balancing)
    opt_state: optax.OptState
    rng: jax.Array           # raw key data; step keys are fold_in(rng, step)


@dataclasses.dataclass(frozen=True)
class Setup:
    """What is fixed for a run: the model's structure, the optimizer, and shardings."""
    cfg: object
    mesh: jax.sharding.Mesh
    graphdef: nnx.GraphDef
    tx: optax.GradientTransformation
    abstract_state: TrainState      # ShapeDtypeStructs carrying their shardings
    state_shardings: TrainState
    batch_sharding: NamedSharding


def new_state(cfg, tx, seed) -> tuple[nnx.GraphDef, TrainState]:
    """A freshly initialised model and optimizer, as (graphdef, state)."""
    key = jax.random.key(seed)
    model = model_lib.Transformer(cfg, rngs=nnx.Rngs(params=jax.random.fold_in(key, 0)))
    graphdef, params, extra = nnx.split(model, nnx.Param, ...)
    rng = jax.random.key_data(jax.random.fold_in(key, 1))
    return graphdef, TrainState(jnp.zeros((), jnp.int32), params, extra, tx.init(params), rng)


def make_setup(cfg, mesh) -> Setup:
    """Trace the model abstractly (nothing allocated) and derive every sharding from it."""
    tx = optim.make_optimizer(cfg.opt, cfg.train.num_steps)
    graphdef = nnx.graphdef(nnx.eval_shape(lambda: model_lib.Transformer(cfg, rngs=nnx.Rngs(0))))
    abstract = jax.eval_shape(lambda: new_state(cfg, tx, 0)[1])
    shardings = state_shardings(mesh, tx, abstract)
    abstract = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                            abstract, shardings)
    batch_sharding = NamedSharding(mesh, sharding.logical_to_spec(('batch', 'length')))
    return Setup(cfg, mesh, graphdef, tx, abstract, shardings, batch_sharding)


def state_shardings(mesh, tx, abstract: TrainState) -> TrainState:
    """Params by their logical names; optimizer moments like their params; the rest replicated."""
    param_specs = sharding.tree_specs(nnx.get_partition_spec(abstract.params))
    is_spec = lambda x: isinstance(x, P)
    # Factored (Adafactor) statistics have fewer dims than their param: replicate those.
    fit = lambda leaf, spec: spec if len(spec) == len(leaf.shape) else P()
    opt_specs = optax.tree_map_params(tx, fit, abstract.opt_state, param_specs,
                                      transform_non_params=lambda _: P(), is_leaf=is_spec)
    specs = TrainState(P(), param_specs, jax.tree.map(lambda _: P(), abstract.extra),
                       opt_specs, P())
    return jax.tree.map(lambda s: NamedSharding(mesh, s), specs, is_leaf=is_spec)


def init_state(setup: Setup, seed: int) -> TrainState:
    """Initialise parameters directly into their shardings (no full copy on any device)."""
    init = lambda seed: new_state(setup.cfg, setup.tx, seed)[1]
    with jax.set_mesh(setup.mesh):
        return jax.jit(init, out_shardings=setup.state_shardings)(seed)


def loss_parts(logits_BTV, batch, stats, num_tokens) -> dict:
    """Token-summed NLL / num_tokens, and the balance and z losses summed over MoE layers."""
    weights_BT = (batch['segment_ids'] > 0).astype(jnp.float32)
    nll = jnp.sum(evaluate_lib.token_nll(logits_BTV, batch['targets']) * weights_BT)
    aux = jnp.sum(stats['aux_loss']) if stats else 0.0
    z = jnp.sum(stats['z_loss']) if stats else 0.0
    return {'ce_loss': nll / num_tokens, 'aux_loss': aux, 'z_loss': z}


def total_loss(parts: dict, moe_cfg):
    """The training objective: CE plus the weighted balance and z losses."""
    return (parts['ce_loss'] + moe_cfg.aux_loss_weight * parts['aux_loss']
            + moe_cfg.z_loss_weight * parts['z_loss'])


def micro_grads(setup: Setup, state: TrainState, batch, rng, num_tokens, share):
    """Gradients of one micro-batch, scaled so that micro-batches add up to the whole batch's.

    CE is a token sum over the whole batch's num_tokens; the balance loss (a mean over routing
    groups with real tokens) and the z-loss and router statistics (means over real tokens) are
    weighted by this micro-batch's share of those groups and tokens.
    """
    def loss_fn(params):
        model = nnx.merge(setup.graphdef, params, state.extra)
        logits, stats = model(batch['inputs'], batch['segment_ids'], batch['positions'],
                              train=True, rng=rng)
        parts = loss_parts(logits, batch, stats, num_tokens)
        parts = dict(parts, aux_loss=share['groups'] * parts['aux_loss'],
                     z_loss=share['tokens'] * parts['z_loss'])
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
    share = lambda n_M: n_M.astype(jnp.float32) / jnp.maximum(jnp.sum(n_M), 1).astype(jnp.float32)
    return {'tokens': share(tokens_M), 'groups': share(groups_M)}


def train_step(setup: Setup, state: TrainState, batch, max_loss=None):
    """One optimizer step over the global batch, split into opt.grad_accum micro-batches of
    consecutive rows (with jitter or noisy routing, each micro-batch draws its own noise).
    With max_loss (the spike guard's threshold), a larger loss skips the step too."""
    num_micro = setup.cfg.opt.grad_accum
    num_tokens = jnp.maximum(jnp.sum(batch['segment_ids'] > 0), 1).astype(jnp.float32)
    rng = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
    if num_micro == 1:
        whole = {'tokens': 1.0, 'groups': 1.0}
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


def global_batch(setup: Setup, host_batch: dict) -> dict:
    """Assemble the global batch from each process's rows (no data crosses hosts)."""
    return {k: jax.make_array_from_process_local_data(setup.batch_sharding, np.asarray(v))
            for k, v in host_batch.items()}


@dataclasses.dataclass
class Run:
    """Everything the loop needs, built once in the setup phase."""
    setup: Setup
    tokenizer: object
    train_step: object
    eval_step: object
    eval_batches: list
    byte_lengths: jax.Array
    checkpointer: checkpoint_lib.Checkpointer
    writer: metrics_lib.MetricWriter


def prepare(cfg, workdir: str, *, for_training: bool = True, restart: bool = False) -> Run:
    """Validate, then build mesh, tokenizer, data and compiled steps (the setup phase).

    A training run first checks the config against the workdir's saved run (resume_guard)."""
    config_lib.validate(cfg, jax.device_count())
    config_lib.check_workdir(workdir)
    data_lib.check_data(cfg)
    chief = jax.process_index() == 0
    if for_training:
        resume_guard(cfg, workdir, restart)
    tokenizer = shared_tokenizer(cfg, workdir)
    if chief and for_training:
        config_lib.save_json(cfg, workdir)
    setup = make_setup(cfg, mesh_lib.make_mesh(cfg.mesh))
    train_fn, eval_fn = compile_steps(setup, spike_guard=spike_factor(cfg) > 0)
    byte_lengths = np.zeros(cfg.data.vocab_size, np.float32)
    byte_lengths[:tokenizer.vocab_size] = tokenizer.byte_lengths()
    return Run(setup, tokenizer, train_fn, eval_fn, [], jnp.asarray(byte_lengths),
               checkpoint_lib.Checkpointer(workdir, cfg.train.keep_checkpoints,
                                           read_only=not for_training, cleanup_tmp=for_training),
               metrics_lib.MetricWriter(workdir, enabled=chief and for_training))


def resume_guard(cfg, workdir: str, restart: bool) -> None:
    """Before anything is written: with restart, set the old run aside; else refuse a config
    that does not fit the saved checkpoints, and record the changes that do (config.json is
    then rewritten with the config in use)."""
    chief = jax.process_index() == 0
    if restart and chief:
        workdir_lib.set_aside_run(workdir)
    if restart:
        _sync('moejax_restart')
        return
    saved_cfg, changes = workdir_lib.check_resume(cfg, workdir)
    changed_opt = {k: v for k, v in changes.items() if k.startswith('opt.')}
    if changed_opt and not same_optimizer_state(cfg, saved_cfg):
        raise workdir_lib.refusal(workdir, changed_opt, "they change the optimizer state's "
                                  'structure, which the checkpoints hold')
    if chief:
        steps = workdir_lib.saved_steps(workdir)
        workdir_lib.record_changes(workdir, changes, steps[-1] if steps else None)


def same_optimizer_state(cfg, saved_cfg) -> bool:
    """Whether the saved config's optimizer state has this config's structure and shapes."""
    tx = optim.make_optimizer(cfg.opt, cfg.train.num_steps)
    abstract = jax.eval_shape(lambda: new_state(cfg, tx, 0)[1])
    saved_tx = optim.make_optimizer(saved_cfg.opt, saved_cfg.train.num_steps)
    saved = jax.eval_shape(saved_tx.init, abstract.params)
    describe = lambda tree: (jax.tree.structure(tree),
                             [(x.shape, x.dtype) for x in jax.tree.leaves(tree)])
    return describe(saved) == describe(abstract.opt_state)


def _sync(name: str) -> None:
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils
        multihost_utils.sync_global_devices(name)


def shared_tokenizer(cfg, workdir):
    """Process 0 makes (or loads) the tokenizer first; the others then load the same one."""
    if jax.process_count() == 1:
        return data_lib.get_tokenizer(cfg, workdir)
    from jax.experimental import multihost_utils
    tokenizer = data_lib.get_tokenizer(cfg, workdir) if jax.process_index() == 0 else None
    multihost_utils.sync_global_devices('moejax_tokenizer')
    return tokenizer or data_lib.get_tokenizer(cfg, workdir)


def load_eval_batches(run: Run, split: str) -> list:
    cfg = run.setup.cfg
    host = data_lib.eval_batches(cfg, run.tokenizer, split, process_index=jax.process_index(),
                                 process_count=jax.process_count())
    return [global_batch(run.setup, host[i]) for i in range(len(host))]


def run_eval(run: Run, state: TrainState, batches=None) -> dict:
    batches = run.eval_batches if batches is None else batches
    return evaluate_lib.evaluate(run.eval_step, state.params, state.extra, batches,
                                 run.byte_lengths)


def restore_or_init(run: Run) -> tuple[TrainState, dict]:
    """The state phase: the newest restorable checkpoint, or a fresh initialisation.

    Returns (state, loop_state): loop_state is what the checkpoint saved beside the train state
    (the data position, the skip counters); {} for a fresh start. A workdir whose checkpoints
    were all set aside (damaged, or diverged) is not silently started over."""
    restored = run.checkpointer.restore(run.setup.abstract_state)
    if restored is None:
        aside = workdir_lib.set_aside_checkpoints(run.checkpointer.workdir)
        if aside:
            raise ConfigError('--workdir', run.checkpointer.workdir, (
                f'holds no checkpoint to resume from, only ones set aside earlier '
                f'({", ".join(aside[:4])}{", ..." if len(aside) > 4 else ""}); pass --restart '
                'to set the old run aside (nothing is deleted) and start over from step 0'))
        return init_state(run.setup, run.setup.cfg.train.seed), {}
    state, loop_state, step = restored
    if loop_state.get('next_batch') != int(state.step):
        raise RuntimeError(f'checkpoint {step}: data position {loop_state} != step {state.step}')
    print(f'Resumed from checkpoint at step {step}.', flush=True)
    return state, loop_state


def train_and_evaluate(cfg, workdir: str, *, restart: bool = False) -> dict:
    """Train to cfg.train.num_steps (resuming if checkpoints exist); returns the last metrics.

    Process 0 holds the workdir's lock from setup to exit: one trainer per workdir. With
    restart, an earlier run in the workdir is moved to previous_runs/ (nothing is deleted)."""
    config_lib.check_workdir(workdir)
    lock = workdir_lib.WorkdirLock(workdir)
    if jax.process_index() == 0:
        lock.acquire()
    stop = StopSignal(exit_now=exit_now_130(lock))
    try:
        # Setup: everything below fails fast, before data is read or anything compiles.
        run = prepare(cfg, workdir, restart=restart)
    except BaseException:
        stop.restore()
        lock.release()
        raise
    try:
        result = train_steps(run, stop)
    except BaseException:
        finish(run, lock, stop, failing=True)
        raise
    finish(run, lock, stop, failing=False)
    return result


def finish(run: Run, lock, stop: 'StopSignal', *, failing: bool) -> None:
    """Wait for the last save, close the writers, release the lock, remove the handlers (still
    under StopSignal until then: one signal waits for the save, two exit 130). The first error
    is raised unless another one is already on its way (a full disk breaks both writers: the
    failed save is the one to report)."""
    errors = []
    for close in (run.checkpointer.close, run.writer.close):
        try:
            close()
        except Exception as err:  # noqa: BLE001 - collected, the first one raised below
            errors.append(err)
    lock.release()
    stop.restore()
    if errors and not failing:
        raise errors[0]


def train_steps(run: Run, stop: StopSignal) -> dict:
    """The state and steps phases: restore, train, log, evaluate, checkpoint, finish."""
    cfg, t = run.setup.cfg, run.setup.cfg.train
    train_data = data_lib.train_batches(cfg, run.tokenizer, process_index=jax.process_index(),
                                        process_count=jax.process_count())
    run.eval_batches = load_eval_batches(run, 'validation')
    state, loop_state = restore_or_init(run)
    start = int(state.step)
    run.writer.truncate_after(start)
    meter = metrics_lib.Throughput(model_lib.flops_per_token(cfg))
    progress = metrics_lib.Progress(t.num_steps, enabled=jax.process_index() == 0)
    skips, last = SkipCounter(t.max_skipped_steps, **loop_state.get('skips', {})), {'step': start}
    good = GoodCheckpoints.at_resume(run.checkpointer, start)
    spikes = SpikeGuard(spike_factor(cfg), loop_state.get('recent_losses', []))
    if stop.agreed():
        print(f'Stop requested before step {start + 1}; nothing new to save; exiting.', flush=True)
        return last
    for step, host_batch in zip(range(start, t.num_steps), train_data.iterate(start)):
        state, metrics = run.train_step(state, global_batch(run.setup, host_batch),
                                        *spikes.threshold())
        done = step + 1
        skips.update(int(metrics['skipped']))
        spikes.update(metrics)
        good.after_step(skipped=skips.in_a_row > 0)
        meter.step(metrics['tokens'])
        if done % t.log_every == 0 or done == t.num_steps:
            rec = dict(jax.device_get(metrics), **meter.read(), skipped_steps=skips.total)
            run.writer.write(done, rec)
            progress.log(done, rec, done - start)
            last = {'step': done, **rec}
        if skips.in_a_row >= skips.limit:  # after logging, so the non-finite step is on record
            raise good.stopped_by_guard(skips, done)
        if t.eval_every and done % t.eval_every == 0 and done != t.num_steps:
            last.update(log_eval(run, state, done))
            meter.pause()
        stopping = stop.agreed()  # asked of every process at every step, so all stop together
        if done % t.checkpoint_every == 0 or stopping:
            good.save(done, state, loop_state_at(done, skips, spikes), skips)
            meter.pause()
        if stopping:
            print(f'Stop requested: {good.said(done)}; exiting.', flush=True)
            return last
    # Finish: a final evaluation and checkpoint (skipped if there was nothing to do).
    done = int(state.step)
    if done > start or not run.checkpointer.steps():
        last.update(log_eval(run, state, done))
        good.save(done, state, loop_state_at(done, skips, spikes), skips)
        if skips.in_a_row:
            print(f'Finished: {good.said(done)}.', flush=True)
    return last


def loop_state_at(step: int, skips: 'SkipCounter', spikes: 'SpikeGuard') -> dict:
    """What a checkpoint holds beside the train state: the data position, skip counters and
    the spike guard's recent losses."""
    return {'next_batch': step, 'skips': skips.state(), **spikes.state()}


def log_eval(run: Run, state: TrainState, step: int) -> dict:
    result = run_eval(run, state)
    rec = {'eval_loss': result['loss'], 'eval_perplexity': result['perplexity'],
           'eval_bits_per_byte': result['bits_per_byte']}
    run.writer.write(step, rec)
    if jax.process_index() == 0:
        print(f'eval at step {step}: loss {result["loss"]:.4f} | perplexity '
              f'{result["perplexity"]:.2f} | bits/byte {result["bits_per_byte"]:.4f}', flush=True)
    return rec


def evaluate_checkpoint(cfg, workdir: str, split: str, step: int | None = None) -> dict:
    """Evaluate a saved step (default: the latest) on `split`; write eval_<split>_<step>.json.

    The weights come from saved_run.open_run (parameters only, never the optimizer state)."""
    from moejax import saved_run  # saved_run builds on this module (make_setup)
    saved_run.check_workdir(workdir, needs_config=False)
    run = prepare(cfg, workdir, for_training=False)
    saved = saved_run.open_run(workdir, step, cfg=run.setup.cfg)
    result = evaluate_lib.evaluate(run.eval_step, saved.params, saved.extra,
                                   load_eval_batches(run, split), run.byte_lengths)
    result = {'step': saved.step, 'split': split, **result}
    if jax.process_index() == 0:
        path = os.path.join(workdir, f'eval_{split}_{saved.step}.json')
        with open(path + '.tmp', 'w') as f:
            json.dump(result, f, indent=1)
        os.replace(path + '.tmp', path)
    run.checkpointer.close()
    return result
