"""What a failed run raises and prints: the command's name, :class:`RunError` and its kin."""

from __future__ import annotations

PROG = "python -m metafunc train"


class RunError(Exception):
    """A run that cannot start or go on; ``main`` prints the message and exits with ``code``
    (2: the command line asks for what cannot be done; 1: a failure; 130: interrupted)."""

    def __init__(self, message: str, code: int = 1):
        super().__init__(message)
        self.code = code


class _Taken(RunError):
    """``--out`` holds another run or is in use by one (the default folder then moves on)."""

    def __init__(self, message: str, code: int, reason: str):
        super().__init__(message, code)
        self.reason = reason


class _Exit(SystemExit):
    """``SystemExit(code)`` whose ``str`` is the message (which ``main`` printed already)."""

    def __init__(self, error: RunError):
        super().__init__(error.code)
        self.message = str(error)

    def __str__(self) -> str:
        return self.message


def _why(error: BaseException) -> str:
    """An exception in a few words: an OSError's strerror, else the first line of its text."""
    if isinstance(error, OSError) and error.strerror:
        return error.strerror
    lines = str(error).strip().splitlines()
    return lines[0] if lines else type(error).__name__
