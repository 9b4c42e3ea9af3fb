"""What every stage is: a frozen typed config, an apply function, the level it works on, and what it declares.

- ``onnx`` stages transform an ONNX file: ``apply(cfg, src, dst, ctx) -> metrics``.
- ``torch`` stages transform the loaded torch model before export: ``apply(cfg, model, ctx) -> (model, metrics)``.
Stages never print; they return metrics (plain JSON-able dicts) that land in the report, and raise ``StageError``
(a ``CompressError``) for a parameter or an input that cannot work. Any other exception is a bug.

A registry entry (``StageType``) also declares, so the pipeline can check a recipe before any heavy work and fill
the stage's context by need:
- ``kinds``: the model kinds the stage is built for (``encoder``, ``causal-lm``, ``seq2seq``);
- ``precisions(cfg)``: the precisions the artefact gets from it, named as ``profiles/*.toml`` name them;
- ``needs``: the expensive context it reads (``NEEDS``), a set or a function of the config; the cheap inputs
  (calibration text, host facts, progress, the side-artefact folder) are always there;
- ``compresses``: whether it changes weights lossily (a compensation stage needs such a stage before it);
- ``report`` / ``plot``: optional renderers of its metrics for report.md and a plot file beside it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

from compress.core import Progress
from compress.core.data import PairSet
from compress.core.errors import CompressError
from compress.core.kinds import MODEL_KINDS, ModelKind
from runtimes.host import HostInfo

Level = Literal["torch", "onnx"]
# What a stage may need that costs something to provide:
# original     - an untouched copy of the loaded model (distillation teacher, error compensation)
# base         - the model a fine-tuned MODEL came from (--base or the stage's `base`)
# torch_model  - the float torch model beside an ONNX-level stage (sensitivities)
# scorer       - the run's first --eval as a function of an ONNX file (searches)
# labels       - labelled training pairs (--train), for a task loss
# earlier_compression - a recipe rule: an earlier torch stage must have compressed the weights
NEEDS = ("original", "base", "torch_model", "scorer", "labels", "earlier_compression")


class StageError(CompressError):
    """A stage parameter or input that cannot work; the message names the fix."""


@dataclass(frozen=True)
class Scorer:
    """The run's search metric on an ONNX file (higher is better): e.g. STS-B Spearman x100 of its embeddings."""

    name: str
    score: Callable[[Path], float]


@dataclass(frozen=True)
class OnnxContext:
    """Read-only inputs an ONNX stage may use."""

    calibration: tuple[dict[str, np.ndarray], ...]  # tokenized batches: input_ids/attention_mask (B, T) int64
    host: HostInfo
    model_type: str  # transformers config.model_type, e.g. "bert"
    num_heads: int
    hidden_size: int
    calibration_texts: tuple[str, ...] = ()
    precisions: tuple[str, ...] = ()  # what the target runs (profiles/*.toml `precisions`)
    torch_model: Any = None  # needs "torch_model": the float LoadedModel the export came from
    scorer: Scorer | None = None  # needs "scorer": the run's evaluator on an ONNX file
    progress: Progress | None = None
    kind: ModelKind = "encoder"  # the model kind: "auto" defaults differ for decoders (quant.dynamic's kernel)


@dataclass(frozen=True)
class TorchContext:
    """Read-only inputs a torch stage may use."""

    calibration: tuple[str, ...]  # unlabelled calibration text
    original: Any = None  # needs "original": the untouched LoadedModel
    artifact_dir: Path | None = None  # where a stage may write a side artefact (e.g. delta.safetensors)
    base_model: str | None = None  # needs "base": --base MODEL, the pre-fine-tuning model
    progress: Progress | None = None  # training stages report steps here (the CLI shows them)
    labelled: PairSet | None = None  # needs "labels": --train pairs with gold scores (STS-B format)
    memo: dict | None = None  # results a stage may reuse across runs of one process (a search's trials)


def no_precisions(cfg: Any) -> tuple[str, ...]:
    return ()


@dataclass(frozen=True)
class StageType:
    name: str
    level: Level
    config: type
    apply: Callable[..., Any]
    summary: str
    kinds: tuple[ModelKind, ...] = ("encoder",)
    precisions: Callable[[Any], tuple[str, ...]] = no_precisions
    needs: frozenset[str] | Callable[[Any], frozenset[str]] = field(default_factory=frozenset)
    compresses: bool = False
    report: Callable[[dict], list[str]] | None = None
    plot: Callable[[dict, Path], None] | None = None

    def needs_for(self, cfg: Any) -> frozenset[str]:
        """What this stage needs with this config (``needs`` may depend on it, e.g. a task loss needs labels)."""
        return frozenset(self.needs(cfg) if callable(self.needs) else self.needs)

    def __post_init__(self) -> None:  # a registry typo fails at import, not in a user's run
        needs = self.needs_for(self.config()) if callable(self.needs) else self.needs
        unknown = set(needs) - set(NEEDS) or set(self.kinds) - set(MODEL_KINDS)
        if unknown or self.level not in ("torch", "onnx"):
            raise TypeError(f"stage {self.name}: unknown level/needs/kinds {sorted(unknown) or self.level}")
