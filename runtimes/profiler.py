"""Measured CPU latency: fixed threads, warm-up, many timed runs, variants interleaved in one loop.

ONNX Runtime ships no timing tool in its wheel (``onnxruntime_perf_test`` is C++ only), so the loop is
written here; the op breakdown stands beside ORT's own profiler (``SessionOptions.enable_profiling``).
Interleaving matters on a shared machine: every round times each variant, in rotating order, so a noisy
neighbour slows all of them alike and their ratio holds. But every session owns a thread pool whose idle workers
spin (ORT's default ``session.intra_op.allow_spinning``) for ~2^20 pause instructions, tens of milliseconds, before
they sleep: timing variant B right after variant A lets A's spinning workers take B's cores. Measured on a 2-core
host (MiniLM 1x128, four sessions, one run each per round): a 3-block int8 model 16.8-19.6 ms interleaved vs 4.9 ms
alone, fp32 43 vs 19 ms -- the ratios off by up to 3x. So each visit to a variant first waits ``settle_s`` (the other
sessions' workers go to sleep), runs once untimed (wakes its own), then times a ``block`` of runs back to back: what
one app with ORT's default session options sees, interleaved at block granularity.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnxruntime as ort

from compress.core.errors import CompressError
from runtimes.host import HostInfo, host_info
from runtimes.ort import cpu_session, synthetic_feeds


@dataclass(frozen=True)
class Shape:
    batch: int
    seq: int

    @classmethod
    def parse(cls, text: str) -> Shape:
        """'1x128' -> Shape(1, 128)."""
        try:
            b, s = (int(x) for x in text.lower().split("x"))
        except ValueError:
            raise CompressError(f"shape '{text}' is not BATCHxSEQ, e.g. 1x128") from None
        if b < 1 or s < 1:
            raise CompressError(f"shape '{text}': batch and sequence length must be >= 1")
        return cls(b, s)

    def __str__(self) -> str:
        return f"{self.batch}x{self.seq}"


# ORT's idle intra-op workers spin 2^20 pause iterations (onnxruntime/core/platform/EigenNonBlockingThreadPool.h,
# log2_spin = 20) before they sleep: 20-60 ms with 40-140 cycles per pause. Waiting this long lets them.
SETTLE_S = 0.1


def settle(seconds: float = SETTLE_S) -> None:
    """Let every other session's spinning workers go to sleep before timing a different one."""
    time.sleep(seconds)


@dataclass(frozen=True)
class ProfileConfig:
    shapes: tuple[Shape, ...] = (Shape(1, 128), Shape(32, 128))  # latency, throughput
    runs: int = 50
    warmup: int = 5
    threads: int = 0  # 0: the host's physical cores
    op_runs: int = 10  # runs under ORT's profiler for the op breakdown
    top_ops: int = 8
    block: int = 5  # timed runs back to back per visit to a variant (the visits rotate)
    settle_s: float = SETTLE_S  # wait before each visit: the other sessions' spinning workers go to sleep

    def __post_init__(self) -> None:
        if self.runs < 1 or self.warmup < 0 or self.threads < 0:
            raise CompressError("--runs must be >= 1, warm-up and --threads >= 0")
        if self.block < 1 or self.settle_s < 0:
            raise CompressError("latency block must be >= 1 and settle time >= 0")


@dataclass
class Latency:
    batch: int
    seq: int
    runs: int
    p50_ms: float
    p90_ms: float
    p99_ms: float
    mean_ms: float
    min_ms: float
    throughput_per_s: float  # sequences per second at p50
    threads: int
    source: str = "measured"
    tool: str = ""
    device: str = ""
    caveats: list[str] = field(default_factory=list)


def timing_fields(times_s: list[float], batch: int, seq: int, digits: int = 3) -> dict:
    """The statistics every Latency carries, from wall times in seconds (CPU here, GPU in runtimes.gpu)."""
    ms = np.asarray(times_s) * 1e3
    p50 = float(np.percentile(ms, 50))
    return {
        "batch": batch,
        "seq": seq,
        "runs": len(ms),
        "p50_ms": round(p50, digits),
        "p90_ms": round(float(np.percentile(ms, 90)), digits),
        "p99_ms": round(float(np.percentile(ms, 99)), digits),
        "mean_ms": round(float(ms.mean()), digits),
        "min_ms": round(float(ms.min()), digits),
        "throughput_per_s": round(batch / (p50 / 1e3), 2),
    }


