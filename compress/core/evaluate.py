"""Evaluation specs: ``stsb:PATH``, ``fidelity`` and ``accuracy:PATH``, each scored on original and compressed.

An evaluator gets two functions texts -> outputs (the original fp32 export and the compressed artefact,
both run in ONNX Runtime) and returns a metric dict; nothing here knows how the outputs were made.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
from scipy.stats import spearmanr

from compress.core.data import read_labelled, read_stsb
from compress.core.errors import CompressError
from compress.core.numerics import row_cosine

Encoder = Callable[[list[str]], np.ndarray]
EVAL_KINDS = ("stsb", "fidelity", "accuracy", "ppl")
GENERATIVE_TASKS = ("text-generation", "text2text-generation")
EMBEDDING_TASKS = ("sentence-embedding", "feature-extraction")


@dataclass(frozen=True)
class EvalSpec:
    kind: Literal["stsb", "fidelity", "accuracy", "ppl"]
    path: Path | None = None

    def __str__(self) -> str:
        return self.kind if self.path is None else f"{self.kind}:{self.path}"


def parse_eval(text: str, task: str) -> EvalSpec:
    kind, _, path = text.partition(":")
    if kind not in EVAL_KINDS:
        raise CompressError(f"unknown eval '{text}': use stsb:PATH, fidelity, accuracy:PATH or ppl[:PATH]")
    if kind == "fidelity":
        return EvalSpec("fidelity")
    if task in GENERATIVE_TASKS and kind != "ppl":
        raise CompressError(
            f"--eval {text} does not apply to a generative model: use --eval ppl[:FILE] (token perplexity) or "
            "fidelity (next-token KL and top-1 agreement with the float model, greedy agreement)"
        )
    if kind == "ppl":
        if task != "text-generation":
            raise CompressError(f"ppl needs a causal language model, this one is {task}: use fidelity")
        if not path:
            return EvalSpec("ppl")
    if not path:
        raise CompressError(f"eval '{kind}' needs a file: {kind}:PATH")
    if kind == "stsb" and task not in EMBEDDING_TASKS:
        raise CompressError(f"stsb needs an embedding model, this one is {task}: use accuracy:PATH or fidelity")
    if kind == "accuracy" and task != "text-classification":
        raise CompressError(f"accuracy needs a classification model, this one is {task}: use stsb:PATH or fidelity")
    p = Path(path)
    if not p.is_file():
        raise CompressError(f"eval file {p} not found: pass {kind}:PATH with an existing file")
    return EvalSpec(kind, p)


def stsb_cosines(encode: Encoder, path: Path) -> tuple[np.ndarray, np.ndarray]:
    """(cosine(emb(s1), emb(s2)) per pair, gold scores) of an STS-B file."""
    pairs = read_stsb(path)
    return row_cosine(encode(pairs.first), encode(pairs.second)), np.asarray(pairs.scores, dtype=np.float64)


def spearman_x100(cosines: np.ndarray, gold: np.ndarray) -> float:
    return float(spearmanr(cosines, gold).statistic * 100)


def stsb_spearman(encode: Encoder, path: Path) -> float:
    """Spearman x 100 between cosine(emb(s1), emb(s2)) and the gold score."""
    return spearman_x100(*stsb_cosines(encode, path))


def accuracy(encode: Encoder, path: Path) -> float:
    data = read_labelled(path)
    pred = encode(data.texts).argmax(-1)
    return float((pred == np.asarray(data.labels)).mean() * 100)


def search_score(spec: EvalSpec, encode: Encoder, texts: list[str], reference: np.ndarray | None) -> float:
    """One number, higher is better, for a search over candidate models (quant.mixed): Spearman x100, accuracy %,
    or fidelity as mean cosine x100 to the reference outputs on ``texts`` (the calibration half, so the held-out
    sentences the report's fidelity uses stay unseen by the search)."""
    if spec.kind == "fidelity":
        return float(row_cosine(reference, encode(texts)).mean() * 100)
    return stsb_spearman(encode, spec.path) if spec.kind == "stsb" else accuracy(encode, spec.path)


def evaluate(spec: EvalSpec, original: Encoder, compressed: Encoder, heldout: list[str]) -> dict:
    if spec.kind == "fidelity":
        cos = row_cosine(original(heldout), compressed(heldout))
        return {
            "name": str(spec),
            "metric": "mean cosine to original outputs (held-out shipped sentences)",
            "original": 1.0,
            "compressed": round(float(cos.mean()), 6),
            "min": round(float(cos.min()), 6),
            "samples": len(heldout),
            "higher_is_better": True,
        }
    score = stsb_spearman if spec.kind == "stsb" else accuracy
    orig, comp = score(original, spec.path), score(compressed, spec.path)
    metric = "Spearman x100 (cosine vs gold)" if spec.kind == "stsb" else "accuracy %"
    return {
        "name": str(spec),
        "metric": metric,
        "original": round(orig, 3),
        "compressed": round(comp, 3),
        "delta": round(comp - orig, 3),
        "higher_is_better": True,
    }
