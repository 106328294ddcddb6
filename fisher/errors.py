"""The one exception type for user-facing errors."""


class FisherError(Exception):
    """A user-facing error: one line naming the input (file, field or option) and what to do."""
