"""Qualcomm HTP pre-flight through onnxruntime-qnn (optional extra ``[qnn]``): static shapes, QDQ for the HTP,
compile on the HTP *simulator* with CPU fallback disabled, per-op placement, an EPContext artefact.

The onnxruntime-qnn wheel is a plugin EP for the installed onnxruntime; on Linux x86-64 its libQnnHtp.so is a
simulator. It is good for op coverage, the NPU's numerics and a deployable EPContext model; it is NOT good for
latency (its cycle counts are far off the hardware), so nothing here times anything.

Library calls used as they are: ``qnn_preprocess_model`` (static input shapes, Gelu/LayerNorm fusions),
``get_qnn_qdq_config`` + ``quantize`` (QDQ as the QNN EP wants it), ORT's plugin-EP registration and its
``session.disable_cpu_ep_fallback`` / ``ep.context_enable`` options. What stands beside them: the attention-mask
fill rewrite (``clamp_mask_fill``), and reading ORT's verbose partitioning log for which node went where and why.
"""

from __future__ import annotations

import os
import re
import sys
import tempfile
from collections import Counter
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from compress.core.errors import CompressError, first_line
from compress.core.numerics import task_output

EP_NAME = "QNNExecutionProvider"
INSTALL_HINT = 'pip install "edge-compress[qnn]"'
QUANT_TYPES = ("uint8", "uint16")
# A mask fill of float32's minimum (transformers' attention masks) stretches the quantization range of the
# additive mask and everything after it until all activations round to one level; -1e4 masks as well (softmax
# weight exp(-1e4) == 0) and quantizes.
MASK_FILL_LIMIT = -1e9
MASK_FILL = -1e4


def require_qnn():
    """The onnxruntime-qnn module, or one line that names the extra."""
    try:
        import onnxruntime_qnn
    except ImportError:
        raise CompressError(f"target needs onnxruntime-qnn (the QNN HTP simulator): {INSTALL_HINT}") from None
    return onnxruntime_qnn


def qnn_version() -> str:
    q = require_qnn()
    sdk = getattr(q.build_and_package_info, "qnn_version", "?")
    return f"onnxruntime-qnn {q.__version__} (QNN SDK {sdk})"


# --- preparing the graph -----------------------------------------------------------------------------


def clamp_mask_fill(model, limit: float = MASK_FILL_LIMIT, fill: float = MASK_FILL) -> list[str]:
    """Replace scalar float constants below ``limit`` (the attention-mask fill) with ``fill``; returns their names."""
    from onnx import numpy_helper

    changed = []
    for init in model.graph.initializer:
        if init.data_type not in (1, 10) or np.prod(init.dims, dtype=np.int64) != 1:  # FLOAT / FLOAT16 scalars
            continue
        a = numpy_helper.to_array(init)
        if float(a.reshape(-1)[0]) < limit:
            init.CopyFrom(numpy_helper.from_array(np.full_like(a, fill), init.name))
            changed.append(init.name)
    for node in model.graph.node:
        if node.op_type != "Constant":
            continue
        for attr in node.attribute:
            if attr.name == "value" and np.prod(attr.t.dims, dtype=np.int64) == 1 and attr.t.data_type in (1, 10):
                a = numpy_helper.to_array(attr.t)
                if float(a.reshape(-1)[0]) < limit:
                    attr.t.CopyFrom(numpy_helper.from_array(np.full_like(a, fill), attr.t.name))
                    changed.append(node.output[0])
    return changed


