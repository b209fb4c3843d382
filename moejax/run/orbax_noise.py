"""Orbax's and TensorStore's noise after a failed asynchronous save, reduced to the one line
moejax prints (checkpoint.SaveError): their error logs, each with a traceback, the "Event loop
is closed" errors of pending writes' callbacks, and the warnings of coroutines never awaited
at interpreter teardown. Everything else is shown as before."""
import logging
import sys
import warnings


class _QuietOrbaxErrors(logging.Filter):
    """Drops Orbax's own error logs (each with a traceback, dozens per failed save): a failed
    save reaches the caller as one SaveError line, a failed restore as one warning."""

    def filter(self, record: logging.LogRecord) -> bool:
        # absl records name Orbax's file; asyncio's "exception was never retrieved" ones (a
        # failed write's futures, at exit) name the checkpoint's temporary directory.
        return record.levelno < logging.ERROR or not (
            'orbax' in record.pathname or 'orbax-checkpoint-tmp' in record.getMessage())


def _is_event_loop_noise(kind, value) -> bool:
    return kind is RuntimeError and str(value) == 'Event loop is closed'


def _quiet_event_loop_noise(excepthook, unraisablehook):
    """sys.excepthook and sys.unraisablehook that drop the 'Event loop is closed' errors that
    TensorStore's callbacks raise (one traceback per pending write) after an asynchronous save
    failed; everything else is shown as before."""
    def quiet_excepthook(kind, value, tb):
        if not _is_event_loop_noise(kind, value):
            excepthook(kind, value, tb)

    def quiet_unraisablehook(unraisable):
        if not _is_event_loop_noise(unraisable.exc_type, unraisable.exc_value):
            unraisablehook(unraisable)
    quiet_excepthook.moejax_quiet = True
    return quiet_excepthook, quiet_unraisablehook


def quiet_background_failures() -> None:
    """Install the filters (once per process) in a process that writes checkpoints."""
    # A failed asynchronous write leaves TensorStore coroutines that are never awaited; Python
    # warns of each during interpreter teardown, after the failure's one line was printed.
    warnings.filterwarnings('ignore', message=r"coroutine '.*' was never awaited",
                            category=RuntimeWarning)
    for name in ('absl', 'asyncio'):
        logger = logging.getLogger(name)
        if not any(isinstance(f, _QuietOrbaxErrors) for f in logger.filters):
            logger.addFilter(_QuietOrbaxErrors())
    if not getattr(sys.excepthook, 'moejax_quiet', False):
        sys.excepthook, sys.unraisablehook = _quiet_event_loop_noise(sys.excepthook,
                                                                     sys.unraisablehook)
