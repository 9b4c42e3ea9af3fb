"""Static shape inference for ONNX graphs at one concrete input shape (no torch, no model run).

A copy of the graph gets its inputs fixed to (batch, seq); one walk in topological order then folds the shape
arithmetic (Shape -> Gather -> Concat -> Reshape ...) to constants, as a compiler does for static shapes, takes
standard ops' output types from their ONNX inference functions and com.microsoft fused ops' from ORT's contrib
op specs. Used by the roofline estimator (``runtimes.roofline``).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from compress.core.errors import CompressError
from compress.core.onnx_ops import QDQ_OPS

TOKEN_INPUTS = ("input_ids", "attention_mask", "token_type_ids", "position_ids")
EMBED_OPS = {"EmbedLayerNormalization", "QEmbedLayerNormalization"}
FOLD_LIMIT = 1 << 16  # elements: constants up to this size are evaluated, larger ones are weights
_NO_FOLD = QDQ_OPS | {
    "DynamicQuantizeLinear",
    "RandomNormal",
    "RandomUniform",
    "RandomNormalLike",
    "RandomUniformLike",
    "Multinomial",
    "Bernoulli",
    "If",
    "Loop",
    "Scan",
}


class ShapeError(CompressError):
    """An input whose size cannot be known; the message says what to pass."""


@dataclass(frozen=True)
class TensorInfo:
    shape: tuple[int, ...]
    elem_type: int

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


def load_skeleton(model: str | Path | onnx.ModelProto) -> onnx.ModelProto:
    """The graph with large weights' data dropped (dims and types kept): shape inference needs no more."""
    if isinstance(model, onnx.ModelProto):
        m = onnx.ModelProto()
        m.CopyFrom(model)
    else:
        m = onnx.load(str(model), load_external_data=False)  # onnx.load; external weights stay on disk
    for t in m.graph.initializer:
        if math.prod(t.dims) > FOLD_LIMIT and t.data_location != TensorProto.EXTERNAL:
            for f in ("raw_data", "float_data", "int32_data", "int64_data", "double_data", "uint64_data"):
                t.ClearField(f)
    return m


def concrete_inputs(
    model: onnx.ModelProto, batch: int, seq: int, input_shapes: dict[str, tuple[int, ...]] | None = None
) -> dict[str, tuple[int, ...]]:
    """Each graph input's shape: token inputs are (batch, seq); other symbolic dims follow the same names,
    a leading one is the batch; ``input_shapes`` overrides any input."""
    input_shapes = dict(input_shapes or {})
    inits = {t.name for t in model.graph.initializer}
    inputs = [i for i in model.graph.input if i.name not in inits]
    symbols: dict[str, int] = {}
    for i in inputs:
        dims = i.type.tensor_type.shape.dim
        if i.name in TOKEN_INPUTS and len(dims) == 2:
            for d, v in zip(dims, (batch, seq)):
                if d.dim_param:
                    symbols[d.dim_param] = v
    out = {}
    for i in inputs:
        if i.name in input_shapes:
            out[i.name] = tuple(int(v) for v in input_shapes[i.name])
            continue
        if not i.type.tensor_type.HasField("shape"):
            raise ShapeError(f"input '{i.name}' has no shape in the graph: pass input_shapes={{'{i.name}': (...)}}")
        dims = i.type.tensor_type.shape.dim
        if i.name in TOKEN_INPUTS and len(dims) == 2:
            out[i.name] = (batch, seq)
            continue
        shape = []
        for axis, d in enumerate(dims):
            if d.HasField("dim_value") and d.dim_value > 0:
                shape.append(d.dim_value)
            elif d.dim_param in symbols:
                shape.append(symbols[d.dim_param])
            elif axis == 0:
                shape.append(batch)
            elif re.search(r"seq|len|token", d.dim_param, re.I):
                shape.append(seq)
            else:
                raise ShapeError(
                    f"input '{i.name}' dim {axis} ('{d.dim_param or '?'}') has no size: pass "
                    f"input_shapes={{'{i.name}': (...)}}"
                )
        out[i.name] = tuple(shape)
    return out


@dataclass(frozen=True)
class Shapes:
    """Concrete shapes of the graph's tensors at one input shape, and which tensors are compile-time constants."""

    infos: dict[str, TensorInfo]
    constants: frozenset[str]  # initializers and outputs of nodes folded to values (shape arithmetic)
    folded: int  # nodes folded


