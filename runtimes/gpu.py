"""Measured GPU latency through ONNX Runtime's CUDA and TensorRT execution providers (optional extra ``[gpu]``).

What is measured, and how (../shared/notes/targets.md, GPU):
- inputs and outputs live on the device (IOBinding: ``OrtValue.ortvalue_from_numpy(..., "cuda", 0)`` bound as
  inputs, outputs bound to ``"cuda"``), so host<->device copies are not in the timed region;
- the first run of every session is excluded and recorded apart (for TensorRT it builds the engine:
  ``engine_build_s`` = session creation + first run); then warm-up runs, then >= 100 timed runs, each
  ``run_with_iobinding`` followed by ``synchronize_outputs`` before the clock is read;
- variants are timed interleaved round by round (like runtimes/profiler.py), so a busy GPU slows them alike;
- every result is labelled ``source="measured"`` with the EP and ORT version, the device name (nvidia-smi) and
  caveats. Nothing here estimates: without a CUDA device every entry point refuses with one line.

Library calls used as they are: ORT's CUDA / TensorRT EPs and their provider options (engine cache, fp16/int8,
``trt_sparsity_enable``, explicit optimisation-profile shapes), ``onnxruntime.transformers.float16.
convert_float_to_float16`` for fp16, and compress.stages.quant.apply_static (ORT ``quantize_static``, QDQ) for
int8. What stands beside them: the timing loop (ORT ships no Python timing tool) and the 2:4 pattern check.
"""

from __future__ import annotations

import functools
import importlib
import shutil
import subprocess
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from compress.core.errors import CompressError, first_line
from runtimes.host import host_info
from runtimes.ort import input_names, synthetic_feeds
from runtimes.profiler import Latency, timing_fields
from runtimes.qnn import parse_partition_log, stderr_to

CUDA_EP = "CUDAExecutionProvider"
TRT_EP = "TensorrtExecutionProvider"
EPS = (CUDA_EP, TRT_EP)
CPU_EP = "CPUExecutionProvider"  # only to check the harness itself where no GPU is (tests); labelled as such
INSTALL_HINT = (
    'pip uninstall -y onnxruntime && pip install "onnxruntime-gpu[cuda,cudnn]>=1.27" '
    '"tensorrt-cu13>=10.13,<11" (the [gpu-trt] extra\'s packages; README, Targets)'
)
PRECISIONS = ("fp32", "fp16", "int8-qdq")
MIN_RUNS = 100


@dataclass(frozen=True)
class GpuConfig:
    runs: int = MIN_RUNS
    warmup: int = 10  # after the excluded first run
    device_id: int = 0
    cache_dir: Path | None = None  # TensorRT engine + timing cache (default: a folder beside the model)

    def __post_init__(self) -> None:
        if self.runs < MIN_RUNS:
            raise CompressError(f"GPU runs={self.runs}: use >= {MIN_RUNS} timed runs (p99 needs them)")
        if self.warmup < 0:
            raise CompressError("GPU warmup must be >= 0")


@dataclass
class GpuLatency(Latency):
    """One (variant, EP, shape): runtimes.profiler.Latency plus what only a GPU has."""

    threads: int = 0  # host threads: not a GPU setting (kept for the report's Latency tables)
    precision: str = ""
    ep: str = ""
    engine_build_s: float = 0.0  # session creation + the excluded first run (TensorRT: the engine build)
    first_run_ms: float = 0.0
    provider_options: dict = field(default_factory=dict)
    placement: dict = field(default_factory=dict)  # EP -> nodes after ORT's partitioning (TensorRT: fused subgraphs)


# --- what this host has -----------------------------------------------------------------------------------


