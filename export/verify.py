"""Parity of an ONNX artefact against the torch model on the same inputs."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from compress.core.models import LoadedModel, torch_outputs
from compress.core.numerics import row_cosine
from runtimes.encode import ort_outputs
from runtimes.ort import cpu_session

FLOAT_COSINE_MIN = 0.999


@dataclass(frozen=True)
class Parity:
    cosine_min: float
    cosine_mean: float
    max_abs_diff: float
    samples: int
    threshold: float | None  # None: recorded, not gated (e.g. a quantized artefact)
    passed: bool

    def as_dict(self) -> dict:
        return asdict(self)


def compare(reference: np.ndarray, candidate: np.ndarray, threshold: float | None) -> Parity:
    cos = row_cosine(reference, candidate)
    ok = threshold is None or float(cos.min()) >= threshold
    return Parity(
        cosine_min=round(float(cos.min()), 6),
        cosine_mean=round(float(cos.mean()), 6),
        max_abs_diff=float(np.abs(reference - candidate).max()),
        samples=len(cos),
        threshold=threshold,
        passed=bool(ok),
    )


def verify_against_torch(
    lm: LoadedModel,
    onnx_path: Path,
    texts: list[str],
    threshold: float | None = FLOAT_COSINE_MIN,
    reference: np.ndarray | None = None,
) -> Parity:
    """Run torch and ORT on the same texts; cosine and max-abs difference of the task outputs."""
    ref = torch_outputs(lm, texts) if reference is None else reference
    got = ort_outputs(cpu_session(onnx_path, threads=0), lm.tokenizer, texts, lm.task, lm.max_length)
    return compare(ref, got, threshold)