def infer_shapes(model: onnx.ModelProto, inputs: dict[str, tuple[int, ...]]) -> Shapes:
    """One walk in topological order: a node whose inputs are known small constants (or a Shape of a concrete
    tensor) is evaluated, as a compiler folds shape arithmetic for static shapes; other standard ops get their
    output types from onnx.shape_inference.infer_node_outputs, com.microsoft fused ops from ``contrib_outputs``.
    ``model``'s inputs are set to ``inputs``.

    Not onnx.shape_inference.infer_shapes on the whole graph: it infers nothing past a com.microsoft op, leaves
    Shape -> Slice chains symbolic and keeps the exporter's stale symbolic value_info. Not
    onnxruntime.tools.symbolic_shape_infer: importing onnxruntime.tools imports torch, it fails on fused BERT
    exports (Expand) and then writes sym_shape_infer_temp.onnx plus a copy of the weights into the working
    directory. A node whose shape stays unknown is reported in the caveats."""
    from onnx.reference import ReferenceEvaluator  # onnx's numpy evaluator, used on one small node at a time

    for i in model.graph.input:
        if i.name in inputs:
            shape = i.type.tensor_type.shape
            shape.ClearField("dim")
            for v in inputs[i.name]:
                shape.dim.add().dim_value = v
    infos = {t.name: TensorInfo(tuple(t.dims), t.data_type) for t in model.graph.initializer}
    infos.update({i.name: info for i in model.graph.input if (info := _info(i.type)) is not None})
    values = {
        t.name: numpy_helper.to_array(t)
        for t in model.graph.initializer
        if math.prod(t.dims) <= FOLD_LIMIT and t.data_location != TensorProto.EXTERNAL
    }
    constants = {t.name for t in model.graph.initializer}
    opsets = {o.domain or "": o.version for o in model.opset_import}
    folded = 0
    for node in model.graph.node:
        outs = _fold(node, infos, values, model, ReferenceEvaluator)
        if outs is not None:
            folded += 1
            for name, value in zip(node.output, outs):
                infos[name] = TensorInfo(value.shape, helper.np_dtype_to_tensor_dtype(value.dtype))
                constants.add(name)
                if value.size <= FOLD_LIMIT:
                    values[name] = value
            continue
        if node.domain in ("", "ai.onnx"):
            found = _standard_outputs(node, infos, values, model, opsets)
        elif node.domain == "com.microsoft":
            found = dict(zip(node.output, contrib_outputs(node, infos)))
        else:
            found = {}
        infos.update({k: v for k, v in found.items() if k and v is not None})
    return Shapes(infos=infos, constants=frozenset(constants), folded=folded)


def _fold(
    node: onnx.NodeProto, infos: dict[str, TensorInfo], values: dict[str, np.ndarray], model: onnx.ModelProto, evaluator
) -> list[np.ndarray] | None:
    """The node's output values when they are known before run time, else None."""
    if node.op_type == "Shape" and node.domain in ("", "ai.onnx") and node.input[0] in infos:
        start, end = attr(node, "start", 0), attr(node, "end", None)
        return [np.array(infos[node.input[0]].shape, dtype=np.int64)[start:end]]
    if node.domain not in ("", "ai.onnx") or node.op_type in _NO_FOLD or not all(i in values for i in node.input if i):
        return None
    try:
        single = helper.make_model(
            helper.make_graph([node], "fold", [], [helper.make_value_info(o, onnx.TypeProto()) for o in node.output]),
            opset_imports=list(model.opset_import),
            ir_version=model.ir_version,
        )
        outs = evaluator(single).run(None, {i: values[i] for i in node.input if i})
        outs = [np.asarray(v) for v in outs]
        for v in outs:
            helper.np_dtype_to_tensor_dtype(v.dtype)  # raises for strings and other non-tensor values
    except Exception:  # an op the reference evaluator lacks, or an odd value: infer the shape instead
        return None
    return outs


def _standard_outputs(
    node: onnx.NodeProto,
    infos: dict[str, TensorInfo],
    values: dict[str, np.ndarray],
    model: onnx.ModelProto,
    opsets: dict[str, int],
) -> dict[str, TensorInfo | None]:
    subgraph = (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS)
    if not all(i in infos for i in node.input if i) or any(a.type in subgraph for a in node.attribute):
        return {}
    try:
        schema = onnx.defs.get_schema(node.op_type, opsets.get(node.domain or "", 1), node.domain or "")
        types = {i: helper.make_tensor_type_proto(infos[i].elem_type, infos[i].shape) for i in node.input if i}
        data = {i: numpy_helper.from_array(values[i], i) for i in node.input if i in values}
        # onnx.shape_inference.infer_node_outputs: the op's own inference function, constant inputs included
        out = onnx.shape_inference.infer_node_outputs(
            schema, node, types, data, opset_imports=list(model.opset_import), ir_version=model.ir_version
        )
    except Exception:  # unknown schema or an inference error: the node stays unknown (and is reported)
        return {}
    return {name: _info(tp) for name, tp in out.items()}


