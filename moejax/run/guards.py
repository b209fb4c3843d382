"""The guards of a training run: stop signals, skipped (non-finite or spiking) steps, and which
checkpoint is known good while steps are being skipped.

A first SIGTERM/SIGINT asks the loop to save and exit; a second exits 130 at once. Skipped steps
leave the weights alone; too many in a row stop the run, and the last good checkpoint is kept,
named and resumed from.
"""
import os
import signal
import threading
import time

import jax
import numpy as np

from moejax.run import workdir as workdir_lib


class StopSignal:
    """Turns SIGTERM/SIGINT into a request to checkpoint and exit after the current step.

    Installed before setup, so a preemption notice during compilation is not lost. A second
    signal means "stop now": with `exit_now`, a watchdog thread (woken through
    signal.set_wakeup_fd, so even while the main thread is inside XLA) calls it, and it ends the
    process with os._exit(130); no Python exception unwinds through JAX or Orbax threads, which
    could crash. A save cut short is never taken for a checkpoint (Orbax commits by rename).
    Without `exit_now` the second signal raises KeyboardInterrupt.
    """

    def __init__(self, exit_now=None):
        self.requested, self.exit_now, self._count = False, exit_now, 0
        self._lock, self._wakeup = threading.Lock(), None
        self.previous = {s: signal.signal(s, self._handle) for s in (signal.SIGTERM, signal.SIGINT)}
        if exit_now is not None:
            self._start_watchdog()

    def _start_watchdog(self) -> None:
        read_fd, write_fd = os.pipe()
        os.set_blocking(write_fd, False)
        previous_fd = signal.set_wakeup_fd(write_fd, warn_on_full_buffer=False)
        self._wakeup = (read_fd, write_fd, previous_fd)
        threading.Thread(target=self._watch, args=(read_fd,), daemon=True,
                         name='moejax-second-signal').start()

    def _watch(self, read_fd: int) -> None:
        while True:
            try:
                data = os.read(read_fd, 64)
            except OSError:
                return
            if not data:  # restore() closed the write end
                os.close(read_fd)
                return
            for signum in data:
                if signum in (signal.SIGTERM, signal.SIGINT):
                    self._count_signal(signum)

    def _count_signal(self, signum: int) -> None:
        """The watchdog's count of delivered SIGTERM/SIGINTs; the second one exits."""
        with self._lock:
            self._count += 1
            self.requested = True
            second = self._count >= 2
        if second:
            self.exit_now(signum)

    def _handle(self, signum, frame):
        if self.exit_now is not None:  # the watchdog counts; this only marks the request
            self.requested = True
            return
        if self.requested:
            self.restore()
            raise KeyboardInterrupt(f'signal {signum} received twice')
        self.requested = True

    def agreed(self) -> bool:
        """Every process must stop at the same step: stop if any one was signalled."""
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils
            flags = multihost_utils.process_allgather(np.int32(self.requested))
            self.requested = bool(np.any(flags))
        return self.requested

    def restore(self):
        for s, handler in self.previous.items():
            signal.signal(s, handler)
        if self._wakeup is not None:
            read_fd, write_fd, previous_fd = self._wakeup
            self._wakeup = None
            signal.set_wakeup_fd(previous_fd)
            os.close(write_fd)  # the watchdog reads EOF, closes its end and ends


def exit_now_130(lock: workdir_lib.WorkdirLock):
    """What a second interrupt does: release the workdir lock, say so, and exit 130 at once."""
    def exit_now(signum: int):
        lock.release()
        os.write(2, f'moejax: signal {signum} received twice: exiting now (130) without saving; '
                    'the run resumes from its newest checkpoint.\n'.encode())
        os._exit(130)
    return exit_now


