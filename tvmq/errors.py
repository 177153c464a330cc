"""The one exception type the CLI turns into an ``error:`` line."""


class TvmqError(Exception):
    """A problem with the user's input or environment, stated with how to fix it.

    The message is one line: what is wrong, then what to do about it.
    """