@functools.lru_cache(maxsize=1)
def device_name() -> str:
    """'NVIDIA A10 (driver 550.54)' from nvidia-smi; 'CUDA device' where nvidia-smi is absent or fails."""
    exe = shutil.which("nvidia-smi")
    if exe is None:
        return "CUDA device"
    try:
        out = subprocess.run(
            [exe, "--query-gpu=name,driver_version", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=20,
            check=True,
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return "CUDA device"
    return parse_nvidia_smi(out)


def parse_nvidia_smi(text: str, index: int = 0) -> str:
    """One GPU's line of ``nvidia-smi --query-gpu=name,driver_version --format=csv[,noheader]``."""
    rows = [r for r in text.strip().splitlines() if r.strip() and not r.lower().startswith("name")]
    if len(rows) <= index:
        return "CUDA device"
    name, _, driver = rows[index].partition(",")
    return f"{name.strip()} (driver {driver.strip()})" if driver.strip() else name.strip()


def _preload() -> None:
    """Load CUDA/cuDNN from the nvidia-* wheels (onnxruntime-gpu[cuda,cudnn]: ORT's ``preload_dlls``) and TensorRT's
    libraries (``import tensorrt`` loads libnvinfer from the tensorrt-cu13 wheel) before the first GPU session, so a
    machine with only wheels, no system CUDA toolkit, works. Failures are left to the probe below to report."""
    import onnxruntime as ort

    if hasattr(ort, "preload_dlls"):
        try:
            ort.preload_dlls()
        except Exception:
            pass
    try:
        importlib.import_module("tensorrt")
    except Exception:
        pass


def _probe(ep: str) -> str | None:
    """None when a tiny session really runs on ``ep``; else why not (one line).

    onnxruntime-gpu lists its EPs even where no GPU or library is present, and ORT then falls back (TensorRT to
    CUDA, CUDA to the CPU) with a warning; so a session is created and its providers are read back."""
    import onnxruntime as ort
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("Relu", ["x"], ["y"])],
        "probe",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    so = ort.SessionOptions()
    so.log_severity_level = 3
    try:
        sess = ort.InferenceSession(model.SerializeToString(), sess_options=so, providers=[ep])
    except Exception as e:
        return f"the {ep} failed to start ({first_line(e)[:160]})"
    if sess.get_providers()[0] != ep:
        return (
            f"the {ep} fell back to {sess.get_providers()[0]} (no CUDA device, or its CUDA/cuDNN/TensorRT "
            "libraries missing)"
        )
    return None


@functools.lru_cache(maxsize=2)
def ep_usable(ep: str) -> str | None:
    """None when a session on ``ep`` really runs on the device; else why not (one line): the CPU build, or an EP
    listed but failing to start (no CUDA / cuDNN / tensorrt-cu13 libraries)."""
    import onnxruntime as ort

    if ep not in ort.get_available_providers():
        build = " (the CPU build is installed)" if ep == CUDA_EP else ""
        return f"onnxruntime {ort.__version__} has no {ep}{build}"
    _preload()
    return _probe(ep)


def cuda_usable() -> str | None:
    return ep_usable(CUDA_EP)


def trt_usable() -> str | None:
    return ep_usable(TRT_EP)


def available_eps() -> list[str]:
    """The GPU EPs that really run here, CUDA first (TensorRT only where it starts too)."""
    if cuda_usable() is not None:
        return []
    return [CUDA_EP] + ([TRT_EP] if trt_usable() is None else [])


def require_cuda() -> list[str]:
    """The GPU EPs this host can use, or one line naming what is missing and how to get it."""
    why = cuda_usable()
    if why is not None:
        raise CompressError(
            f"GPU measurement needs onnxruntime-gpu and a CUDA device: {why}; on a CUDA machine: {INSTALL_HINT}"
        )
    return available_eps()


def tool_label(ep: str) -> str:
    import onnxruntime as ort

    return f"onnxruntime {ort.__version__} {ep}"


# --- provider options (pure functions: checked without a GPU) ----------------------------------------------


def profile_shapes(inputs: list[str], batch: int, seq: int) -> str:
    """TensorRT optimisation-profile shapes 'input_ids:1x128,attention_mask:1x128' for 2-D token inputs."""
    return ",".join(f"{name}:{batch}x{seq}" for name in inputs)


def trt_options(
    cache_dir: Path,
    *,
    precision: str = "fp32",
    sparsity: bool = False,
    device_id: int = 0,
    inputs: list[str] | None = None,
    batch: int | None = None,
    seq: int | None = None,
    min_shape: tuple[int, int] | None = None,
) -> dict[str, str]:
    """TensorRT EP options for one variant.

    fp16: ``trt_fp16_enable``, also for the fp16-converted model, so TensorRT may pick fp16 kernels for every
    layer (without the flag it may keep float32 ones). int8-qdq: ``trt_int8_enable`` with no calibration table,
    so TensorRT follows the graph's Q/DQ scales (explicit quantization; TensorRT 11 accepts only that), plus
    ``trt_fp16_enable`` for the layers outside Q/DQ pairs. sparsity: 2:4 sparse tensor
    cores (Ampere+). The engine and timing caches go to ``cache_dir``; with inputs/batch/seq the optimisation
    profile is fixed to that one shape (one engine per shape, no rebuild inside the timed runs), or spans
    ``min_shape`` .. (batch, seq) for running text of varying lengths."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision '{precision}' is not one of {', '.join(PRECISIONS)}")
    opts = {
        "device_id": str(device_id),
        "trt_engine_cache_enable": "1",
        "trt_engine_cache_path": str(cache_dir),
        "trt_timing_cache_enable": "1",
        "trt_timing_cache_path": str(cache_dir),
        "trt_fp16_enable": "1" if precision in ("fp16", "int8-qdq") else "0",
        "trt_int8_enable": "1" if precision == "int8-qdq" else "0",
        "trt_sparsity_enable": "1" if sparsity else "0",
    }
    if inputs and batch and seq:
        shapes = profile_shapes(inputs, batch, seq)
        low = profile_shapes(inputs, *min_shape) if min_shape else shapes
        opts |= {"trt_profile_min_shapes": low, "trt_profile_opt_shapes": shapes, "trt_profile_max_shapes": shapes}
    return opts


def cuda_options(device_id: int = 0) -> dict[str, str]:
    """CUDA EP options; ORT's defaults otherwise (fp32 MatMuls may use TF32 tensor cores: see the caveats)."""
    return {"device_id": str(device_id)}


def providers(ep: str, options: dict[str, str], device_id: int = 0) -> list:
    """The providers list for InferenceSession: TensorRT falls back to CUDA for the nodes it does not take."""
    if ep == TRT_EP:
        return [(TRT_EP, options), (CUDA_EP, cuda_options(device_id))]
    if ep == CUDA_EP:
        return [(CUDA_EP, options)]
    if ep == CPU_EP:
        return [CPU_EP]
    raise ValueError(f"unknown GPU execution provider '{ep}': use {', '.join(EPS)}")


def caveats(ep: str, precision: str, sparsity: bool = False) -> list[str]:
    if ep == CPU_EP:
        return ["CPU EP through the GPU harness: a check of the harness, not a GPU measurement"]
    out = [
        "inputs and outputs bound on the device (IOBinding): host<->device copies and tokenization not timed",
        "first run excluded (recorded as engine_build_s / first_run_ms)",
    ]
    if ep == CUDA_EP and precision == "fp32":
        out.append("CUDA EP defaults: fp32 MatMuls may run as TF32 on Ampere+ tensor cores")
    if ep == CUDA_EP and precision == "int8-qdq":
        out.append(
            "CUDA EP has few int8 kernels: a QDQ graph mostly runs as float with Q/DQ in between; "
            "TensorRT is the int8 path"
        )
    if ep == TRT_EP:
        out.append("TensorRT EP with CUDA EP fallback for nodes TensorRT does not take; engine cached per shape")
    if ep == TRT_EP and precision == "int8-qdq":
        out.append("TensorRT int8: layers outside Q/DQ pairs may run in fp16 (trt_fp16_enable)")
    if sparsity:
        out.append("trt_sparsity_enable: 2:4 sparse tensor cores accelerate only on Ampere or newer")
    return out


# --- variants ------------------------------------------------------------------------------------------


def to_fp16(src: Path, dst: Path) -> dict:
    """fp16 weights and compute, fp32 graph inputs/outputs (ORT's convert_float_to_float16, keep_io_types)."""
    import onnx
    from onnxruntime.transformers.float16 import convert_float_to_float16

    model = onnx.load(str(src))
    half = convert_float_to_float16(model, keep_io_types=True)
    onnx.save(half, str(dst))
    inits = [i.data_type for i in half.graph.initializer]
    return {
        "fp16_initializers": inits.count(onnx.TensorProto.FLOAT16),
        "fp32_initializers": inits.count(onnx.TensorProto.FLOAT),
        "converter": "onnxruntime.transformers.float16",
    }


ONE_SIDED = {"Relu", "Gelu", "FastGelu", "BiasGelu", "QuickGelu", "Erf"}


def after_one_sided_activation(path: Path, depth: int = 3) -> list[str]:
    """Names of the weight MatMuls whose activation input comes from a GELU/ReLU (a GELU exports as
    Div -> Erf -> Add -> Mul -> Mul): one-sided values waste half of a symmetric int8 range."""
    import onnx

    graph = onnx.load(str(path), load_external_data=False).graph
    producer = {o: n for n in graph.node for o in n.output}
    consts = {i.name for i in graph.initializer}

    def one_sided(name: str, left: int) -> bool:
        node = producer.get(name)
        if node is None or left < 0:
            return False
        if node.op_type in ONE_SIDED:
            return True
        return node.op_type in ("Mul", "Add", "Div") and any(one_sided(i, left - 1) for i in node.input)

    return [
        n.name
        for n in graph.node
        if n.op_type == "MatMul" and len(n.input) == 2 and n.input[1] in consts and one_sided(n.input[0], depth)
    ]


def two_four_fraction(path: Path) -> float:
    """Share of MatMul/Gemm weight elements in 2:4 groups (>= 2 zeros in every 4 along the reduction axis)."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(path))
    inits = {i.name: i for i in model.graph.initializer}
    total = sparse = 0
    for node in model.graph.node:
        if node.op_type not in ("MatMul", "Gemm") or len(node.input) < 2 or node.input[1] not in inits:
            continue
        w = numpy_helper.to_array(inits[node.input[1]])
        if w.ndim != 2 or not np.issubdtype(w.dtype, np.floating):
            continue
        if node.op_type == "Gemm" and any(a.name == "transB" and a.i for a in node.attribute):
            w = w.T
        k = w.shape[0] - w.shape[0] % 4
        if k == 0:
            continue
        groups = (w[:k] == 0).reshape(k // 4, 4, w.shape[1]).sum(axis=1) >= 2  # (K/4, N)
        total += w[:k].size
        sparse += int(groups.sum()) * 4
    return sparse / total if total else 0.0


def is_two_four(path: Path, threshold: float = 0.9) -> bool:
    """The model's weight MatMuls are (almost) all 2:4: TensorRT's sparse tensor cores can use them."""
    return two_four_fraction(path) >= threshold


# --- timing ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Variant:
    label: str  # e.g. "fp16/TensorRT"
    path: Path
    precision: str
    ep: str
    sparsity: bool = False


def variants_for(
    models: dict[str, tuple[Path, str]], eps: list[str], sparse: dict[str, bool] | None = None
) -> list[Variant]:
    """Every (model, EP) pair: models = {name: (path, precision)}; labels 'name/CUDA', 'name/TensorRT'."""
    short = {CUDA_EP: "CUDA", TRT_EP: "TensorRT", CPU_EP: "CPU"}
    sparse = sparse or {}
    return [
        Variant(f"{name}/{short[ep]}", path, precision, ep, ep == TRT_EP and sparse.get(name, False))
        for name, (path, precision) in models.items()
        for ep in eps
    ]


def _summarise(
    times_s: list[float], batch: int, seq: int, v: Variant, build_s: float, first_ms: float, options: dict
) -> GpuLatency:
    return GpuLatency(
        **timing_fields(times_s, batch, seq, digits=4),
        tool=tool_label(v.ep),
        device=device_name() if v.ep in EPS else _host_cpu(),
        caveats=caveats(v.ep, v.precision, v.sparsity),
        precision=v.precision,
        ep=v.ep,
        engine_build_s=round(build_s, 3),
        first_run_ms=round(first_ms, 3),
        provider_options=options,
    )


def placement(path: Path, ep: str, options: dict, device_id: int, log_file: Path) -> dict[str, int]:
    """Nodes per EP after ORT's partitioning, read from its verbose session log (the same lines the QNN pre-flight
    reads: runtimes.qnn.parse_partition_log). A separate session: verbose logging stays out of the timed one."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 0
    with stderr_to(log_file):
        ort.InferenceSession(str(path), sess_options=so, providers=providers(ep, options, device_id))
    return parse_partition_log(log_file.read_text(encoding="utf-8", errors="replace")).partitions


