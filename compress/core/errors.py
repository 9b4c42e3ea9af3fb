"""The project's one error base. Every error raised on purpose derives from ``CompressError``: bad input or an
impossible request, with a one-line message that names the fix. The CLI catches this base only; anything else
is a bug and keeps its traceback."""

from __future__ import annotations


class CompressError(Exception):
    """Bad input or an impossible request. The message is one line and says what to do."""


def first_line(e: BaseException) -> str:
    """The first line of an exception's message (its type name when it has none): what a one-line error shows."""
    text = str(e)
    return text.splitlines()[0] if text.strip() else type(e).__name__
