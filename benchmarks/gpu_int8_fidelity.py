"""Which int8 QDQ the GPU path builds, chosen on accuracy (no latency, no GPU: the QDQ graphs run on the CPU EP).

    OMP_NUM_THREADS=1 python benchmarks/gpu_int8_fidelity.py

TensorRT takes explicit Q/DQ with zero point 0 only, so the GPU int8 variant needs symmetric int8 activations,
unlike the CPU recipes' asymmetric uint8. On MiniLM (quant.static, MinMax on the shipped calibration sentences)
this compares: the CPU default (asymmetric uint8 activations), symmetric int8 everywhere, and symmetric int8 with
the MatMuls fed by a GELU kept float (compress.gpu.to_int8_qdq's default). Metric: mean/min cosine of the sentence
embeddings to the fp32 export's on the held-out shipped sentences, in ORT's CPU EP (the QDQ numerics; TensorRT's
fused int8 kernels round differently, so benchmarks/gpu.py re-measures fidelity on the device).
Writes benchmarks/results/gpu_int8_fidelity.{json,md}.
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

from _results import save


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def main() -> None:
    import torch

    from compress.cli import _quiet_libraries
    from compress.core.data import calibration_and_heldout, shipped_sentences
    from compress.core.models import load_model
    from compress.core.numerics import row_cosine
    from compress.stages import OnnxContext
    from compress.stages.quant import StaticQuant, apply_static
    from compress.steps import tokenized_batches
    from export.onnx_export import export_onnx
    from runtimes.encode import ort_outputs
    from runtimes.gpu import after_one_sided_activation
    from runtimes.host import host_info
    from runtimes.ort import cpu_session

    _quiet_libraries()
    torch.set_num_threads(1)
    lm = load_model("minilm")
    calibration, heldout = calibration_and_heldout(shipped_sentences())
    rows = []
    with tempfile.TemporaryDirectory(prefix="gpu-int8-") as tmp:
        work = Path(tmp)
        log("exporting MiniLM fp32 (optimum)")
        fp32 = export_onnx(lm, work / "fp32")
        reference = ort_outputs(cpu_session(fp32, 1), lm.tokenizer, heldout, lm.task, 128)
        ctx = OnnxContext(
            calibration=tokenized_batches(lm, calibration), host=host_info(), model_type="", num_heads=0, hidden_size=0
        )
        one_sided = tuple(after_one_sided_activation(fp32))
        configs = [
            (
                "asymmetric uint8 activations (CPU recipes' default; TensorRT rejects non-zero zero points)",
                StaticQuant(),
            ),
            (
                "symmetric int8 activations, every weight MatMul + Gather",
                StaticQuant(activation_type="int8", symmetric_activations=True),
            ),
            (
                f"symmetric int8, the {len(one_sided)} MatMuls fed by a GELU kept float (GPU default)",
                StaticQuant(activation_type="int8", symmetric_activations=True, exclude=one_sided),
            ),
        ]
        for label, cfg in configs:
            log(f"quant.static: {label}")
            dst = work / "q.onnx"
            metrics = apply_static(cfg, fp32, dst, ctx)
            got = ort_outputs(cpu_session(dst, 1), lm.tokenizer, heldout, lm.task, 128)
            cos = row_cosine(reference, got)
            rows.append(
                {
                    "config": label,
                    "fidelity_mean": round(float(cos.mean()), 4),
                    "fidelity_min": round(float(cos.min()), 4),
                    "quantized": metrics["quantized"],
                    "kept_float": len(cfg.exclude),
                }
            )
    out = {
        "model": "minilm",
        "heldout_sentences": len(heldout),
        "calibration_sentences": len(calibration),
        "command": "OMP_NUM_THREADS=1 python benchmarks/gpu_int8_fidelity.py",
        "rows": rows,
        "metric": "cosine of sentence embeddings to the fp32 export, ORT CPU EP (QDQ emulation)",
    }
    save("gpu_int8_fidelity", out, table)


def table(out: dict) -> str:
    lines = [
        "# int8 QDQ for the GPU path: accuracy on MiniLM (CPU EP, no latency)",
        "",
        f"`{out['command']}`; {out['metric']}; {out['heldout_sentences']} held-out sentences, "
        f"{out['calibration_sentences']} calibration sentences (MinMax).",
        "",
        "| config | fidelity mean | fidelity min | Q/DQ nodes |",
        "|---|---|---|---|",
    ]
    for r in out["rows"]:
        q = r["quantized"]
        lines.append(
            f"| {r['config']} | {r['fidelity_mean']} | {r['fidelity_min']} | "
            f"{q.get('QuantizeLinear', 0)}/{q.get('DequantizeLinear', 0)} |"
        )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
