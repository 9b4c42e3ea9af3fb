"""ONNX op vocabularies the layers share (which ops mean "quantized", which compute in int8), and op counting."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import onnx

QDQ_OPS = frozenset({"QuantizeLinear", "DequantizeLinear"})
# Ops that compute in int8 whatever their neighbours are (ORT's integer kernels and com.microsoft fused ops).
INT8_OPS = frozenset(
    {
        "MatMulInteger",
        "QLinearMatMul",
        "QLinearConv",
        "ConvInteger",
        "QAttention",
        "DynamicQuantizeMatMul",
        "MatMulIntegerToFloat",
        "QGemm",
    }
)
# 4-bit weight-only kernels (com.microsoft).
INT4_OPS = frozenset({"MatMulNBits", "GatherBlockQuantized"})
# Run-time (dynamic) quantization and 4-bit kernels: the CPU recipes' paths, not TensorRT / CUDA int8 paths.
DYNAMIC_OPS = frozenset(
    {"DynamicQuantizeLinear", "MatMulInteger", "DynamicQuantizeMatMul", "MatMulNBits", "QAttention"}
)
# Any of these marks a graph as quantized already.
QUANTIZED_OPS = QDQ_OPS | INT8_OPS | INT4_OPS | {"DynamicQuantizeLinear"}


def op_counts(model: str | Path | onnx.ModelProto) -> Counter:
    """Nodes per op type of a graph (a path is read without its external weights)."""
    if not isinstance(model, onnx.ModelProto):
        model = onnx.load(str(model), load_external_data=False)
    return Counter(n.op_type for n in model.graph.node)


def quantized_counts(model: str | Path | onnx.ModelProto) -> dict[str, int]:
    """Nodes per quantized op type: what a quantization stage reports it produced."""
    return {op: n for op, n in op_counts(model).items() if op in QUANTIZED_OPS}


def sweep(g) -> None:
    """Drop nodes whose outputs nothing reads, then initializers no node reads (tables a rewrite replaced). Top-level
    graph only: not for graphs with subgraphs (If / Loop bodies read outer initializers)."""
    while True:
        used = {i for n in g.node for i in n.input} | {o.name for o in g.output}
        live = [n for n in g.node if any(o in used for o in n.output)]
        if len(live) == len(g.node):
            break
        del g.node[:]
        g.node.extend(live)
    used = {i for n in g.node for i in n.input}
    kept = [t for t in g.initializer if t.name in used]
    del g.initializer[:]
    g.initializer.extend(kept)
