"""``quant.hybrid``: int8 whose output for a text does not depend on the other texts in its batch, nor on padding.

ORT's ``quantize_dynamic`` (``quant.dynamic``) quantizes every MatMul input with ``DynamicQuantizeLinear``: ONE uint8
scale over the whole [batch, seq, hidden] activation, padding included. The same sentence alone and inside a padded
batch of 32 then gives different embeddings (MiniLM: min cosine 0.98), so a search index built in batches and a
query embedded alone are not interchangeable. This stage stands beside ``quantize_dynamic`` (weights exactly as
``quant.dynamic`` makes them: int8, per-channel) and rewrites only how the activations are quantized:

- **fixed scales** for the well-behaved MatMul inputs (after LayerNorm, the attention context): per-tensor uint8
  scale and zero point calibrated on text (padding excluded), ``DynamicQuantizeLinear`` -> ``QuantizeLinear`` with
  constants, and ``MatMulInteger -> Cast -> Mul(a_scale * w_scale) [-> Add(bias)]`` becomes one
  ``com.microsoft.MatMulIntegerToFloat`` (ORT's own fusion does not fire once the scales are constants);
- **per-token dynamic scales** for the inputs with outliers, by default those fed by an activation function (the FFN
  down-projection, after GELU: a fixed per-tensor scale costs MiniLM 0.05 fidelity there, README):
  ``s = max|x| / 127`` per token, ``QuantizeLinear`` blocked along the hidden axis (opset 21) with zero point 128,
  then ``MatMulIntegerToFloat(q, W, 1.0, w_scale, 128) * s``. The row scale is a separate ``Mul`` on purpose: left
  inside the ``Mul(a_scale, w_scale)`` pattern, ORT_ENABLE_ALL fuses it into ``MatMulIntegerToFloat``, whose kernel
  reads ONE a_scale value, and every row gets the first row's scale (measured: fidelity 0.68, STS-B -5.6).

Both kinds are functions of one token (per-token) or of nothing at run time (fixed), so the output of a text is the
same alone and in any batch. Chosen by measurement among static QDQ, padding-excluded dynamic, per-row and per-token
dynamic scales (``benchmarks/consistency.py``, README "Batch-independent embeddings").
"""

from __future__ import annotations

import fnmatch
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from compress.core.fs import file_bytes
from compress.core.onnx_ops import quantized_counts
from compress.stages.base import OnnxContext, StageError
from compress.stages.quant import DynamicQuant, _check_choice, apply_dynamic, calibration_feeds
from runtimes.ort import tensor_ranges

AUTO = "auto"  # per_token: MatMuls whose input comes from an activation function (the FFN down-projection)
ACTIVATIONS = frozenset(
    {"Gelu", "FastGelu", "BiasGelu", "QuickGelu", "Erf", "Relu", "Tanh", "Sigmoid", "Elu", "Selu", "HardSwish"}
)
# Walking back from a MatMul input, these end the search: the activation must be in the same block.
BOUNDARIES = frozenset({"MatMul", "Gemm", "MatMulInteger", "LayerNormalization", "SkipLayerNormalization", "Softmax"})
MIN_OPSET = 18  # the per-token path writes opset-18 reductions and raises the graph to opset 21 (blocked quantize)


@dataclass(frozen=True)
class HybridQuant:
    # MatMul node names (fnmatch) whose input gets per-token scales; "auto": those fed by an activation function
    per_token: tuple[str, ...] = (AUTO,)
    symmetric: bool = True  # per-token: max|x| / 127, zero point 128; false: DynamicQuantizeLinear's formula per token
    samples: int = 100  # calibration sentences for the fixed scales
    per_channel: bool = True  # weights, as quant.dynamic
    reduce_range: str = "false"
    op_types: tuple[str, ...] = ()  # empty: every op type quantize_dynamic takes (MatMul, Gather, ...)
    exclude: tuple[str, ...] = ()  # node names or fnmatch patterns kept in float

    def __post_init__(self) -> None:
        _check_choice("quant.hybrid", "reduce_range", self.reduce_range, ("auto", "true", "false"))
        if self.samples < 1:
            raise StageError(f"quant.hybrid: samples={self.samples} must be >= 1")


