"""What users see: the one error type (a one-line message, exit code 2), and no more noise than
they need from the libraries underneath."""
import contextlib
import logging


class ConfigError(ValueError):
    """A config key, flag or input the user can fix; the message names key, value and remedy.

    Given one argument, that is the whole message: config_flags re-raises a recipe's error as
    type(err)(message), which must not fail with a TypeError of its own."""

    def __init__(self, key: str, value=None, allowed: str | None = None):
        self.key, self.value, self.allowed = key, value, allowed
        super().__init__(key if allowed is None else f'{key}={value!r}: {allowed}')


@contextlib.contextmanager
def quiet(logger_name: str = 'absl'):
    """Hide a library's warnings while it works (e.g. TFDS on its own half-written folders,
    libtpu with no TPU to talk to); errors still show."""
    logger = logging.getLogger(logger_name)
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)
