"""The project's one error base. Every error raised on purpose derives from ``CompressError``: bad input or an
impossible request, with a one-line message that names the fix. The CLI catches this base only; anything else
is a bug and keeps its traceback."""

from __future__ import annotations


class CompressError(Exception):
    """Bad input or an impossible request. The message is one line and says what to do."""


class Terminated(BaseException):
    """SIGTERM (what ``timeout``, CI cancellation and ``docker stop`` send), raised in the main thread like
    KeyboardInterrupt for SIGINT, so the same clean-up runs (compress.cli installs the handler)."""


def first_line(e: BaseException) -> str:
    """The first line of an exception's message (its type name when it has none): what a one-line error shows."""
    text = str(e)
    return text.splitlines()[0] if text.strip() else type(e).__name__