def apply_hybrid(cfg: HybridQuant, src: Path, dst: Path, ctx: OnnxContext) -> dict:
    opset = _default_opset(onnx.load(str(src), load_external_data=False))
    if opset < MIN_OPSET:
        raise StageError(
            f"quant.hybrid needs a graph at opset >= {MIN_OPSET} (this one is {opset}): re-export it with opset 18"
        )
    feeds, n = calibration_feeds("quant.hybrid", src, ctx, cfg.samples)
    per_token = per_token_inputs(src, cfg.per_token)
    dyn = dst.with_name(dst.stem + ".dynamic.onnx")
    weights = DynamicQuant(
        per_channel=cfg.per_channel, reduce_range=cfg.reduce_range, op_types=cfg.op_types, exclude=cfg.exclude
    )
    metrics = apply_dynamic(weights, src, dyn, ctx)
    t0 = time.perf_counter()
    try:
        model = onnx.load(str(dyn))
        names = [n.input[0] for n in model.graph.node if n.op_type == "DynamicQuantizeLinear"]
        ranges = tensor_ranges(dyn, names, feeds)
        counts = rewrite_hybrid(model, ranges, set(per_token), cfg.symmetric)
        onnx.save(model, str(dst))
    finally:
        dyn.unlink(missing_ok=True)
    return {
        "bytes_before": metrics["bytes_before"],
        "bytes": file_bytes(dst),
        "reduce_range": metrics["reduce_range"],
        "fixed_scale_inputs": counts["fixed"],
        "per_token_inputs": counts["per_token"],
        "per_token_matmuls": sorted(m for t, m in per_token.items() if t in counts["per_token_tensors"]),
        "calibration_samples": n,
        "calibration_seconds": round(time.perf_counter() - t0, 2),
        "quantized": quantized_counts(dst),
    }


# ---- which inputs take per-token scales -------------------------------------------------------------------------


def per_token_inputs(path: Path, patterns: tuple[str, ...]) -> dict[str, str]:
    """{activation tensor: MatMul node} of the weight MatMuls whose input takes per-token scales."""
    graph = onnx.load(str(path), load_external_data=False).graph
    consts = {t.name for t in graph.initializer} | {o for n in graph.node if n.op_type == "Constant" for o in n.output}
    producers = {o: n for n in graph.node for o in n.output}
    names = [p for p in patterns if p != AUTO]
    chosen = {}
    for mm in graph.node:
        if mm.op_type != "MatMul" or mm.input[1] not in consts:
            continue
        if any(fnmatch.fnmatchcase(mm.name, p) for p in names) or (
            AUTO in patterns and after_activation(mm.input[0], producers)
        ):
            chosen[mm.input[0]] = mm.name
    return chosen


def after_activation(tensor: str, producers: dict, depth: int = 5) -> bool:
    """Whether ``tensor`` is computed from an activation function within ``depth`` nodes, without crossing a MatMul
    or a normalisation (GELU as optimum exports it: x * 0.5 * (1 + Erf(x / sqrt 2)), Erf three nodes up)."""
    frontier, seen = [tensor], set()
    for _ in range(depth):
        nxt = []
        for t in frontier:
            node = producers.get(t)
            if node is None or id(node) in seen:
                continue
            seen.add(id(node))
            if node.op_type in ACTIVATIONS:
                return True
            if node.op_type not in BOUNDARIES:
                nxt += list(node.input)
        frontier = nxt
    return False


# ---- the rewrite ------------------------------------------------------------------------------------------------


@dataclass
class _MatMul:
    """One ``quantize_dynamic`` MatMul: MatMulInteger -> Cast -> Mul(., Mul(a_scale, w_scale)) [-> Add(bias)]."""

    mm: onnx.NodeProto
    cast: onnx.NodeProto
    mul: onnx.NodeProto
    scales: onnx.NodeProto  # Mul(a_scale, w_scale)
    w_scale: str
    bias_add: onnx.NodeProto | None  # Add(y, bias) with a constant 1-D bias, foldable into MatMulIntegerToFloat
    bias: str

    @property
    def weight(self) -> str:
        return self.mm.input[1]

    @property
    def w_zp(self) -> str:
        return self.mm.input[3] if len(self.mm.input) > 3 else ""


