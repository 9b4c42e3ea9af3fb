"""Is an artefact's output a function of its input text alone? Measured in ONNX Runtime (no torch here).

Two checks, on the same texts (the report uses the held-out shipped sentences):

- **alone vs batched.** Each text run by itself (batch 1, no padding), and inside ``batch``-text batches padded to the
  longest text of the batch and to a fixed length (``pad_to`` tokens). The batches are cyclic windows over the texts,
  so every text sits among other texts, as in a corpus being indexed. Plain dynamic int8 (ORT's
  DynamicQuantizeLinear) takes one activation scale over the whole [batch, seq, hidden] tensor, padding included, so
  the same text gets a different vector in a different batch: an index built in batches and queries embedded alone
  are then not interchangeable.
- **optimisation levels.** Each text alone at ORT_DISABLE_ALL vs ORT_ENABLE_ALL (the default every consumer gets). A
  runtime that fuses differently (ORT Mobile's saved optimisations, onnxruntime-web) lands somewhere between; int8
  graphs amplify the float fusions' last-bit differences, so this is recorded, not gated.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort

from compress.core.numerics import row_cosine, task_output
from runtimes.ort import cpu_session, select_feeds

BATCH_COSINE_MIN = 0.999  # alone vs batched: the bar a batch-independent artefact clears (min over the texts)
BATCH = 32
PAD_TO = 128


def encode(
    session: ort.InferenceSession, tokenizer, texts: list[str], task: str, max_length: int, pad_to: int = 0
) -> np.ndarray:
    """The task output of ``texts`` run as ONE batch, in order, padded to the longest text (or to ``pad_to``)."""
    enc = dict(tokenizer(texts, padding=True, truncation=True, max_length=max_length, return_tensors="np"))
    extra = pad_to - enc["input_ids"].shape[1]
    if extra > 0:
        pad_id = getattr(tokenizer, "pad_token_id", None) or 0
        enc = {
            k: np.pad(v, ((0, 0), (0, extra)), constant_values=pad_id if k == "input_ids" else 0)
            for k, v in enc.items()
        }
    feeds = select_feeds(session, enc)
    names = [o.name for o in session.get_outputs()]
    return np.asarray(task_output(dict(zip(names, session.run(None, feeds))), feeds["attention_mask"], task))


def alone(session: ort.InferenceSession, tokenizer, texts: list[str], task: str, max_length: int) -> np.ndarray:
    return np.concatenate([encode(session, tokenizer, [t], task, max_length) for t in texts])


def in_batches(
    session: ort.InferenceSession, tokenizer, texts: list[str], task: str, max_length: int, batch: int, pad_to: int = 0
) -> np.ndarray:
    """Each text's output from inside a ``batch``-text window (cyclic over ``texts``), the first window holding it."""
    n = len(texts)
    out: list[np.ndarray | None] = [None] * n
    for start in range(0, n, batch):
        idx = [(start + j) % n for j in range(batch)]
        res = encode(session, tokenizer, [texts[i] for i in idx], task, max_length, pad_to)
        for row, i in enumerate(idx):
            if out[i] is None:
                out[i] = res[row]
    return np.stack(out)


def _stats(a: np.ndarray, b: np.ndarray) -> dict:
    cos = row_cosine(a, b)
    return {
        "min": round(float(cos.min()), 6),
        "mean": round(float(cos.mean()), 6),
        "max_abs_diff": float(np.abs(a.astype(np.float64) - b).max()),
    }


def batch_consistency(
    path: Path,
    tokenizer,
    texts: list[str],
    task: str,
    max_length: int,
    batch: int = BATCH,
    pad_to: int = PAD_TO,
    threads: int = 0,
) -> dict:
    """Alone vs inside padded batches, and ORT_DISABLE_ALL vs ORT_ENABLE_ALL, as cosine statistics over ``texts``."""
    pad_to = min(pad_to, max_length)
    default = cpu_session(path, threads)
    single = alone(default, tokenizer, texts, task, max_length)
    padding = {
        "longest": _stats(single, in_batches(default, tokenizer, texts, task, max_length, batch)),
        f"{pad_to}_tokens": _stats(single, in_batches(default, tokenizer, texts, task, max_length, batch, pad_to)),
    }
    worst = min(padding.values(), key=lambda s: s["min"])
    unoptimised = alone(cpu_session(path, threads, level="disable_all"), tokenizer, texts, task, max_length)
    return {
        "texts": len(texts),
        "batch": batch,
        "threshold": BATCH_COSINE_MIN,
        "alone_vs_batch": {
            "min": worst["min"],
            "mean": min(s["mean"] for s in padding.values()),
            "max_abs_diff": max(s["max_abs_diff"] for s in padding.values()),
            "padding": padding,
        },
        "batch_independent": bool(worst["min"] >= BATCH_COSINE_MIN),
        "optimization_levels": {"compared": ["disable_all", "all"], **_stats(unoptimised, single)},
        "runtime": f"onnxruntime {ort.__version__} CPUExecutionProvider",
    }
