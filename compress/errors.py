"""The one error type users see: a single line that names the fix."""
from __future__ import annotations


class CompressError(Exception):
    """Bad input or an impossible request. The message is one line and says what to do."""
