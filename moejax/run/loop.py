"""The training loop, in phases: setup (mesh, data, abstract model, shardings) -> state (restore
or init) -> steps (train, log, evaluate, checkpoint) -> finish.

The data position is the step, so a resumed run repeats the uninterrupted run bit for bit.
"""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from moejax import config as config_lib
from moejax import data as data_lib
from moejax import mesh as mesh_lib
from moejax import validate
from moejax.errors import ConfigError
from moejax.model import transformer
from moejax.run import banner
from moejax.run import checkpoint as checkpoint_lib
from moejax.run import evaluate as evaluate_lib
from moejax.run import metrics as metrics_lib
from moejax.run import state as state_lib
from moejax.run import step as step_lib
from moejax.run import workdir as workdir_lib
from moejax.run.guards import (
    GoodCheckpoints,
    SkipCounter,
    SpikeGuard,
    StopSignal,
    exit_now_130,
    spike_factor,
)


@dataclasses.dataclass
class Run:
    """Everything the loop needs, built once in the setup phase."""
    setup: state_lib.Setup
    tokenizer: object
    train_step: object
    eval_step: object
    eval_batches: list
    byte_lengths: jax.Array
    checkpointer: checkpoint_lib.Checkpointer
    writer: metrics_lib.MetricWriter
    argv: list | None = None  # the command, for the message that tells how to extend the run


def prepare(cfg, workdir: str, *, for_training: bool = True, restart: bool = False,
            argv: list | None = None) -> Run:
    """Validate, then build mesh, tokenizer, data and compiled steps (the setup phase).

    A training run first checks the config against the workdir's saved run (resume_guard); an
    evaluation writes nothing into the workdir (it may be read-only)."""
    validate.check(cfg, jax.device_count())
    if for_training:
        config_lib.check_workdir(workdir)
    data_lib.check_data(cfg)
    chief = jax.process_index() == 0
    if for_training:
        resume_guard(cfg, workdir, restart, argv)
    if for_training and chief:  # before the first run's data preparation and compilation
        steps = workdir_lib.saved_steps(workdir)
        print(banner.start_banner(cfg, workdir, steps[-1] if steps else 0,
                                  data_lib.describe(cfg), argv), flush=True)
    tokenizer = shared_tokenizer(cfg, workdir, save=for_training)
    if chief and for_training:
        config_lib.save_json(cfg, workdir)
    setup = state_lib.make_setup(cfg, mesh_lib.make_mesh(cfg.mesh))
    train_fn, eval_fn = step_lib.compile_steps(setup, spike_guard=spike_factor(cfg) > 0)
    byte_lengths = np.zeros(cfg.data.vocab_size, np.float32)
    byte_lengths[:tokenizer.vocab_size] = tokenizer.byte_lengths()
    return Run(setup, tokenizer, train_fn, eval_fn, [], jnp.asarray(byte_lengths),
               checkpoint_lib.Checkpointer(workdir, cfg.train.keep_checkpoints,
                                           read_only=not for_training, cleanup_tmp=for_training),
               metrics_lib.MetricWriter(workdir, enabled=chief and for_training), argv)


def resume_guard(cfg, workdir: str, restart: bool, argv: list | None = None) -> None:
    """Before anything is written: with restart, check that the new run can start without the
    old one (its tokenizer: an imported one lives in the workdir) and only then set the old
    run aside; else refuse a config that does not fit the saved checkpoints, and record the
    changes that do (config.json is then rewritten with the config in use)."""
    chief = jax.process_index() == 0
    if restart and chief:
        try:
            data_lib.get_tokenizer(cfg, None)
        except ConfigError as err:
            raise ConfigError(err.key, err.value, f'{err.allowed} (--restart sets the old run '
                              'aside, its tokenizer with it; nothing was moved)') from None
        workdir_lib.set_aside_run(workdir)
    if restart:
        _sync('moejax_restart')
        return
    saved_cfg, changes = workdir_lib.check_resume(cfg, workdir, argv)
    changed_opt = {k: v for k, v in changes.items() if k.startswith('opt.')}
    if changed_opt and not state_lib.same_optimizer_state(cfg, saved_cfg):
        raise workdir_lib.refusal(workdir, changed_opt, "they change the optimizer state's "
                                  'structure, which the checkpoints hold', argv)
    if chief:
        steps = workdir_lib.saved_steps(workdir)
        workdir_lib.record_changes(workdir, changes, steps[-1] if steps else None)


def _sync(name: str) -> None:
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils
        multihost_utils.sync_global_devices(name)


