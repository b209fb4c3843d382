"""The one error type users see as a one-line message and exit code 2."""


class ConfigError(ValueError):
    """A config key, flag or input the user can fix; the message names key, value and remedy.

    Given one argument, that is the whole message: config_flags re-raises a recipe's error as
    type(err)(message), which must not fail with a TypeError of its own."""

    def __init__(self, key: str, value=None, allowed: str | None = None):
        self.key, self.value, self.allowed = key, value, allowed
        super().__init__(key if allowed is None else f'{key}={value!r}: {allowed}')
