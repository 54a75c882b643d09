"""The one error type a user sees for a bad config or input: it names the field and what was expected."""


class ConfigError(ValueError):
    """A bad config value or input, reported as `field: message` before anything is compiled or written."""

    def __init__(self, field: str, message: str):
        self.field = field
        self.message = message
        # "train.steps" + "=0 must be > 0" reads as one assignment; other messages follow a colon.
        super().__init__(f"{field}{message}" if message.startswith("=") else f"{field}: {message}")
