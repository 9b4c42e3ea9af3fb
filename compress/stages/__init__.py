"""The stage registry: every stage type a recipe may name, read top to bottom, with what each declares
(model kinds, precisions it produces, context it needs; ``compress.stages.base``). Adding a stage is one entry
here plus its own module; the pipeline, the flows and the report read everything else from the entry."""

from __future__ import annotations

from compress.stages.base import NEEDS, OnnxContext, Scorer, StageError, StageType, TorchContext
from compress.stages.delta import DeltaPrune, apply_delta_prune
from compress.stages.graph import GraphOptimize, apply_graph_optimize
from compress.stages.hybrid import HybridQuant, apply_hybrid
from compress.stages.int4 import Int4Quant, apply_int4
from compress.stages.layers import LayerPrune, apply_layers
from compress.stages.lowrank import LowRank, apply_eora, apply_svd
from compress.stages.mixed import MixedQuant, apply_mixed
from compress.stages.mixed_report import mixed_markdown, plot_mixed
from compress.stages.nm import NMPrune, apply_nm
from compress.stages.prune import GradualPrune, apply_gradual
from compress.stages.quant import DynamicQuant, StaticQuant, apply_dynamic, apply_static
from compress.stages.recover import Recover, apply_recover, recover_needs

ALL_KINDS = ("encoder", "causal-lm", "seq2seq")
LM = ("encoder", "causal-lm")  # torch stages that know decoder layer names, next-token distillation and LM text

# fmt: off
_STAGES = (
    # torch level: run on the loaded model before export
    StageType("quant.int4", "torch", Int4Quant, apply_int4,
              "int4 weight-only RTN, block-wise, on ORT's MatMulNBits grid (packed at export)",
              precisions=lambda cfg: ("int4-weights" if cfg.bits == 4 else "int8-weights",)
              + (("int8-weights",) if cfg.lm_head == "int8" else ()),
              kinds=LM, compresses=True),
    StageType("prune.gradual", "torch", GradualPrune, apply_gradual, "gradual magnitude pruning (cubic schedule), "
              "unstructured / FFN channel / head, recovered by distillation", needs=frozenset({"original"}),
              kinds=LM, compresses=True),
    StageType("prune.nm", "torch", NMPrune, apply_nm, "N:M sparsity: one-shot magnitude, or trained with progressive "
              "gradient flow (MDGF / SDGF) or SR-STE, recovered by distillation", needs=frozenset({"original"}),
              kinds=LM, compresses=True),
    StageType("prune.layers", "torch", LayerPrune, apply_layers, "depth pruning: whole blocks removed by measured "
              "importance (block influence or first-order Taylor); follow with recover",
              needs=lambda cfg: frozenset({"original"} if cfg.importance == "taylor" else ()), kinds=LM,
              compresses=True),
    StageType("recover", "torch", Recover, apply_recover, "recovery training after structural pruning: task loss "
              "(CoSENT on --train pairs) + output (next-token KL for a causal LM) and intermediate-layer distillation",
              needs=recover_needs, kinds=LM),
    StageType("prune.delta", "torch", DeltaPrune, apply_delta_prune, "delta-parameter pruning against --base (DARE, "
              "DAREx-q, magnitude, importance); writes delta.safetensors", needs=frozenset({"base"}), kinds=LM),
    StageType("lowrank.eora", "torch", LowRank, apply_eora,
              "EoRA: low-rank compensation of the compression error in the activation eigenspace",
              needs=frozenset({"original", "earlier_compression"}), kinds=LM),
    StageType("lowrank.svd", "torch", LowRank, apply_svd,
              "low-rank compensation by plain SVD of the weight error (EoRA's baseline)",
              needs=frozenset({"original", "earlier_compression"}), kinds=LM),
    # onnx level: run on the exported graph
    StageType("graph.optimize", "onnx", GraphOptimize, apply_graph_optimize,
              "ONNX Runtime transformer fusions (attention, layer norm, GELU)"),
    StageType("quant.dynamic", "onnx", DynamicQuant, apply_dynamic,
              "ONNX Runtime dynamic int8: int8 weights, activations quantized at run time",
              kinds=ALL_KINDS, precisions=lambda cfg: ("int8-dynamic",), compresses=True),
    StageType("quant.hybrid", "onnx", HybridQuant, apply_hybrid,
              "int8 with batch-independent activation scales: calibrated fixed scales, per-token dynamic scales "
              "where activations have outliers (FFN down-projection); a text's output does not depend on its "
              "batch-mates or padding", precisions=lambda cfg: ("int8-dynamic",), compresses=True),
    StageType("quant.static", "onnx", StaticQuant, apply_static,
              "ONNX Runtime static int8 QDQ, per-channel weights, activations calibrated on text",
              precisions=lambda cfg: ("int8-qdq",), compresses=True),
    StageType("quant.mixed", "onnx", MixedQuant, apply_mixed,
              "Hessian-guided mixed precision (float / int8 / int4 per layer), bisection inside an accuracy budget "
              "(--max-drop) measured with the run's first --eval",
              precisions=lambda cfg: tuple(cfg.candidates), needs=frozenset({"torch_model", "scorer"}),
              kinds=LM, compresses=True, report=mixed_markdown, plot=plot_mixed),
)
# fmt: on
REGISTRY: dict[str, StageType] = {t.name: t for t in _STAGES}

__all__ = ["NEEDS", "REGISTRY", "OnnxContext", "Scorer", "StageError", "StageType", "TorchContext"]
