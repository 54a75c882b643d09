"""The one error type a user sees for a bad config or input: it names the field and what was expected."""


class ConfigError(ValueError):
    """A bad config value or input, reported as `field: message` before anything is compiled or written."""

    def __init__(self, field: str, message: str):
        self.field = field
        self.message = message
        super().__init__(f"{field}: {message}")
