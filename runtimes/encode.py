"""Run an exported model on text in ONNX Runtime and return the task's output (no torch here)."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort

from compress.core.numerics import task_output
from runtimes.ort import select_feeds


def ort_outputs(
    session: ort.InferenceSession, tokenizer, texts: list[str], task: str, max_length: int = 128, batch_size: int = 32
) -> np.ndarray:
    """Outputs in the order of ``texts``; batches are formed from length-sorted texts so little padding is computed
    (as sentence-transformers' encode does), then put back in order."""
    names = [o.name for o in session.get_outputs()]
    order = np.argsort([len(t) for t in texts], kind="stable")
    out = []
    for i in range(0, len(texts), batch_size):
        batch = [texts[j] for j in order[i : i + batch_size]]
        enc = tokenizer(batch, padding=True, truncation=True, max_length=max_length, return_tensors="np")
        feeds = select_feeds(session, enc)
        res = dict(zip(names, session.run(None, feeds)))
        out.append(task_output(res, feeds["attention_mask"], task))
    if not out:
        return np.zeros((0, 0), np.float32)
    result = np.empty_like(np.concatenate(out).astype(np.float32))
    result[order] = np.concatenate(out)
    return result
