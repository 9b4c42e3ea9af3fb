"""Analytic latency for a target nothing here can run: a roofline over the ONNX graph, node by node.

    t_node = max(2 * MACs / (peak_ops * eff_compute), bytes / (bandwidth * eff_memory)) + launch
    t      = sum of t_node over the nodes that do work

Shapes come from ``runtimes.shapes``: static shape inference node by node on a copy of the graph whose inputs
are fixed to (batch, seq), shape arithmetic folded to constants on the way, as a compiler does. The result is labelled ``"source": "analytic"`` and carries its caveats:
it is an estimate, never a measurement. Nothing here imports torch or runs a model.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import onnx
from onnx import TensorProto, helper

from compress.core.errors import CompressError
from compress.core.onnx_ops import INT8_OPS, QDQ_OPS
from profiles import (
    DEFAULT_HOST_BANDWIDTH_GBS,
    PEAK_FIELDS,
    DeviceProfile,
    cpu_facts,
    fp32_flops_per_cycle,
    has_int8_dot,
    host_cpu_peak,
    load_profile,
)
from runtimes.calibration import GEMM_OPS, Calibration, cached_calibration
from runtimes.shapes import (
    EMBED_OPS,
    ShapeError,
    Shapes,
    TensorInfo,
    attr,
    concrete_inputs,
    infer_shapes,
    load_skeleton,
)

PRECISIONS = ("auto", "fp32", "fp16", "int8", "int4")
# Bytes per element when a precision is forced: int4 means 4-bit weights, 8-bit activations, int8 compute (w4a8).
WEIGHT_BYTES = {"fp32": 4.0, "fp16": 2.0, "int8": 1.0, "int4": 0.5}
ACT_BYTES = {"fp32": 4.0, "fp16": 2.0, "int8": 1.0, "int4": 1.0}
# Which peak a node may use when the profile has none for its own precision (each use becomes a caveat).
RATE_FALLBACK = {
    "fp32": ("fp32", "fp16"),
    "fp16": ("fp16", "fp32"),
    "int8": ("int8", "fp16", "fp32"),
    "int4": ("int8", "fp16", "fp32"),
}

FLOAT_TYPES = {TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.BFLOAT16, TensorProto.DOUBLE}
QUANT_TYPES = {
    TensorProto.INT8,
    TensorProto.UINT8,
    TensorProto.INT16,
    TensorProto.UINT16,
    TensorProto.INT4,
    TensorProto.UINT4,
}
_HALF_BYTE = {TensorProto.INT4, TensorProto.UINT4}

# Nodes that cost nothing on a compiled target: views, Q/DQ pairs fused into their neighbours, shape ops.
VIEW_OPS = {"Reshape", "Squeeze", "Unsqueeze", "Flatten", "Identity", "Dropout"}
FREE_OPS = VIEW_OPS | QDQ_OPS | {"Constant", "Shape", "Size"}


class RooflineError(CompressError):
    """The estimator cannot estimate this graph on this profile; the message says why."""


@dataclass(frozen=True)
class Peaks:
    """What the roofline divides by, for one profile on this host: ops/s per precision, bytes/s."""

    rates: tuple[tuple[str, float], ...]  # ("int8", ops/s), ("fp16", ...), ("fp32", ...); 0 = none
    bandwidth: float  # bytes/s for activations
    weight_bandwidth: float  # bytes/s for weights
    eff_compute: float
    eff_memory: float
    launch_s: float
    caveats: tuple[str, ...] = ()
    host: bool = False  # the peaks are this host's CPU (a calibration then applies as measured)

    def rate(self, precision: str) -> tuple[str, float] | None:
        """The rate a node of ``precision`` runs at: its own, else the first fallback the profile has."""
        rates = dict(self.rates)
        for p in RATE_FALLBACK[precision]:
            if rates.get(p, 0) > 0:
                return p, rates[p]
        return None


@dataclass(frozen=True)
class NodeCost:
    name: str
    op_type: str
    precision: str  # the rate the node was costed at (after any fallback)
    macs: int
    act_bytes: float
    weight_bytes: float
    compute_s: float
    memory_s: float
    launch_s: float

    @property
    def seconds(self) -> float:
        return max(self.compute_s, self.memory_s) + self.launch_s

    @property
    def bound(self) -> str:
        return "compute" if self.compute_s > self.memory_s else "memory"


# --- device peaks ---------------------------------------------------------------------------------


def device_peaks(profile: DeviceProfile) -> Peaks:
    """The profile's figures in ops/s and bytes/s; the host CPU's peak is derived at run time."""
    caveats = []
    int8, fp16, fp32 = profile.peak_tops_int8 * 1e12, profile.peak_tflops_fp16 * 1e12, profile.peak_tflops_fp32 * 1e12
    bandwidth = profile.bandwidth_gbs
    if profile.kind == "cpu" and not any(getattr(profile, k) > 0 for k in PEAK_FIELDS):
        host, facts = host_cpu_peak(profile), cpu_facts()
        int8, fp32, bandwidth = host.gops_int8 * 1e9, host.gflops_fp32 * 1e9, host.bandwidth_gbs
        int8_rate = "4x (VNNI/AMX)" if has_int8_dot(facts.flags) else "2x (no VNNI)"
        caveats.append(
            f"host peak from /proc/cpuinfo: {facts.physical_cores} core(s) x {facts.mhz:.0f} MHz x "
            f"{fp32_flops_per_cycle(facts.flags)} fp32 FLOP/cycle = {host.gflops_fp32:.0f} GFLOPS; "
            f"int8 {int8_rate} = {host.gops_int8:.0f} GOPS"
        )
        if profile.bandwidth_gbs <= 0:
            caveats.append(
                f"memory bandwidth {DEFAULT_HOST_BANDWIDTH_GBS:g} GB/s is an assumption (not readable on "
                "the host): set bandwidth_gbs in a copy of the profile"
            )
    if bandwidth <= 0:
        raise RooflineError(f"profile {profile.name} gives no bandwidth_gbs: add it to estimate latency")
    if not (int8 or fp16 or fp32):
        raise RooflineError(
            f"profile {profile.name} gives no peak ({', '.join(PEAK_FIELDS)}): add one to estimate latency"
        )
    weight_bw = profile.weight_bandwidth_gbs or bandwidth
    return Peaks(
        rates=(("int8", int8), ("fp16", fp16), ("fp32", fp32)),
        bandwidth=bandwidth * 1e9,
        weight_bandwidth=weight_bw * 1e9,
        eff_compute=profile.efficiency_compute,
        eff_memory=profile.efficiency_memory,
        launch_s=profile.launch_us * 1e-6,
        caveats=tuple(caveats),
        host=profile.kind == "cpu" and not any(getattr(profile, k) > 0 for k in PEAK_FIELDS),
    )


def host_calibration(threads: int = 0) -> Calibration:
    """This host's GEMM efficiency curve (runtimes.calibration), measured against the host CPU profile's peaks."""
    rates = dict(device_peaks(load_profile("cpu")).rates)
    return cached_calibration({"fp32": rates["fp32"], "int8": rates["int8"]}, threads)


def _gemm_efficiency(
    node: onnx.NodeProto, infos: dict, used: str, peaks: Peaks, calibration: Calibration | None
) -> float:
    """The compute efficiency a node gets: the profile's, or for a GEMM the calibrated one at its row count (on the
    host as measured; elsewhere the profile's scaled by the host's shape curve)."""
    if calibration is None or node.op_type not in GEMM_OPS or node.output[0] not in infos:
        return peaks.eff_compute
    out = infos[node.output[0]]
    rows = max(out.numel // max(out.shape[-1], 1), 1) if out.shape else 1
    if peaks.host:
        return calibration.efficiency(used, rows) or peaks.eff_compute
    factor = calibration.shape_factor(used, rows)
    return peaks.eff_compute * factor if factor else peaks.eff_compute


# --- per-node cost --------------------------------------------------------------------------------


@dataclass(frozen=True)
class GraphView:
    """Who produces and consumes each tensor, which tensors are constant (weights), and their shapes."""

    producer: dict[str, onnx.NodeProto]
    consumers: dict[str, tuple[onnx.NodeProto, ...]]
    const: frozenset[str]
    outputs: frozenset[str]
    infos: dict[str, TensorInfo]


def graph_view(model: onnx.ModelProto, shapes: Shapes) -> GraphView:
    producer, consumers = {}, {}
    const = set(shapes.constants)
    for node in model.graph.node:  # ONNX graphs are stored in topological order
        for i in node.input:
            if i:
                consumers.setdefault(i, []).append(node)
        for o in node.output:
            if o:
                producer[o] = node
        if node.op_type == "Constant" or (any(node.input) and all(i in const for i in node.input if i)):
            const.update(o for o in node.output if o)
    return GraphView(
        producer=producer,
        consumers={k: tuple(v) for k, v in consumers.items()},
        const=frozenset(const),
        outputs=frozenset(o.name for o in model.graph.output),
        infos=shapes.infos,
    )


def _dtype_bytes(elem_type: int) -> float:
    if elem_type in _HALF_BYTE:
        return 0.5
    try:
        return float(helper.tensor_dtype_to_np_dtype(elem_type).itemsize)
    except (KeyError, TypeError, ValueError):
        return 4.0


def _source(name: str, g: GraphView) -> str:
    """Follow views and transposes up to the tensor that holds the data."""
    seen = 0
    while (p := g.producer.get(name)) is not None and p.op_type in VIEW_OPS | {"Transpose"} and seen < 16:
        name, seen = p.input[0], seen + 1
    return name


def _dequantized_from(name: str, g: GraphView) -> int | None:
    """The integer type a tensor was dequantized from (QDQ graphs), else None."""
    p = g.producer.get(_source(name, g))
    if p is not None and p.op_type == "DequantizeLinear" and p.input[0] in g.infos:
        t = g.infos[p.input[0]].elem_type
        return t if t in QUANT_TYPES else None
    return None


def storage_bytes(name: str, g: GraphView, precision: str, float_bytes: float | None = None) -> float:
    """Bytes per element of a tensor as the target holds it: a forced precision's width; else a QDQ tensor's
    integer width (the Q/DQ pair is fused into its neighbours), else its own dtype (floats at ``float_bytes``
    where the device keeps floats in fp16)."""
    info = g.infos.get(name)
    if precision != "auto":
        if info is None or info.elem_type in FLOAT_TYPES | QUANT_TYPES:
            return (WEIGHT_BYTES if name in g.const else ACT_BYTES)[precision]
        return _dtype_bytes(info.elem_type)
    q = _dequantized_from(name, g)
    if q is not None:
        return _dtype_bytes(q)
    consumers = g.consumers.get(name, ())
    if consumers and name not in g.outputs and all(c.op_type == "QuantizeLinear" for c in consumers):
        out = g.infos.get(consumers[0].output[0])
        if out is not None:
            return _dtype_bytes(out.elem_type)
    if info is None:
        return 0.0
    if info.elem_type in FLOAT_TYPES and float_bytes:
        return float_bytes
    return _dtype_bytes(info.elem_type)


def node_precision(node: onnx.NodeProto, g: GraphView, precision: str = "auto") -> str:
    """The precision a node computes in: forced, integer ops, MatMulNBits' accuracy_level, QDQ inputs, or the
    output's float type."""
    if precision != "auto":
        return precision
    op = node.op_type
    if op in INT8_OPS:
        return "int8"
    if op == "MatMulNBits" and attr(node, "accuracy_level", 0) == 4:
        return "int8"
    data = [i for i in node.input[:2] if i]
    if op != "MatMulNBits" and data and all(_dequantized_from(i, g) is not None for i in data):
        return "int8"
    out = g.infos.get(node.output[0]) if node.output else None
    return "fp16" if out is not None and out.elem_type in (TensorProto.FLOAT16, TensorProto.BFLOAT16) else "fp32"


