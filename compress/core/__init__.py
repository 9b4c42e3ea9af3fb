"""The base layer: errors, model loading, text data, shared numerics, evaluation metrics, the output-folder and
scratch-directory helpers, ONNX op vocabularies. It imports nothing else of the project's (pyproject.toml's
import-linter contracts enforce it)."""

from __future__ import annotations

from collections.abc import Callable

Progress = Callable[[str], None]
"""Where long work reports what it is doing: one line per call (the CLI prints it with a clock)."""


def silent(msg: str) -> None:
    """A Progress that shows nothing."""
