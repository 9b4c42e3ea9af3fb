"""Language-model evaluation: token perplexity, next-token fidelity to the float model, and the text they use.

Everything here works on a function ``logits(ids) -> (T, V)`` (one sequence scored from an empty KV cache), so
it does not know whether torch or ONNX Runtime computes it.

How the text becomes chunks (reproducible; the numbers move a lot with these choices, so they are fixed):
1. Sentences: an STS-B file (tab-separated, 7+ columns) gives sentence 1 and sentence 2 of every row, in file order;
   any other file gives one text per line (``compress.core.data.read_texts``: .txt, .jsonl, .csv). The default text
   is the held-out half of the shipped sentences (the odd lines, never calibration text).
2. ``random.Random(seed).shuffle`` (seed 0) of the sentence list (STS-B files are sorted by genre: their first
   tokens are near-duplicate video captions), then ``"\\n".join``.
3. The tokenizer, once, on the whole string, without special tokens (no start token).
4. The first ``chunks x length`` tokens (default 15 x 256, fewer chunks when the text is shorter), cut into
   consecutive non-overlapping chunks. Each chunk is scored from an empty KV cache in one prefill; the negative
   log-likelihood is summed over the ``length - 1`` predicted positions of every chunk; perplexity =
   exp(total NLL / predicted tokens).
"""

from __future__ import annotations

import csv
import io
import random
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from compress.core.data import read_texts, read_utf8
from compress.core.errors import CompressError

Logits = Callable[[np.ndarray], np.ndarray]  # (T,) int64 ids -> (T, V) float32 logits
CHUNKS, LENGTH, SEED = 15, 256, 0


def context_length(config: dict) -> int:
    """The context a language model is calibrated, trained and scored with (config.json as a dict): LENGTH tokens,
    or fewer when its learned positions are fewer."""
    limit = config.get("n_positions") or config.get("max_position_embeddings") or LENGTH
    return int(min(LENGTH, limit))


def sentences_of(path: Path) -> list[str]:
    """Sentences 1 and 2 of every row of an STS-B file, else one text per line of any text file."""
    content = read_utf8(path)
    rows = [r for r in csv.reader(io.StringIO(content), delimiter="\t", quoting=csv.QUOTE_NONE) if r]
    if rows and all(len(r) >= 7 for r in rows[: min(len(rows), 20)]):
        return [s.strip() for r in rows if len(r) >= 7 for s in (r[5], r[6]) if s.strip()]
    return read_texts(path)


def token_chunks(tokenizer: Any, sentences: list[str], chunks: int = CHUNKS, length: int = LENGTH,
                 seed: int = SEED) -> np.ndarray:  # fmt: skip
    """(n, length) int64 token ids: shuffled (seeded) sentences joined by newlines, tokenized once, cut into n <=
    ``chunks`` consecutive chunks. A text too short for one chunk of ``length`` gives one shorter chunk."""
    s = list(sentences)
    random.Random(seed).shuffle(s)
    ids = tokenizer("\n".join(s), add_special_tokens=False)["input_ids"]
    n = min(chunks, len(ids) // length)
    if n == 0:
        if len(ids) < 8:
            raise CompressError("the perplexity text holds fewer than 8 tokens: pass a longer file with ppl:FILE")
        return np.asarray(ids, dtype=np.int64)[None]
    return np.asarray(ids[: n * length], dtype=np.int64).reshape(n, length)


def packed_texts(tokenizer: Any, sentences: list[str], length: int = LENGTH) -> list[str]:
    """Sentences joined by newlines into texts of about ``length`` tokens (in order): the calibration and training
    text of a language model, which sees long contexts, not one short sentence per sequence."""
    out, current, n = [], [], 0
    for s in sentences:
        k = len(tokenizer(s, add_special_tokens=False)["input_ids"]) + 1
        if current and n + k > length:
            out.append("\n".join(current))
            current, n = [], 0
        current.append(s)
        n += k
    if current:
        out.append("\n".join(current))
    return out


def log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64) - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def perplexity(logits: Logits, chunks: np.ndarray) -> dict:
    """Token perplexity over the chunks (each from an empty cache)."""
    nll, n = 0.0, 0
    for c in chunks:
        lp = log_softmax(logits(c))
        nll -= float(lp[np.arange(len(c) - 1), c[1:]].sum())
        n += len(c) - 1
    return {"ppl": float(np.exp(nll / n)), "nll": nll / n, "tokens": n}


def reference_logprobs(logits: Logits, chunks: np.ndarray) -> list[np.ndarray]:
    return [log_softmax(logits(c)).astype(np.float32) for c in chunks]


def next_token_fidelity(reference: list[np.ndarray], logits: Logits, chunks: np.ndarray) -> dict:
    """Mean KL(p_float || p_compressed) per position and top-1 agreement with the float model."""
    kl, agree, n = 0.0, 0, 0
    for c, ref in zip(chunks, reference):
        lp = log_softmax(logits(c))
        kl += float((np.exp(ref) * (ref - lp)).sum())
        agree += int((ref.argmax(-1) == lp.argmax(-1)).sum())
        n += len(c)
    return {"kl": kl / n, "top1": agree / n, "positions": n}


def ppl_rise(original: float, compressed: float) -> float:
    """Relative perplexity rise in percent."""
    return (compressed / original - 1.0) * 100.0