def node_macs(node: onnx.NodeProto, infos: dict[str, TensorInfo]) -> int | None:
    """Multiply-accumulates of one node: 0 for ops without a MAC loop, None when a needed shape is unknown."""

    def shape(i: int) -> tuple[int, ...] | None:
        return infos[node.input[i]].shape if i < len(node.input) and node.input[i] in infos else None

    op = node.op_type
    out = infos.get(node.output[0]) if node.output else None
    if op in (
        "MatMul",
        "MatMulInteger",
        "DynamicQuantizeMatMul",
        "MatMulIntegerToFloat",
        "QLinearMatMul",
        "FusedMatMul",
        "GemmFastGelu",
    ):
        a = shape(0)
        if a is None or out is None:
            return None
        return out.numel * (a[-2] if op == "FusedMatMul" and attr(node, "transA", 0) and len(a) > 1 else a[-1])
    if op == "MatMulNBits":  # (..., K) x (K, N) with K, N as attributes
        return out.numel * attr(node, "K", 0) if out else None
    if op in ("Gemm", "QGemm"):
        a = shape(0)
        return out.numel * (a[0] if attr(node, "transA", 0) else a[1]) if a and out else None
    if op in ("Conv", "ConvInteger", "QLinearConv", "FusedConv", "NhwcConv"):
        w = shape(3 if op == "QLinearConv" else 1)  # (M, C/group, k...)
        return out.numel * math.prod(w[1:]) if w and out else None
    if op == "ConvTranspose":
        x, w = shape(0), shape(1)  # w: (C, M/group, k...)
        return math.prod(x) * math.prod(w[1:]) if x and w else None
    if op in ("Attention", "QAttention"):
        x, w = shape(0), shape(1)  # x: (B, S, D), w: (D, Hq + Hk + Hv)
        if x is None or w is None or len(x) != 3:
            return None
        b, s, d = x
        qkv = attr(node, "qkv_hidden_sizes", None) or [w[-1] // 3] * 3
        return b * s * d * w[-1] + b * s * s * qkv[0] + b * s * s * qkv[2]  # projections + QK^T + softmax(.)V
    if op == "GroupQueryAttention":  # no past: keys = queries in length
        return 2 * out.numel * out.shape[1] if out and len(out.shape) == 3 else None
    if op == "MultiHeadAttention":
        q, k, v = shape(0), shape(1), shape(2)
        if q is None or len(q) != 3:
            return None
        b, s, d = q
        kv_len = k[1] if k and len(k) == 3 else k[2] if k and len(k) == 4 else s
        dv = v[-1] if v and len(v) == 3 else v[1] * v[3] if v and len(v) == 4 else d
        return b * s * kv_len * d + b * s * kv_len * dv
    if op == "Einsum":
        eq = attr(node, "equation", b"")
        eq = (eq.decode() if isinstance(eq, bytes) else eq).replace(" ", "")
        terms = eq.split("->")[0].split(",")
        if len(terms) != 2 or "." in eq:
            return None
        sizes: dict[str, int] = {}
        for i, term in enumerate(terms):
            sh = shape(i)
            if sh is None or len(sh) != len(term):
                return None
            for c, n in zip(term, sh):
                sizes[c] = max(sizes.get(c, 1), n)
        return math.prod(sizes.values())
    return 0


def node_bytes(
    node: onnx.NodeProto, g: GraphView, precision: str = "auto", float_bytes: float | None = None
) -> tuple[float, float, bool]:
    """(activation bytes, weight bytes, all shapes known) one node moves: every input read once, every output
    written once; an embedding lookup reads the rows it gathers, not the whole table."""
    act = weight = 0.0
    known = True
    for idx, name in enumerate(node.input):
        if not name:
            continue
        info = g.infos.get(name)
        if info is None:
            known = False
            continue
        n = info.numel
        if name in g.const:
            if (
                (node.op_type == "Gather" and idx == 0)
                or (node.op_type in EMBED_OPS and idx in (2, 3, 4))
                or (node.op_type == "GatherBlockQuantized" and idx in (0, 2, 3))
            ):
                out = g.infos.get(node.output[0])
                if out is None:
                    known = False
                    continue
                n = out.numel
                if node.op_type == "GatherBlockQuantized" and idx > 0:  # one scale / zero point per block
                    n = n / attr(node, "block_size", 128)
            weight += n * storage_bytes(name, g, precision, float_bytes)
        else:
            act += n * storage_bytes(name, g, precision, float_bytes)
    for name in node.output:
        if not name:
            continue
        if name not in g.infos:
            known = False
            continue
        act += g.infos[name].numel * storage_bytes(name, g, precision, float_bytes)
    return act, weight, known


def is_free(node: onnx.NodeProto, g: GraphView) -> bool:
    """Costs nothing on a compiled target: views, fused Q/DQ, shape ops, subgraphs over constants."""
    return node.op_type in FREE_OPS or all(o in g.const for o in node.output if o)


def node_costs(
    model: onnx.ModelProto,
    shapes: Shapes,
    peaks: Peaks,
    precision: str = "auto",
    profile_name: str = "this profile",
    calibration: Calibration | None = None,
) -> tuple[list[NodeCost], list[str]]:
    """Every working node's roofline time, plus caveats about what the count left out or assumed."""
    g = graph_view(model, shapes)
    rates = dict(peaks.rates)
    float_bytes = 2.0 if precision == "auto" and not rates["fp32"] and rates["fp16"] else None
    costs: list[NodeCost] = []
    free = unknown = 0
    unknown_ops: set[str] = set()
    swapped: dict[tuple[str, str], list[int]] = {}
    missing: dict[str, list] = {}
    float_ops: dict[str, int] = {}
    attention = False
    for node in model.graph.node:
        if is_free(node, g):
            free += 1
            continue
        macs = node_macs(node, shapes.infos)
        act, weight, known = node_bytes(node, g, precision, float_bytes)
        if macs is None or not known:
            unknown += 1
            unknown_ops.add(node.op_type)
        macs = macs or 0
        p = node_precision(node, g, precision)
        attention |= node.op_type in ("Attention", "QAttention", "MultiHeadAttention", "GroupQueryAttention")
        used = "int8" if p == "int4" else "fp16" if p == "fp32" and float_bytes else p
        compute_s = 0.0
        if macs:
            found = peaks.rate(p)
            if found is None:
                entry = missing.setdefault(p, [0, 0, node.name or node.op_type])
                entry[0], entry[1] = entry[0] + 1, entry[1] + macs
                continue
            used, rate = found
            if used != RATE_FALLBACK[p][0]:
                entry = swapped.setdefault((p, used), [0, 0])
                entry[0], entry[1] = entry[0] + 1, entry[1] + macs
            compute_s = 2 * macs / (rate * _gemm_efficiency(node, shapes.infos, used, peaks, calibration))
        elif p in ("fp32", "fp16") and not (rates["fp32"] or rates["fp16"]):
            float_ops[node.op_type] = float_ops.get(node.op_type, 0) + 1
        memory_s = (act / peaks.bandwidth + weight / peaks.weight_bandwidth) / peaks.eff_memory
        name = node.name or node.output[0]
        costs.append(NodeCost(name, node.op_type, used, macs, act, weight, compute_s, memory_s, peaks.launch_s))
    total_macs = sum(c.macs for c in costs) + sum(e[1] for e in missing.values())
    if missing:
        p, (n, macs, example) = next(iter(missing.items()))
        raise RooflineError(
            f"{profile_name} has no {p} rate for {n} node(s) ({macs / max(total_macs, 1):.0%} of MACs, "
            f"e.g. {example}): quantize them to int8 (static QDQ) or pass precision='int8' to estimate "
            "the graph as if it were"
        )
    notes = []
    for (wanted, used), (n, macs) in swapped.items():
        notes.append(
            f"{n} {wanted} node(s) ({macs / max(total_macs, 1):.0%} of MACs) costed at the {used} rate: "
            f"the profile gives no {wanted} peak"
        )
    if float_bytes:
        notes.append("float tensors counted at 2 bytes: the device runs float graphs in fp16")
    if float_ops:
        ops = ", ".join(f"{k} x{v}" for k, v in sorted(float_ops.items(), key=lambda kv: -kv[1])[:4])
        notes.append(
            f"{sum(float_ops.values())} float op(s) ({ops}) have no float path on this device and would run "
            "on the host CPU; counted here as memory-bound device work"
        )
    if free:
        notes.append(
            f"{free} node(s) cost nothing: {shapes.folded} folded (shape arithmetic and constants, as a "
            "compiler does for static shapes), views (Reshape, Squeeze, ...), Q/DQ fused into their neighbours"
        )
    if attention:
        notes.append("fused attention ops count their inputs and outputs only, not the (S x S) scores")
    if unknown:
        notes.append(
            f"{unknown} node(s) without inferred shapes ({', '.join(sorted(unknown_ops)[:5])}) are "
            "partly or wholly uncounted: the estimate is low"
        )
    return costs, notes


# --- the estimate ----------------------------------------------------------------------------------


def estimate(
    onnx_path: str | Path | onnx.ModelProto,
    profile: DeviceProfile | str,
    batch: int,
    seq: int,
    precision: str = "auto",
    *,
    input_shapes: dict[str, tuple[int, ...]] | None = None,
    calibration: Calibration | None = None,
) -> dict:
    """Roofline latency of one ONNX graph on one device profile at (batch, seq), labelled analytic.

    ``calibration`` (``host_calibration()``): GEMM efficiency by row count measured on this host, used as measured
    for the host profile and as a shape curve scaling the profile's efficiency elsewhere.

    ``precision``: "auto" reads it from the graph (MatMulInteger / QAttention / DynamicQuantizeMatMul and QDQ
    pairs are int8, MatMulNBits 4-bit weights, else the float type); "fp32" | "fp16" | "int8" | "int4" count every
    float or quantized tensor at that width (int4: 4-bit weights, 8-bit activations, int8 compute)."""
    if precision not in PRECISIONS:
        raise RooflineError(f"precision '{precision}': use one of {', '.join(PRECISIONS)}")
    if batch < 1 or seq < 1:
        raise RooflineError(f"batch {batch} x seq {seq}: both must be >= 1")
    prof = profile if isinstance(profile, DeviceProfile) else load_profile(profile)
    peaks = device_peaks(prof)
    model = load_skeleton(onnx_path)
    try:
        shapes = infer_shapes(model, concrete_inputs(model, batch, seq, input_shapes))
    except ShapeError as e:
        raise RooflineError(str(e)) from None
    costs, notes = node_costs(model, shapes, peaks, precision, prof.name, calibration)
    total_s = sum(c.seconds for c in costs)
    if calibration is not None:
        how = "as measured" if peaks.host else "as a shape curve scaling this profile's efficiency (an assumption)"
        notes.append(f"GEMM compute efficiency by row count calibrated on this host ({calibration.host}), {how}")
    caveats = [
        f"analytic roofline, not a measurement: {prof.efficiency_compute:.0%} of peak compute and "
        f"{prof.efficiency_memory:.0%} of peak bandwidth assumed for every node",
        *peaks.caveats,
    ]
    if prof.uncertain:
        caveats.append(
            f"uncertain profile figure(s): {', '.join(prof.uncertain)} (see the profile's sources and notes)"
        )
    if prof.launch_us:
        caveats.append(
            f"{prof.launch_us:g} us launch overhead charged per node ({len(costs)}); a compiler that fuses "
            "ops pays less"
        )
    if precision != "auto":
        caveats.append(f"precision forced to {precision}: every float or quantized tensor counted at that width")
    caveats.append(
        "every node reads its inputs from memory and writes its outputs back (no fusion, no cache reuse): "
        "memory time is pessimistic where activations are small"
    )
    if prof.kind == "npu":
        caveats.append("op coverage is not checked: ops the NPU lacks fall back to the CPU or fail to compile")
    if prof.sparsity_patterns:
        caveats.append(
            f"dense compute assumed: {', '.join(prof.sparsity_patterns)} sparsity speed-ups are not credited"
        )
    top = sorted(costs, key=lambda c: c.seconds, reverse=True)[:5]
    return {
        "p50_ms": total_s * 1e3,
        "source": "analytic",
        "tool": "compress roofline",
        "profile": prof.name,
        "device": prof.description,
        "batch": batch,
        "seq": seq,
        "precision": precision,
        "macs": sum(c.macs for c in costs),
        "bytes": sum(c.act_bytes + c.weight_bytes for c in costs),
        "weight_bytes": sum(c.weight_bytes for c in costs),
        "nodes": len(costs),
        "bound": {
            "compute": sum(c.bound == "compute" for c in costs),
            "memory": sum(c.bound == "memory" for c in costs),
        },
        "top_nodes": [
            {
                "name": c.name,
                "op_type": c.op_type,
                "precision": c.precision,
                "ms": c.seconds * 1e3,
                "macs": c.macs,
                "bytes": c.act_bytes + c.weight_bytes,
                "bound": c.bound,
            }
            for c in top
        ],
        "caveats": caveats + notes,
    }