class _Graph:
    def __init__(self, model: onnx.ModelProto) -> None:
        self.model, self.g = model, model.graph
        self.inits = {t.name: t for t in self.g.initializer}
        self.producers = {o: n for n in self.g.node for o in n.output}
        self.consumers: dict[str, list[onnx.NodeProto]] = {}
        for n in self.g.node:
            for i in n.input:
                self.consumers.setdefault(i, []).append(n)
        self.added: list[onnx.NodeProto] = []
        self.removed: list[onnx.NodeProto] = []
        self.new_inits: dict[str, onnx.TensorProto] = {}

    def const(self, name: str, value, dtype=np.float32) -> str:
        if name not in self.new_inits:
            self.new_inits[name] = numpy_helper.from_array(np.asarray(value, dtype=dtype), name)
        return name

    def node(self, op: str, inputs: list[str], out: str | None = None, domain: str = "", **attrs) -> str:
        name = f"hybrid/{op}_{len(self.added)}"
        self.added.append(helper.make_node(op, inputs, [out or name], name=name, domain=domain, **attrs))
        return out or name

    def array(self, name: str) -> np.ndarray:
        return numpy_helper.to_array(self.inits[name])

    def matmul(self, mm: onnx.NodeProto, a_scale: str) -> _MatMul:
        try:
            (cast,) = self.consumers[mm.output[0]]
            (mul,) = [c for c in self.consumers[cast.output[0]] if c.op_type == "Mul"]
            scales = self.producers[next(i for i in mul.input if i != cast.output[0])]
            w_scale = next(i for i in scales.input if i != a_scale)
        except (KeyError, StopIteration, ValueError):
            raise StageError(
                f"quant.hybrid: {mm.name} is not the MatMulInteger -> Cast -> Mul pattern quantize_dynamic writes; "
                "report this graph"
            ) from None
        if mm.input[3:] and mm.input[3] and np.any(self.array(mm.input[3]) != 0):
            raise StageError(f"quant.hybrid: {mm.name} has weights with a non-zero zero point (use int8 weights)")
        after = self.consumers.get(mul.output[0], [])
        bias_add, bias = None, ""
        if len(after) == 1 and after[0].op_type == "Add":
            consts = [i for i in after[0].input if i in self.inits and self.array(i).ndim == 1]
            if consts:
                bias_add, bias = after[0], consts[0]
        return _MatMul(mm, cast, mul, scales, w_scale, bias_add, bias)

    def finish(self, opset: int | None) -> None:
        keep = [n for n in self.g.node if all(n is not r for r in self.removed)]
        available = {i.name for i in self.g.input} | set(self.inits) | set(self.new_inits)
        nodes = _toposort(keep + self.added, available)
        del self.g.node[:]
        self.g.node.extend(nodes)
        self.g.initializer.extend(self.new_inits.values())
        used = {i for n in self.g.node for i in n.input} | {o.name for o in self.g.output}
        for t in [t for t in self.g.initializer if t.name not in used]:
            self.g.initializer.remove(t)
        if not any(o.domain == "com.microsoft" for o in self.model.opset_import):
            self.model.opset_import.append(helper.make_opsetid("com.microsoft", 1))
        for o in self.model.opset_import:
            if opset and o.domain in ("", "ai.onnx") and o.version < opset:
                o.version = opset


def rewrite_hybrid(
    model: onnx.ModelProto, ranges: dict[str, tuple[float, float]], per_token: set[str], symmetric: bool = True
) -> dict:
    """Replace every DynamicQuantizeLinear of a ``quantize_dynamic`` graph: per-token scales for the tensors in
    ``per_token``, fixed calibrated scales (``ranges``: tensor -> (min, max)) for the others. In place."""
    g = _Graph(model)
    fixed, tokens = 0, []
    for dql in [n for n in model.graph.node if n.op_type == "DynamicQuantizeLinear"]:
        x, (q, a_scale, a_zp) = dql.input[0], dql.output
        users = g.consumers.get(q, [])
        if any(u.op_type not in ("MatMulInteger", "QAttention") for u in users):
            raise StageError(
                f"quant.hybrid: the quantized {x} feeds {sorted({u.op_type for u in users})}, not MatMulInteger or "
                "QAttention: report this graph, or use quant.dynamic"
            )
        chains = [g.matmul(u, a_scale) for u in users if u.op_type == "MatMulInteger"]
        attention = [u for u in users if u.op_type == "QAttention"]
        leftovers = [
            c
            for o in (a_scale, a_zp)
            for c in g.consumers.get(o, [])
            if c.op_type not in ("MatMulInteger", "Mul", "QAttention")
        ]
        if leftovers:
            raise StageError(f"quant.hybrid: the scale of {x} feeds {leftovers[0].op_type}; report this graph")
        g.removed.append(dql)
        if x in per_token:
            if attention:
                raise StageError(
                    f"quant.hybrid: {x} feeds a fused QAttention, which takes one scale per tensor: leave it out of "
                    "per_token"
                )
            _per_token(g, x, chains, symmetric)
            tokens.append(x)
        else:
            _fixed(g, x, q, chains, ranges[x], attention)
            fixed += 1
    g.finish(21 if tokens else None)
    return {"fixed": fixed, "per_token": len(tokens), "per_token_tensors": tokens}


