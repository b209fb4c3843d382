"""The one error type users see as a one-line message and exit code 2."""


class ConfigError(ValueError):
    """A config key, flag or input the user can fix; the message names key, value and remedy."""

    def __init__(self, key: str, value, allowed: str):
        self.key, self.value, self.allowed = key, value, allowed
        super().__init__(f'{key}={value!r}: {allowed}')