def _summarise(times_s: list[float], shape: Shape, threads: int, host: HostInfo) -> Latency:
    caveats = [] if len(times_s) >= 50 else [f"only {len(times_s)} timed runs: percentiles are rough"]
    return Latency(
        **timing_fields(times_s, shape.batch, shape.seq),
        threads=threads,
        tool=f"onnxruntime {ort.__version__} CPUExecutionProvider",
        device=host.cpu_model,
        caveats=caveats,
    )


def measure_latency(
    models: dict[str, Path],
    cfg: ProfileConfig = ProfileConfig(),
    on_progress: Callable[[int, int], None] | None = None,
    feeds: Callable[[object, int, int], dict] = synthetic_feeds,
) -> dict[str, list[Latency]]:
    """Time every model at every shape, interleaved round by round. Returns {label: [Latency per shape]}.
    ``feeds(session, batch, seq)`` makes the inputs (token ids by default)."""
    host = host_info()
    threads = cfg.threads or host.physical_cores
    sessions = {label: cpu_session(path, threads) for label, path in models.items()}
    labels = list(sessions)
    total, done = len(cfg.shapes) * cfg.runs, 0
    results: dict[str, list[Latency]] = {label: [] for label in labels}
    for shape in cfg.shapes:
        inputs = {label: feeds(s, shape.batch, shape.seq) for label, s in sessions.items()}
        times: dict[str, list[float]] = defaultdict(list)
        for r in range(-(-cfg.runs // cfg.block)):
            n = min(cfg.block, cfg.runs - r * cfg.block)
            for k in range(len(labels)):  # rotate the order every round
                label = labels[(r + k) % len(labels)]
                sess, feed = sessions[label], inputs[label]
                settle(cfg.settle_s)
                for _ in range(cfg.warmup if r == 0 else 1):  # the warm-up; later visits: wake this pool's workers
                    sess.run(None, feed)
                for _ in range(n):
                    t0 = time.perf_counter()
                    sess.run(None, feed)
                    times[label].append(time.perf_counter() - t0)
            done += n
            if on_progress:
                on_progress(done, total)
        for label in labels:
            results[label].append(_summarise(times[label], shape, threads, host))
    return results


def op_breakdown(path: Path, shape: Shape, threads: int, runs: int = 10, top: int = 8) -> list[dict]:
    """Top op types by kernel time from ORT's profiler (Chrome-trace JSON, events with cat == 'Node')."""
    with tempfile.TemporaryDirectory() as tmp:
        sess = cpu_session(path, threads or host_info().physical_cores, profile_prefix=os.path.join(tmp, "ort"))
        feeds = synthetic_feeds(sess, shape.batch, shape.seq)
        sess.run(None, feeds)  # warm-up, excluded below by run count
        for _ in range(runs):
            sess.run(None, feeds)
        events = json.loads(Path(sess.end_profiling()).read_text())
    per_op: dict[str, float] = defaultdict(float)
    nodes: dict[str, set] = defaultdict(set)
    for ev in events:
        if ev.get("cat") == "Node" and ev.get("name", "").endswith("_kernel_time"):
            op = ev.get("args", {}).get("op_name", "?")
            per_op[op] += float(ev.get("dur", 0))
            nodes[op].add(ev["name"])
    total = sum(per_op.values()) or 1.0
    ranked = sorted(per_op.items(), key=lambda kv: -kv[1])[:top]
    # (runs + 1) profiled runs including the warm-up: report per-run averages.
    return [
        {
            "op_type": op,
            "ms_per_run": round(us / (runs + 1) / 1e3, 3),
            "share": round(us / total, 4),
            "nodes": len(nodes[op]),
        }
        for op, us in ranked
    ]