def _fixed(
    g: _Graph, x: str, q: str, chains: list[_MatMul], rng: tuple[float, float], attention: list[onnx.NodeProto] = ()
) -> None:
    """Calibrated uint8 scale and zero point (DynamicQuantizeLinear's formula on the calibration range). A fused
    ``QAttention`` (graph.optimize before the quantizer) reads the same constants as its input_scale (input 3) and
    input_zero_point (input 6)."""
    lo, hi = min(rng[0], 0.0), max(rng[1], 0.0)
    scale = max((hi - lo) / 255.0, 1e-8)
    zp = int(np.clip(np.round(-lo / scale), 0, 255))
    s = g.const(f"hybrid/scale/{x}", scale)
    z = g.const(f"hybrid/zero_point/{x}", zp, np.uint8)
    g.node("QuantizeLinear", [x, s, z], q)
    for att in attention:
        while len(att.input) < 7:
            att.input.append("")
        att.input[3], att.input[6] = s, z
    for c in chains:
        out = c.bias_add.output[0] if c.bias_add is not None else c.mul.output[0]
        inputs = [q, c.weight, s, c.w_scale, z, c.w_zp] + ([c.bias] if c.bias_add is not None else [])
        g.node("MatMulIntegerToFloat", inputs, out, domain="com.microsoft")
        g.removed += [c.mm, c.cast, c.mul, c.scales] + ([c.bias_add] if c.bias_add is not None else [])


def _per_token(g: _Graph, x: str, chains: list[_MatMul], symmetric: bool) -> None:
    """One scale per token row (over the hidden axis, the MatMul's reduction axis), applied after the integer MatMul."""
    k = int(g.array(chains[0].weight).shape[0])
    last, eps = g.const("hybrid/last_axis", [-1], np.int64), g.const("hybrid/eps", 1e-12)
    if symmetric:
        amax = g.node("ReduceMax", [g.node("Abs", [x]), last], keepdims=1)
        s = g.node("Max", [g.node("Div", [amax, g.const("hybrid/c127", 127.0)]), eps])
        zp = g.node("Expand", [g.const("hybrid/zp128", 128, np.uint8), g.node("Shape", [s])])
        mm_zp, shift = g.const("hybrid/zp128", 128, np.uint8), None
    else:  # DynamicQuantizeLinear's asymmetric formula, per token; MatMulInteger takes only a scalar zero point, so
        # it gets 0 and the exact correction zp * s * colsum(W) * w_scale is subtracted afterwards
        zero = g.const("hybrid/zero", 0.0)
        rmin = g.node("Min", [g.node("ReduceMin", [x, last], keepdims=1), zero])
        rmax = g.node("Max", [g.node("ReduceMax", [x, last], keepdims=1), zero])
        s = g.node("Max", [g.node("Div", [g.node("Sub", [rmax, rmin]), g.const("hybrid/c255", 255.0)]), eps])
        zpf = g.node(
            "Clip", [g.node("Round", [g.node("Div", [g.node("Neg", [rmin]), s])]), zero, g.const("hybrid/c255", 255.0)]
        )
        zp = g.node("Cast", [zpf], to=TensorProto.UINT8)
        mm_zp, shift = g.const("hybrid/zp0", 0, np.uint8), g.node("Mul", [zpf, s])
    q = g.node("QuantizeLinear", [x, s, zp], axis=-1, block_size=k)
    one = g.const("hybrid/one", 1.0)
    for c in chains:
        y = g.node("MatMulIntegerToFloat", [q, c.weight, one, c.w_scale, mm_zp, c.w_zp], domain="com.microsoft")
        if shift is None:
            g.node("Mul", [y, s], c.mul.output[0])
        else:
            colsum = g.array(c.weight).astype(np.int64).sum(0).astype(np.float32) * g.array(c.w_scale)
            cw = g.const(f"hybrid/colsum_x_wscale/{c.mm.name}", colsum)
            g.node("Sub", [g.node("Mul", [y, s]), g.node("Mul", [shift, cw])], c.mul.output[0])
        g.removed += [c.mm, c.cast, c.mul, c.scales]


def _default_opset(model: onnx.ModelProto) -> int:
    return next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)


def _toposort(nodes: list[onnx.NodeProto], available: set[str]) -> list[onnx.NodeProto]:
    """Nodes in an order where every input exists before it is read (the original order where it already was)."""
    ready = set(available) | {""}
    out, pending = [], list(nodes)
    while pending:
        rest = []
        for n in pending:
            if all(i in ready for i in n.input):
                out.append(n)
                ready.update(n.output)
            else:
                rest.append(n)
        if len(rest) == len(pending):
            missing = [i for i in rest[0].input if i not in ready]
            raise StageError(f"quant.hybrid: the rewritten graph misses {missing} at {rest[0].name}; report this graph")
        pending = rest
    return out