def static_inputs(path: Path, batch: int, seq: int) -> list[tuple[str, str]]:
    """(name, "batch,seq") for every 2-D token input: qnn_preprocess_model's dynamic_input_shapes format."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    out = []
    for i in model.graph.input:
        dims = i.type.tensor_type.shape.dim
        if len(dims) != 2:
            raise CompressError(
                f"input '{i.name}' has rank {len(dims)}: the QNN pre-flight fixes (batch, seq) "
                "token inputs only; export the model with 2-D token inputs"
            )
        out.append((i.name, f"{batch},{seq}"))
    return out


def prepare_static(src: Path, dst: Path, batch: int, seq: int) -> dict:
    """Fix the input shapes, fuse Gelu/LayerNorm (ORT's QNN pre-processing), clamp the mask fill; write ``dst``."""
    import onnx
    from onnxruntime.quantization.execution_providers.qnn import qnn_preprocess_model

    with tempfile.TemporaryDirectory(prefix="qnn-pre-") as tmp:
        pre = Path(tmp) / "pre.onnx"
        shapes = static_inputs(src, batch, seq)
        model = onnx.load(str(src))
        if model.metadata_props:  # ORT 1.32's qnn_preprocess_model fails on them (dict.update of a proto list)
            del model.metadata_props[:]
            src = Path(tmp) / "src.onnx"
            onnx.save(model, str(src))
        if not qnn_preprocess_model(str(src), str(pre), fuse_layernorm=True, dynamic_input_shapes=shapes):
            pre = src
        model = onnx.load(str(pre))
    clamped = clamp_mask_fill(model)
    onnx.save(model, str(dst))
    return {
        "batch": batch,
        "seq": seq,
        "mask_fill_clamped": clamped,
        "ops": dict(Counter(n.op_type for n in model.graph.node)),
    }


class _Feeds:
    """An onnxruntime CalibrationDataReader over fixed-shape feed dicts (subclassed lazily: ORT imports late)."""

    def __new__(cls, feeds: Iterable[dict]):
        from onnxruntime.quantization import CalibrationDataReader

        class Reader(CalibrationDataReader):
            def __init__(self, items):
                self.items = iter(list(items))

            def get_next(self):
                return next(self.items, None)

        return Reader(feeds)


def quantize_qdq(
    src: Path, dst: Path, feeds: Iterable[dict], activations: str = "uint16", weights: str = "uint8"
) -> dict:
    """Static QDQ for the HTP: ORT's get_qnn_qdq_config (MinMax) and quantize, calibrated on ``feeds``."""
    from onnxruntime.quantization import QuantType, quantize
    from onnxruntime.quantization.execution_providers.qnn import get_qnn_qdq_config

    types = {"uint8": QuantType.QUInt8, "uint16": QuantType.QUInt16}
    for name, value in (("activations", activations), ("weights", weights)):
        if value not in types:
            raise CompressError(f"QNN {name} type '{value}': use one of {', '.join(types)}")
    feeds = list(feeds)
    if not feeds:
        raise CompressError("QNN quantization needs calibration text: pass --data FILE or keep the shipped sentences")
    cfg = get_qnn_qdq_config(str(src), _Feeds(feeds), activation_type=types[activations], weight_type=types[weights])
    quantize(str(src), str(dst), cfg)
    return {
        "activations": activations,
        "weights": weights,
        "calibration_samples": len(feeds),
        "calibration": "MinMax (get_qnn_qdq_config)",
    }


# --- sessions on the simulator -------------------------------------------------------------------------


def _register() -> object:
    import onnxruntime as ort

    q = require_qnn()
    if not any(d.ep_name == EP_NAME for d in ort.get_ep_devices()):
        ort.register_execution_provider_library(EP_NAME, q.get_library_path())
    return q


def session_options(profile, *, strict: bool = True, context_file: Path | None = None, verbose: bool = False):
    """SessionOptions with the QNN EP on the HTP backend for the profile's htp_arch / soc_model.

    strict: ``session.disable_cpu_ep_fallback`` so a graph that does not run wholly on the NPU fails to load.
    context_file: also write the compiled graph as an EPContext model there (``ep.context_enable``)."""
    import onnxruntime as ort

    q = _register()
    backend = profile.option("backend", "htp")
    if backend != "htp":
        raise CompressError(f"profile {profile.name}: backend '{backend}' is not simulated here; set backend = \"htp\"")
    so = ort.SessionOptions()
    so.log_severity_level = 0 if verbose else 3
    if strict:
        so.add_session_config_entry("session.disable_cpu_ep_fallback", "1")
    if context_file is not None:
        so.add_session_config_entry("ep.context_enable", "1")
        so.add_session_config_entry("ep.context_file_path", str(context_file))
    options = {
        "backend_path": q.get_qnn_htp_path(),
        "htp_arch": profile.option("htp_arch", "75"),
        "soc_model": profile.option("soc_model", "0"),
        # graph I/O Q/DQ stays on the NPU, as it must under strict (the EP turns offload off there itself)
        "offload_graph_io_quantization": "0",
    }
    devices = [d for d in ort.get_ep_devices() if d.ep_name == EP_NAME]
    so.add_provider_for_devices(devices, options)
    return so


@contextmanager
def stderr_to(path: Path) -> Iterator[None]:
    """Send fds 1 and 2 (ORT's C++ logger, the QNN libraries' banners) to ``path`` for the duration."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = [os.dup(1), os.dup(2)]
    with open(path, "w", encoding="utf-8") as f:
        os.dup2(f.fileno(), 1)
        os.dup2(f.fileno(), 2)
        try:
            yield
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            for fd, old in zip((1, 2), saved):
                os.dup2(old, fd)
                os.close(old)


def htp_session(path: Path, profile):
    """A strict session on the HTP simulator (EPContext or QDQ model)."""
    import onnxruntime as ort

    return ort.InferenceSession(str(path), sess_options=session_options(profile))


# --- reading ORT's partitioning log ---------------------------------------------------------------------

_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_FAILED = re.compile(r"Validation FAILED for \d+ nodes in OrtNodeUnit \((?P<unit>[^)]*)\)")
_OPERATOR = re.compile(r"Operator type: (?P<op>\S+) Node name: (?P<name>.*?) Node index: \d+")
_REASON = re.compile(r"REASON : (?P<reason>.*)")
_PLACED = re.compile(r"(?P<all>All nodes|Node\(s\)) placed on \[(?P<ep>[^\]]+)\]\. Number of nodes: (?P<n>\d+)")
_PLACED_NODE = re.compile(r"VerifyEachNodeIsAssignedToAnEp\]\s{2,}(?P<op>\S+) \((?P<name>.*)\)\s*$")
_BACKEND = re.compile(
    r"backendValidateOpConfig\(\) failed for node `(?P<name>[^`]*)` of type `(?P<qnn_op>[^`]*)` "
    r"with error code (?P<code>\d+)"
)


@dataclass
class Placement:
    """Where ORT put each node: the EP's fused partitions, the CPU nodes, and the QNN EP's stated reasons."""

    partitions: dict[str, int] = field(default_factory=dict)  # EP -> nodes (QNN: fused partitions)
    npu_nodes: dict[str, str] = field(default_factory=dict)  # node name -> op type, validated for the HTP
    cpu_nodes: list[tuple[str, str]] = field(default_factory=list)  # (op_type, node name)
    reasons: dict[str, str] = field(default_factory=dict)  # node name -> why the QNN EP refused it


def parse_partition_log(text: str) -> Placement:
    """Parse ORT's verbose session log (severity 0): LogNodeSupport failures and VerifyEachNodeIsAssignedToAnEp."""
    p = Placement()
    lines = _ANSI.sub("", text).splitlines()
    pending: list[str] | None = None  # node names of the FAILED block being read
    passed = False  # reading a PASSED block
    current_ep = None
    backend: dict[str, str] = {}  # node -> the HTP backend's validation error, logged before FAILED
    for line in lines:
        m = _BACKEND.search(line)
        if m:
            backend[m["name"]] = f"QNN HTP backend validation failed for {m['qnn_op']} (error {m['code']})"
            continue
        if _FAILED.search(line):
            pending, passed = [], False
            continue
        if "Validation PASSED" in line:
            pending, passed = None, True
            continue
        m = _OPERATOR.search(line)
        if m:
            if pending is not None:
                pending.append(m["name"].strip())
            elif passed:
                p.npu_nodes[m["name"].strip()] = m["op"]
            continue
        passed = False
        m = _REASON.search(line)
        if m and pending:
            for name in pending:
                p.reasons[name] = m["reason"].strip() + (f" ({backend[name]})" if name in backend else "")
            pending = None
            continue
        m = _PLACED.search(line)
        if m:
            current_ep = m["ep"]
            p.partitions[current_ep] = int(m["n"])
            continue
        m = _PLACED_NODE.search(line)
        if m and current_ep is not None:
            if current_ep != EP_NAME:
                p.cpu_nodes.append((m["op"], m["name"]))
            continue
        if "VerifyEachNodeIsAssignedToAnEp" not in line:
            current_ep = None
    return p


def fix_for(op_type: str, reason: str) -> str:
    """What to do about one node the HTP refuses (one line)."""
    r = reason.lower()
    if "not supported by qnn ep" in r:
        return (
            f"the QNN HTP has no {op_type} kernel: rewrite it into supported ops before export (or drop it from "
            "the deployed graph and run it in the app)"
        )
    if "dynamic" in r or "shape" in r:
        return "give every input a static shape (the pre-flight fixes batch x seq; check other inputs)"
    if "float" in r or "data type" in r or "datatype" in r:
        return "quantize it: the node must sit between DequantizeLinear/QuantizeLinear pairs (QDQ)"
    if "backend validation failed" in r:
        return (
            f"the HTP rejects this {op_type}'s tensor types or encodings (e.g. a uint8 table without QDQ from "
            "CPU dynamic quantization): quantize the fp32 export for the HTP instead (compress run MODEL "
            "--target npu-qnn-htp), or give the node QDQ-wrapped inputs"
        )
    if "graph output" in r or "graph input" in r:
        return "keep graph I/O quantization on the NPU (offload_graph_io_quantization=0)"
    return f"see the reason; the QNN EP's supported-op list says which {op_type} attributes and types the HTP takes"


def partition(qdq: Path, profile, log_dir: Path) -> Placement:
    """Load ``qdq`` with fallback allowed and verbose logging: which node ends up where, and why."""
    import onnxruntime as ort

    log = log_dir / "qnn_partition.log"
    so = session_options(profile, strict=False, verbose=True)
    with stderr_to(log):
        ort.InferenceSession(str(qdq), sess_options=so)
    return parse_partition_log(log.read_text(encoding="utf-8", errors="replace"))


def compile_context(qdq: Path, profile, context_file: Path) -> str | None:
    """Compile on the simulator with CPU fallback disabled and write the EPContext model; the error line or None."""
    import onnxruntime as ort

    so = session_options(profile, strict=True, context_file=context_file)
    with tempfile.TemporaryDirectory(prefix="qnn-compile-") as tmp, stderr_to(Path(tmp) / "compile.log"):
        try:
            ort.InferenceSession(str(qdq), sess_options=so)
        except Exception as e:  # onnxruntime raises its own Fail/RuntimeException types
            return first_line(e)
    return None


def op_table(qdq: Path, placement: Placement) -> list[dict]:
    """Per op type of the QDQ graph: nodes, how many the HTP took, how many fell back to the CPU, and how many
    ORT folded away before partitioning (shape arithmetic on static shapes, constants)."""
    import onnx

    model = onnx.load(str(qdq), load_external_data=False)
    total = Counter(n.op_type for n in model.graph.node)
    npu = Counter(placement.npu_nodes.values())
    cpu = Counter(op for op, _ in placement.cpu_nodes)
    rows = []
    for op in sorted(set(total) | set(npu) | set(cpu), key=lambda o: (-cpu.get(o, 0), -total.get(o, 0), o)):
        rows.append(
            {
                "op_type": op,
                "nodes": total.get(op, 0),
                "npu": npu.get(op, 0),
                "cpu": cpu.get(op, 0),
                "folded": max(total.get(op, 0) - npu.get(op, 0) - cpu.get(op, 0), 0),
            }
        )
    return rows


def blockers(placement: Placement) -> list[dict]:
    return [
        {
            "op_type": op,
            "node": name,
            "reason": placement.reasons.get(name, "assigned to the CPU by ORT"),
            "fix": fix_for(op, placement.reasons.get(name, "")),
        }
        for op, name in placement.cpu_nodes
    ]


# --- running text through a fixed-shape session ----------------------------------------------------------


def static_feeds(tokenizer, texts: list[str], input_names: list[str], batch: int, seq: int) -> list[dict]:
    """Token feeds of exactly (batch, seq): the last batch is padded with empty rows (dropped after the run)."""
    feeds = []
    for i in range(0, len(texts), batch):
        chunk = texts[i : i + batch]
        enc = tokenizer(
            chunk + [""] * (batch - len(chunk)),
            padding="max_length",
            truncation=True,
            max_length=seq,
            return_tensors="np",
        )
        f = {}
        for name in input_names:
            if name in enc:
                f[name] = np.asarray(enc[name], dtype=np.int64)
            elif name == "token_type_ids":
                f[name] = np.zeros((batch, seq), dtype=np.int64)
            else:
                raise CompressError(f"the ONNX graph wants input '{name}', which the tokenizer does not produce")
        feeds.append(f)
    return feeds


def static_outputs(session, tokenizer, texts: list[str], task: str, batch: int, seq: int) -> np.ndarray:
    """The task output (compress.core.numerics.task_output) of a fixed-shape session, one row per text."""
    names = [o.name for o in session.get_outputs()]
    inputs = [i.name for i in session.get_inputs()]
    out = []
    for i, f in enumerate(static_feeds(tokenizer, texts, inputs, batch, seq)):
        res = dict(zip(names, session.run(None, f)))
        rows = min(batch, len(texts) - i * batch)
        out.append(task_output(res, f["attention_mask"], task)[:rows])
    return np.concatenate(out).astype(np.float32)