def placement_caveats(ep: str, nodes: dict[str, int]) -> list[str]:
    if not nodes:
        return ["node placement not read (ORT's verbose log had no placement lines)"]
    off = {k: v for k, v in nodes.items() if k != ep}
    if not off:
        return []
    return [
        "not all on "
        + ep
        + ": "
        + ", ".join(f"{v} node(s) on {k}" for k, v in off.items())
        + (" (host<->device copies inside the timed run)" if CPU_EP in off and ep != CPU_EP else "")
    ]


def placement_text(nodes: dict[str, int]) -> str:
    """'TensorRT 3, CUDA 2' for a table cell."""
    return ", ".join(f"{k.replace('ExecutionProvider', '')} {v}" for k, v in nodes.items())


def _host_cpu() -> str:

    return host_info().cpu_model


class _Bound:
    """A session with its inputs on the device and outputs bound to the device."""

    def __init__(self, v: Variant, batch: int, seq: int, cfg: GpuConfig, cache_dir: Path):
        import onnxruntime as ort

        so = ort.SessionOptions()
        so.log_severity_level = 3
        probe = ort.InferenceSession(str(v.path), sess_options=so, providers=["CPUExecutionProvider"])
        names, feeds = input_names(probe), synthetic_feeds(probe, batch, seq)
        del probe
        if v.ep == TRT_EP:
            self.options = trt_options(
                cache_dir,
                precision=v.precision,
                sparsity=v.sparsity,
                device_id=cfg.device_id,
                inputs=names,
                batch=batch,
                seq=seq,
            )
        else:
            self.options = cuda_options(cfg.device_id) if v.ep == CUDA_EP else {}
        device = "cuda" if v.ep in EPS else "cpu"
        t0 = time.perf_counter()
        self.sess = ort.InferenceSession(
            str(v.path), sess_options=so, providers=providers(v.ep, self.options, cfg.device_id)
        )
        if self.sess.get_providers()[0] != v.ep:
            raise CompressError(
                f"{v.label}: ORT fell back to {self.sess.get_providers()[0]} instead of {v.ep}: "
                "check the CUDA / TensorRT libraries (ORT's log at severity 0 says which)"
            )
        self.io = self.sess.io_binding()
        self.inputs = {k: ort.OrtValue.ortvalue_from_numpy(a, device, cfg.device_id) for k, a in feeds.items()}
        for name, value in self.inputs.items():
            self.io.bind_ortvalue_input(name, value)
        for out in self.sess.get_outputs():
            self.io.bind_output(out.name, device, cfg.device_id)
        t1 = time.perf_counter()
        self.run()  # excluded: TensorRT builds (or loads) its engine here
        self.first_run_s = time.perf_counter() - t1
        self.build_s = time.perf_counter() - t0
        # after the timed session built (and cached) its engine, so its build time is the real one
        self.placement = placement(v.path, v.ep, self.options, cfg.device_id, cache_dir / "placement.log")

    def run(self) -> float:
        t0 = time.perf_counter()
        self.sess.run_with_iobinding(self.io)
        self.io.synchronize_outputs()  # the GPU's work is done before the clock is read
        return time.perf_counter() - t0


