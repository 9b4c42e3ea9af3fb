"""Calibrate the roofline's compute efficiency on this host: how close a GEMM gets to the host's peak as a function
of its row count (batch x sequence), measured once per host and ONNX Runtime version and cached.

The roofline divides MACs by ``peak x efficiency``; one fixed efficiency (the profile's, 30%) is close at batch 1 x
seq 128 and far off for large GEMMs, which run near peak. Here a single MatMul [M, K] x [K, N] (fp32, and dynamic
int8 through ``onnxruntime.quantization.quantize_dynamic``) is timed in ORT's CPU EP at several M, and
``efficiency(precision, M)`` interpolates the measured share of peak (log-linear in M, clamped at the ends).
``runtimes.roofline.estimate(..., calibration=...)`` uses it for MatMul-like nodes on the host profile; for another
device it scales that device's nominal efficiency by the host's *shape* curve (relative to its largest M), an
assumption the caveats state. Nothing here imports torch.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from runtimes.host import host_info
from runtimes.profiler import ProfileConfig, Shape, measure_latency

ROWS = (1, 16, 128, 512, 2048, 4096)
GEMM = (384, 1536)  # K, N: a MiniLM-sized FFN projection
GEMM_OPS = {"MatMul", "Gemm", "MatMulInteger", "DynamicQuantizeMatMul", "MatMulIntegerToFloat", "FusedMatMul",
            "QLinearMatMul", "MatMulNBits"}  # fmt: skip


@dataclass(frozen=True)
class Calibration:
    points: dict[str, list[tuple[int, float]]]  # precision -> [(rows, share of the host's peak)]
    host: str = ""
    onnxruntime: str = ""
    gemm: tuple[int, int] = GEMM
    notes: list[str] = field(default_factory=list)
    load: float = 0.0  # 1-minute load average while it was measured

    def efficiency(self, precision: str, rows: int) -> float | None:
        pts = self.points.get("int8" if precision in ("int8", "int4") else precision)
        if not pts:
            return None
        xs, ys = [math.log(r) for r, _ in pts], [e for _, e in pts]
        return float(np.interp(math.log(max(rows, 1)), xs, ys))

    def shape_factor(self, precision: str, rows: int) -> float | None:
        """efficiency(rows) relative to the largest calibrated GEMM: how much a small GEMM loses."""
        pts = self.points.get("int8" if precision in ("int8", "int4") else precision)
        e = self.efficiency(precision, rows)
        return None if not pts or e is None else e / max(pts[-1][1], 1e-9)

    def as_dict(self) -> dict:
        return {"points": self.points, "host": self.host, "onnxruntime": self.onnxruntime, "gemm": list(self.gemm),
                "notes": self.notes, "load": self.load}  # fmt: skip

    @classmethod
    def from_dict(cls, d: dict) -> Calibration:
        points = {k: [(int(r), float(e)) for r, e in v] for k, v in d["points"].items()}
        return cls(points, d.get("host", ""), d.get("onnxruntime", ""), tuple(d.get("gemm", GEMM)), d.get("notes", []),
                   d.get("load", 0.0))  # fmt: skip


def _gemm_model(path: Path, k: int, n: int) -> None:
    rng = np.random.default_rng(0)
    w = numpy_helper.from_array(rng.standard_normal((k, n)).astype(np.float32) * 0.05, "w")
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"], name="gemm")], "gemm",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["rows", k])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["rows", n])], [w])  # fmt: skip
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))


def calibrate(peaks: dict[str, float], threads: int = 0, rows: tuple[int, ...] = ROWS, runs: int = 20) -> Calibration:
    """Measure the share of ``peaks`` (ops/s per precision: "fp32", "int8") a GEMM reaches at each row count."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    k, n = GEMM
    points: dict[str, list[tuple[int, float]]] = {"fp32": [], "int8": []}
    with tempfile.TemporaryDirectory(prefix="compress-calibrate-") as tmp:
        fp32, int8 = Path(tmp) / "fp32.onnx", Path(tmp) / "int8.onnx"
        _gemm_model(fp32, k, n)
        quantize_dynamic(str(fp32), str(int8), weight_type=QuantType.QInt8, per_channel=True)
        for m in rows:
            cfg = ProfileConfig(shapes=(Shape(1, m),), runs=runs, warmup=3, threads=threads)
            res = measure_latency({"fp32": fp32, "int8": int8}, cfg, feeds=lambda _s, b, s: {"x": _x(b * s, k)})
            for p in ("fp32", "int8"):
                seconds = res[p][0].p50_ms / 1e3
                points[p].append((m, round(2 * m * k * n / seconds / peaks[p], 4)))
    h = host_info()
    load = os.getloadavg()[0]
    return Calibration(points, h.cpu_model, h.onnxruntime, (k, n),
                       [f"single MatMul [M, {k}] x [{k}, {n}] in ORT's CPU EP, p50 of {runs} runs, {threads or 'all'} "
                        f"threads; int8 = quantize_dynamic; load average {load:.1f} on {h.physical_cores} cores"],
                       load)  # fmt: skip


def _x(rows: int, k: int) -> np.ndarray:
    return np.random.default_rng(0).standard_normal((rows, k)).astype(np.float32)


def cache_path() -> Path:
    h = host_info()
    key = hashlib.sha1(json.dumps([h.cpu_model, h.physical_cores, sorted(h.isa.items()), h.onnxruntime]).encode())
    root = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "edge-compress"
    return root / f"calibration-{key.hexdigest()[:12]}.json"


def cached_calibration(peaks: dict[str, float], threads: int = 0) -> Calibration:
    """The host's calibration from the cache, measured (seconds) when there is none yet; a calibration measured
    while other work loaded the host is used but not cached."""
    path = cache_path()
    if path.is_file():
        try:
            return Calibration.from_dict(json.loads(path.read_text()))
        except (ValueError, KeyError):
            pass
    cal = calibrate(peaks, threads)
    if cal.load > host_info().physical_cores:  # measured on a busy host: used once, not kept
        return cal
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp-{os.getpid()}")
    tmp.write_text(json.dumps(cal.as_dict(), indent=1))
    os.replace(tmp, path)
    return cal
