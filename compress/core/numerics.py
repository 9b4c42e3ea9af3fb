"""Numerics every layer shares: what "the model's output" is for a task, pooling, cosine.

The task decides the one array a model is judged by:
- ``sentence-embedding``: the graph's / pipeline's own ``sentence_embedding`` (pooling + normalisation as the
  sentence-transformers folder configures them);
- ``text-classification``: the logits;
- ``feature-extraction``: the last hidden state, mean-pooled over the attention mask;
- ``text-generation`` (causal language models): the next-token logits at every position.
``mean_pool`` and ``task_output`` work on numpy arrays and on torch tensors alike (no torch import here).
"""

from __future__ import annotations

from typing import Any

import numpy as np


def mean_pool(hidden: Any, mask: Any) -> Any:
    """Mean over the tokens the attention mask keeps. hidden: (B, T, H), mask: (B, T) -> (B, H).
    numpy in -> numpy out, torch in -> torch out (gradients flow)."""
    if isinstance(hidden, np.ndarray):
        m = np.asarray(mask)[..., None].astype(hidden.dtype)
    else:
        m = mask[..., None].to(hidden.dtype)
    return (hidden * m).sum(1) / m.sum(1).clip(min=1e-9)


def task_output(outputs: dict, attention_mask: Any, task: str) -> Any:
    """The one array a task is judged by, from a dict of named model outputs (ONNX graph or torch)."""
    if task == "sentence-embedding" and "sentence_embedding" in outputs:
        return outputs["sentence_embedding"]
    if task in ("text-classification", "text-generation"):
        return outputs["logits"]
    hidden = outputs.get("last_hidden_state", next(iter(outputs.values())))  # (B, T, H)
    return mean_pool(hidden, attention_mask)


def row_cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Cosine similarity of matching rows, in float64. (N, D), (N, D) -> (N,)."""
    a, b = a.astype(np.float64), b.astype(np.float64)
    return (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1) + 1e-12)
