"""What every stage is: a frozen typed config, an apply function, and the level it works on.

- ``onnx`` stages transform an ONNX file: ``apply(cfg, src, dst, ctx) -> metrics``.
- ``torch`` stages transform the loaded torch model before export: ``apply(cfg, model, ctx) -> (model, metrics)``.
Stages never print; they return metrics (plain JSON-able dicts) that land in the report.
"""
from __future__ import annotations

import contextlib
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Literal

import numpy as np

from runtimes.host import HostInfo

Level = Literal["torch", "onnx"]


@dataclass(frozen=True)
class OnnxContext:
    """Read-only inputs an ONNX stage may use."""

    calibration: tuple[dict[str, np.ndarray], ...]   # tokenized batches: input_ids/attention_mask (B, T) int64
    host: HostInfo
    model_type: str                                   # transformers config.model_type, e.g. "bert"
    num_heads: int
    hidden_size: int
    # For search stages (quant.mixed), filled by the pipeline: the float torch model the export came from, the
    # calibration text itself, the target's precisions, the run's evaluator, and where to report progress.
    torch_model: Any = None
    calibration_texts: tuple[str, ...] = ()
    precisions: tuple[str, ...] = ()
    scorer: "Scorer | None" = None
    progress: Callable[[str], None] | None = None


@dataclass(frozen=True)
class Scorer:
    """The run's search metric on an ONNX file (higher is better): e.g. STS-B Spearman x100 of its embeddings."""

    name: str
    score: Callable[[Path], float]


@dataclass(frozen=True)
class TorchContext:
    """Read-only inputs a torch stage may use."""

    original: Any                 # the untouched LoadedModel (for error compensation, distillation, deltas)
    calibration: tuple[str, ...]  # unlabelled calibration text
    artifact_dir: Path | None = None   # where a stage may write a side artefact (e.g. delta.safetensors)
    base_model: str | None = None      # --base MODEL: the pre-fine-tuning model, for delta stages
    progress: Callable[[str], None] | None = None   # training stages report steps here (the CLI shows them)


@dataclass(frozen=True)
class StageType:
    name: str
    level: Level
    config: type
    apply: Callable[..., Any]
    summary: str


class StageError(ValueError):
    """A stage parameter that cannot work; the message names the fix."""


def file_bytes(path: Path) -> int:
    """Size of an ONNX model including any external-data files next to it."""
    extra = sum(p.stat().st_size for p in path.parent.glob(path.name + "*.data"))
    return path.stat().st_size + extra


@contextlib.contextmanager
def scratch_cwd():
    """Run a library call inside a throw-away working directory.

    ORT's symbolic shape inference, when it gives up, saves ``sym_shape_infer_temp.onnx`` plus a 90 MB
    external-data file into the *current* directory and never removes them; this keeps the user's folder clean.
    """
    old = os.getcwd()
    with tempfile.TemporaryDirectory(prefix="compress-scratch-") as tmp:
        os.chdir(tmp)
        try:
            yield Path(tmp)
        finally:
            os.chdir(old)