class GoodCheckpoints:
    """Which checkpoint is known good while non-finite steps are skipped, so it is never lost.

    A checkpoint at step s holds the weights that step s+1 evaluates; a skipped step leaves the
    weights alone, so the first step after s that is not skipped confirms s ("good"). The newest
    good checkpoint is kept through rotation; nothing is saved while steps are being skipped; if
    the guard stops the run, the unconfirmed newer checkpoint (whose weights gave the first
    non-finite step) is moved aside, so the next run resumes from the good one.
    """

    def __init__(self, checkpointer, good: int | None, pending: int | None):
        self.checkpointer, self.good, self.pending = checkpointer, good, pending
        self.checkpointer.protect([good])

    @classmethod
    def at_resume(cls, checkpointer, start: int) -> 'GoodCheckpoints':
        """Resumed from `start` (saved after a step that was not skipped): every older
        checkpoint was confirmed by that step; `start` itself is not confirmed yet."""
        older = [s for s in checkpointer.steps() if s < start]
        return cls(checkpointer, older[-1] if older else None, start if start else None)

    def after_step(self, skipped: bool) -> None:
        if not skipped and self.pending is not None:
            self.good, self.pending = self.pending, None
            self.checkpointer.protect([self.good])

    def save(self, step: int, state, loop_state: dict, skips: 'SkipCounter') -> None:
        """Save, unless this step is in a run of skipped steps."""
        if skips.in_a_row == 0 and self.checkpointer.save(step, state, loop_state):
            self.pending = step

    def said(self, step: int) -> str:
        """What the stop message says about step `step`'s checkpoint."""
        if step in self.checkpointer.steps() or step == self.pending:
            return f'saved step {step}'
        newer = f' (checkpoint {self.pending} is newer, not yet known good)' if self.pending else ''
        return (f'step {step} is in a run of skipped steps, so it was not saved; the last good '
                f'checkpoint is step {self.good if self.good is not None else "none"}{newer}')

    def stopped_by_guard(self, skips: 'SkipCounter', step: int, writer) -> 'NonFiniteError':
        """The guard's stop: set the suspect checkpoint aside, copy the metrics records after
        the good one beside it (a resumed run cuts them from metrics.jsonl; they are the
        evidence of what went wrong), and name the good checkpoint."""
        message = skips.message(step)
        if self.pending is not None and self.pending in self.checkpointer.steps():
            where = self.checkpointer.set_aside_diverged(self.pending)
            message += (f' Checkpoint {self.pending}, whose weights gave the first skipped '
                        f'step, was {where}.')
        good = self.good or 0
        aside = os.path.join(self.checkpointer.workdir, 'diverged_checkpoints',
                             f'metrics_after_step_{good}-{int(time.time())}.jsonl')
        if writer.copy_after(good, aside):
            message += f' The metrics of steps {good + 1}-{step} were copied to {aside}.'
        if self.good is not None:
            message += (f' The last good checkpoint is step {self.good}; rerun to resume from '
                        'it, with a lower opt.lr or opt.clip_norm.')
        else:
            message += (' No checkpoint before the first skipped step is known good: rerun '
                        'with --restart and a lower opt.lr or opt.clip_norm.')
        return NonFiniteError(message)


def spike_factor(cfg) -> float:
    return float(cfg.train.spike_factor or 0.0)


class SpikeGuard:
    """Skips a step whose loss exceeds train.spike_factor x the mean of the last WINDOW applied
    losses (0 = off): a finite blow-up is caught like a non-finite one. The window is
    checkpointed (exact float32 values), so a resumed run decides exactly as the first did."""
    WINDOW = 16

    def __init__(self, factor: float, recent: list):
        self.factor, self.recent = factor, [float(np.float32(x)) for x in recent][-self.WINDOW:]

    def threshold(self) -> tuple:
        """() when off; else (max_loss,) for the train step (inf until a loss was applied)."""
        if not self.factor:
            return ()
        limit = self.factor * float(np.mean(self.recent)) if self.recent else np.inf
        return (np.float32(limit),)

    def update(self, metrics) -> None:
        if self.factor and not int(metrics['skipped']):
            self.recent = (self.recent + [float(np.float32(metrics['loss']))])[-self.WINDOW:]

    def state(self) -> dict:
        return {'recent_losses': self.recent} if self.factor else {}


class SkipCounter:
    """Counts non-finite steps; too many in a row stops the run (the last checkpoint stays).

    Its counts are checkpointed, so a resumed run stops exactly where the uninterrupted one would.
    """

    def __init__(self, limit: int, in_a_row: int = 0, total: int = 0):
        self.limit, self.in_a_row, self.total = limit, in_a_row, total

    def state(self) -> dict:
        return {'in_a_row': self.in_a_row, 'total': self.total}

    def update(self, skipped: int) -> None:
        self.in_a_row = self.in_a_row + 1 if skipped else 0
        self.total += skipped

    def check(self, step: int) -> None:
        """Raise NonFiniteError once train.max_skipped_steps steps in a row were skipped."""
        if self.in_a_row >= self.limit:
            raise NonFiniteError(self.message(step))

    def message(self, step: int) -> str:
        return (f'{self.in_a_row} steps in a row were skipped: a non-finite loss or gradient, '
                f'or a loss spike (train.max_skipped_steps={self.limit}); stopped at step {step}.')


class NonFiniteError(RuntimeError):
    """Too many non-finite steps in a row."""
