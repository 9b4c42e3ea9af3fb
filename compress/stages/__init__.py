"""The stage registry: every stage type a recipe may name, read top to bottom."""
from __future__ import annotations

from compress.stages.base import OnnxContext, StageError, StageType
from compress.stages.graph import GraphOptimize, apply_graph_optimize
from compress.stages.quant import DynamicQuant, StaticQuant, apply_dynamic, apply_static

REGISTRY: dict[str, StageType] = {
    "graph.optimize": StageType("graph.optimize", "onnx", GraphOptimize, apply_graph_optimize,
                                "ONNX Runtime transformer fusions (attention, layer norm, GELU)"),
    "quant.dynamic": StageType("quant.dynamic", "onnx", DynamicQuant, apply_dynamic,
                               "ONNX Runtime dynamic int8: int8 weights, activations quantized at run time"),
    "quant.static": StageType("quant.static", "onnx", StaticQuant, apply_static,
                              "ONNX Runtime static int8 QDQ, per-channel weights, activations calibrated on text"),
}

__all__ = ["REGISTRY", "OnnxContext", "StageError", "StageType"]