def measure_gpu(
    variants: list[Variant],
    shapes,
    cfg: GpuConfig = GpuConfig(),
    work: Path | None = None,
    on_progress: Callable[[int, int], None] | None = None,
    log: Callable[[str], None] = lambda msg: None,
) -> dict[str, list[GpuLatency]]:
    """Time every variant at every shape (objects with .batch/.seq), interleaved. {label: [GpuLatency per shape]}.

    A CUDA device is required unless every variant is on the CPU EP (the harness checking itself in tests)."""
    if any(v.ep != CPU_EP for v in variants):
        require_cuda()
    total, done = len(shapes) * cfg.runs, 0
    results: dict[str, list[GpuLatency]] = {v.label: [] for v in variants}
    for shape in shapes:
        bound = {}
        for v in variants:
            root = cfg.cache_dir or (work or v.path.parent) / "trt-cache"
            cache = Path(root) / f"{v.label.replace('/', '-')}-{shape.batch}x{shape.seq}"
            cache.mkdir(parents=True, exist_ok=True)
            log(
                f"{v.label} at {shape.batch}x{shape.seq}: session + first run"
                + (" (TensorRT engine build)" if v.ep == TRT_EP else "")
            )
            bound[v.label] = _Bound(v, shape.batch, shape.seq, cfg, cache)
        for b in bound.values():
            for _ in range(cfg.warmup):
                b.run()
        labels = list(bound)
        times: dict[str, list[float]] = defaultdict(list)
        for r in range(cfg.runs):
            for k in range(len(labels)):
                label = labels[(r + k) % len(labels)]
                times[label].append(bound[label].run())
            done += 1
            if on_progress:
                on_progress(done, total)
        for v in variants:
            b = bound[v.label]
            row = _summarise(times[v.label], shape.batch, shape.seq, v, b.build_s, b.first_run_s * 1e3, b.options)
            row.placement = b.placement
            row.caveats += placement_caveats(v.ep, b.placement)
            results[v.label].append(row)
        del bound
    return results
