"""User-facing errors: the CLI prints them as one line (no traceback) and exits non-zero."""


class SparselandError(ValueError):
    """Bad input from the user: the message names the value and how to fix it."""