def _info(tp: onnx.TypeProto) -> TensorInfo | None:
    tt = tp.tensor_type
    if not tp.HasField("tensor_type") or not tt.HasField("shape"):
        return None
    dims = [d.dim_value if d.HasField("dim_value") else -1 for d in tt.shape.dim]
    return TensorInfo(tuple(dims), tt.elem_type) if all(d >= 0 for d in dims) else None


def contrib_outputs(node: onnx.NodeProto, infos: dict[str, TensorInfo]) -> list[TensorInfo | None]:
    """Output shapes of com.microsoft fused ops ONNX has no schema for (from ORT's contrib op specs)."""
    ins = [infos.get(i) if i else None for i in node.input]
    x = ins[0] if ins else None
    op = node.op_type
    if x is None:
        return []
    if op in (
        "BiasGelu",
        "FastGelu",
        "Gelu",
        "QuickGelu",
        "BiasAdd",
        "BiasSoftmax",
        "LayerNormalization",
        "SimplifiedLayerNormalization",
        "RotaryEmbedding",
    ):
        return [x]
    if op == "BiasSplitGelu":
        return [TensorInfo(x.shape[:-1] + (x.shape[-1] // 2,), x.elem_type)]
    if op in ("SkipLayerNormalization", "SkipSimplifiedLayerNormalization"):
        return [x, None, None, x]  # output 3: input + skip (+ bias)
    if op in ("Attention", "QAttention") and len(ins) > 1 and ins[1] is not None and len(x.shape) == 3:
        qkv = attr(node, "qkv_hidden_sizes", None)
        v_hidden = qkv[2] if qkv else ins[1].shape[-1] // 3
        dtype = ins[2].elem_type if len(ins) > 2 and ins[2] is not None else TensorProto.FLOAT
        return [TensorInfo(x.shape[:2] + (v_hidden,), dtype)]
    if op == "MultiHeadAttention" and len(x.shape) == 3:
        v = ins[2] if len(ins) > 2 else None
        width = v.shape[-1] if v is not None and len(v.shape) == 3 else x.shape[-1]
        return [TensorInfo(x.shape[:2] + (width,), x.elem_type)]
    if op == "GroupQueryAttention" and len(x.shape) == 3:  # query (B, S, Nq*h), or packed Q|K|V when no key
        heads, kv_heads = attr(node, "num_heads", 1), attr(node, "kv_num_heads", 1)
        packed = len(ins) < 2 or ins[1] is None
        width = x.shape[-1] * heads // (heads + 2 * kv_heads) if packed else x.shape[-1]
        return [TensorInfo(x.shape[:2] + (width,), x.elem_type)]
    if op in EMBED_OPS and len(ins) > 2 and ins[2] is not None:
        gamma = ins[5] if len(ins) > 5 else None
        dtype = gamma.elem_type if op == "EmbedLayerNormalization" and gamma is not None else TensorProto.FLOAT
        hidden = TensorInfo(x.shape + (ins[2].shape[-1],), dtype)
        return [hidden, TensorInfo(x.shape[:1], TensorProto.INT32), hidden]
    if op == "MatMulNBits":
        return [TensorInfo(x.shape[:-1] + (attr(node, "N", 0),), x.elem_type)]
    if op == "GatherBlockQuantized" and len(ins) > 2 and ins[1] is not None and ins[2] is not None:
        axis = attr(node, "gather_axis", 0) % max(len(x.shape), 1)  # int4 table (V, H); output dtype = scales'
        return [TensorInfo(x.shape[:axis] + ins[1].shape + x.shape[axis + 1 :], ins[2].elem_type)]
    if (
        op in ("DynamicQuantizeMatMul", "MatMulIntegerToFloat", "FusedMatMul", "GemmFastGelu")
        and len(ins) > 1
        and ins[1] is not None
    ):
        a, b = x.shape, ins[1].shape
        if len(a) < 2 or len(b) < 2:
            return []
        dtype = x.elem_type
        if op == "MatMulIntegerToFloat":
            dtype = ins[2].elem_type if len(ins) > 2 and ins[2] is not None else TensorProto.FLOAT
        m = a[-1] if attr(node, "transA", 0) else a[-2]
        n = b[-2] if attr(node, "transB", 0) else b[-1]
        return [TensorInfo(tuple(np.broadcast_shapes(a[:-2], b[:-2])) + (m, n), dtype)]
    return []


def attr(node: onnx.NodeProto, name: str, default):
    for a in node.attribute:
        if a.name == name:
            return helper.get_attribute_value(a)
    return default
