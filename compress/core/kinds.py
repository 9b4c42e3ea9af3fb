"""Model kinds and artefact layouts, read from config.json and file names (no torch here).

Model kinds (what the flows and the stage registry dispatch on): ``encoder`` (sentence embedding, feature
extraction, classification), ``causal-lm`` (decoder-only), ``seq2seq`` (encoder-decoder).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

ModelKind = Literal["encoder", "causal-lm", "seq2seq"]
MODEL_KINDS: tuple[ModelKind, ...] = ("encoder", "causal-lm", "seq2seq")
GenKind = Literal["text-generation", "text2text-generation"]
GEN_TASKS: tuple[GenKind, ...] = ("text-generation", "text2text-generation")
GEN_KIND_OF: dict[GenKind, ModelKind] = {"text-generation": "causal-lm", "text2text-generation": "seq2seq"}
# The ONNX files of a generative artefact folder (what optimum writes and its ORTModelFor* classes load).
ONNX_FILES: dict[str, tuple[str, ...]] = {
    "text-generation": ("model.onnx",),
    "text2text-generation": ("encoder_model.onnx", "decoder_model.onnx", "decoder_with_past_model.onnx"),
}


# Where an encoder artefact's graph lives: the one path sentence-transformers, Optimum and transformers.js all find
# without arguments (export.layout writes the folder; README, "What lands in the output folder").
ENCODER_GRAPH = "onnx/model.onnx"
LEGACY_GRAPH = "model.onnx"  # NPU artefacts (model.onnx + model_ctx.onnx) and folders written before the layout


def encoder_graph(folder: Path) -> Path:
    """The ONNX graph of an encoder artefact folder: ``onnx/model.onnx``, else a root ``model.onnx``."""
    new = folder / ENCODER_GRAPH
    return new if new.is_file() or not (folder / LEGACY_GRAPH).is_file() else folder / LEGACY_GRAPH


def generative_kind(config: dict) -> GenKind | None:
    """From a config.json dict: "text-generation" (causal LM), "text2text-generation" (seq2seq) or None."""
    archs = config.get("architectures") or []
    if config.get("is_encoder_decoder") or any(a.endswith("ForConditionalGeneration") for a in archs):
        return "text2text-generation"
    if any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in archs):
        return "text-generation"
    return None


def artifact_kind(folder: Path) -> GenKind | None:
    """Which generative layout an artefact folder holds (by its ONNX files), or None."""
    if not folder.is_dir():
        return None
    for kind in ("text2text-generation", "text-generation"):
        if all((folder / f).is_file() for f in ONNX_FILES[kind]) and (folder / "config.json").is_file():
            if generative_kind(json.loads((folder / "config.json").read_text())) == kind:
                return kind
    return None