def shared_tokenizer(cfg, workdir, *, save: bool = True):
    """Process 0 makes (or loads) the tokenizer first; the others then load the same one."""
    get = lambda: data_lib.get_tokenizer(cfg, workdir, save=save)
    if jax.process_count() == 1:
        return get()
    from jax.experimental import multihost_utils
    tokenizer = get() if jax.process_index() == 0 else None
    multihost_utils.sync_global_devices('moejax_tokenizer')
    return tokenizer or get()


def load_eval_batches(run: Run, split: str) -> list:
    cfg = run.setup.cfg
    host = data_lib.eval_batches(cfg, run.tokenizer, split, process_index=jax.process_index(),
                                 process_count=jax.process_count())
    return [state_lib.global_batch(run.setup, host[i]) for i in range(len(host))]


def run_eval(run: Run, state: state_lib.TrainState, batches=None) -> dict:
    batches = run.eval_batches if batches is None else batches
    return evaluate_lib.evaluate(run.eval_step, state.params, state.extra, batches,
                                 run.byte_lengths)


def restore_or_init(run: Run) -> tuple[state_lib.TrainState, dict]:
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
        return state_lib.init_state(run.setup, run.setup.cfg.train.seed), {}
    state, loop_state, step = restored
    if loop_state.get('next_batch') != int(state.step):
        raise RuntimeError(f'checkpoint {step}: data position {loop_state} != step {state.step}')
    print(f'Resumed from checkpoint at step {step}.', flush=True)
    return state, loop_state


def train_and_evaluate(cfg, workdir: str, *, restart: bool = False,
                       argv: list | None = None) -> dict:
    """Train to cfg.train.num_steps (resuming if checkpoints exist); returns the last metrics.

    Process 0 holds the workdir's lock from setup to exit: one trainer per workdir. With
    restart, an earlier run in the workdir is moved to previous_runs/ (nothing is deleted).
    argv (the command line) lets the messages name the command that extends the run."""
    config_lib.check_workdir(workdir)
    lock = workdir_lib.WorkdirLock(workdir)
    if jax.process_index() == 0:
        lock.acquire()
    stop = StopSignal(exit_now=exit_now_130(lock))
    try:
        # Setup: everything below fails fast, before data is read or anything compiles.
        run = prepare(cfg, workdir, restart=restart, argv=argv)
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
    meter = metrics_lib.Throughput(transformer.flops_per_token(cfg))
    progress = metrics_lib.Progress(t.num_steps, enabled=jax.process_index() == 0)
    skips, last = SkipCounter(t.max_skipped_steps, **loop_state.get('skips', {})), {'step': start}
    good = GoodCheckpoints.at_resume(run.checkpointer, start)
    spikes = SpikeGuard(spike_factor(cfg), loop_state.get('recent_losses', []))
    if stop.agreed():
        print(f'Stop requested before step {start + 1}; nothing new to save; exiting.', flush=True)
        return last
    for step, host_batch in zip(range(start, t.num_steps), train_data.iterate(start)):
        state, metrics = run.train_step(state, state_lib.global_batch(run.setup, host_batch),
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
            raise good.stopped_by_guard(skips, done, run.writer)
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
    return finish_steps(run, state, start, last, good, skips, spikes)


def finish_steps(run: Run, state, start: int, last: dict, good: GoodCheckpoints,
                 skips: SkipCounter, spikes: SpikeGuard) -> dict:
    """The finish phase: a final evaluation and checkpoint (skipped if there was nothing to
    do), and for a run that reached train.num_steps, the command that extends it."""
    done = int(state.step)
    if done > start or not run.checkpointer.steps():
        last.update(log_eval(run, state, done))
        good.save(done, state, loop_state_at(done, skips, spikes), skips)
        if skips.in_a_row:
            print(f'Finished: {good.said(done)}.', flush=True)
    if done >= run.setup.cfg.train.num_steps and not skips.in_a_row and \
            jax.process_index() == 0:
        print(banner.finished_message(done, run.argv), flush=True)
    return last


def loop_state_at(step: int, skips: 'SkipCounter', spikes: 'SpikeGuard') -> dict:
    """What a checkpoint holds beside the train state: the data position, skip counters and
    the spike guard's recent losses."""
    return {'next_batch': step, 'skips': skips.state(), **spikes.state()}


def log_eval(run: Run, state: state_lib.TrainState, step: int) -> dict:
    result = run_eval(run, state)
    rec = {'eval_loss': result['loss'], 'eval_perplexity': result['perplexity'],
           'eval_bits_per_byte': result['bits_per_byte']}
    run.writer.write(step, rec)
    if jax.process_index() == 0:
        print(f'eval at step {step}: {evaluate_lib.summary(result)}', flush=True)
    return rec
