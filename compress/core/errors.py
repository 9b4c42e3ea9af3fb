"""The project's one error base. Every error raised on purpose derives from ``CompressError``: bad input or an
impossible request, with a one-line message that names the fix. The CLI catches this base only; anything else
is a bug and keeps its traceback."""

from __future__ import annotations

import signal


class CompressError(Exception):
    """Bad input or an impossible request. The message is one line and says what to do."""


class Terminated(BaseException):
    """SIGTERM (what ``timeout``, CI cancellation and ``docker stop`` send), raised in the main thread like
    KeyboardInterrupt for SIGINT, so the same clean-up runs (compress.cli installs the handler)."""


_received: list[int] = []  # the signals this process's handler saw (main thread only)


def on_signal(signum: int, frame) -> None:
    """The handler compress.cli installs for SIGINT and SIGTERM: remember the signal, then raise. Remembering matters
    because CPython drops an exception raised while a finaliser or weakref callback runs ("Exception ignored in
    ..."): a signal landing there would otherwise be lost and the run would finish as if never interrupted."""
    _received.append(signum)
    raise _exception(signum)


def raise_if_signalled() -> None:
    """Raise again for a signal whose first exception was swallowed (see ``on_signal``); a no-op otherwise.
    Called before anything is committed (core.fs) and when a command returns (compress.cli)."""
    if _received:
        raise _exception(_received[-1])


def _exception(signum: int) -> BaseException:
    return Terminated() if signum == signal.SIGTERM else KeyboardInterrupt()


def first_line(e: BaseException) -> str:
    """The first line of an exception's message (its type name when it has none): what a one-line error shows."""
    text = str(e)
    return text.splitlines()[0] if text.strip() else type(e).__name__
