"""Why the int8 stages have the defaults they have: fidelity of MiniLM under each quantization choice.

    python benchmarks/quant_ablation.py

Fidelity = mean (and min) cosine between the quantized and the fp32 export's sentence embeddings on the
held-out shipped sentences (calibration uses the other half). Writes benchmarks/results/quant_ablation.{json,md}.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

from _results import save

from compress.cli import _quiet_libraries

FFN_DOWN = "*[0-9]/output/dense/MatMul"
VARIANTS = [
    ("dynamic, per-tensor", {"type": "quant.dynamic", "per_channel": False}),
    ("dynamic, per-tensor, reduce_range", {"type": "quant.dynamic", "per_channel": False, "reduce_range": "true"}),
    ("dynamic, per-channel (default)", {"type": "quant.dynamic"}),
    ("dynamic, per-channel, reduce_range", {"type": "quant.dynamic", "reduce_range": "true"}),
    ("static, all weight MatMuls + Gather", {"type": "quant.static"}),
    ("static, FFN down-projection kept float (static-int8)", {"type": "quant.static", "exclude": [FFN_DOWN]}),
    (
        "static, only the FFN down-projections",
        {"type": "quant.static", "op_types": ["MatMul"], "exclude": ["*attention*", "*intermediate*"]},
    ),
]


def main() -> None:
    _quiet_libraries()
    from compress.core.data import calibration_and_heldout, shipped_sentences
    from compress.core.evaluate import EvalSpec, evaluate
    from compress.core.models import load_model
    from compress.recipe import parse_recipe
    from compress.steps import apply_onnx_stages, onnx_context
    from export.onnx_export import export_onnx
    from runtimes.encode import ort_outputs
    from runtimes.host import host_info
    from runtimes.ort import cpu_session

    t0 = time.perf_counter()
    lm = load_model("minilm")
    calibration, heldout = calibration_and_heldout(shipped_sentences())
    ctx = onnx_context([], lm, calibration)
    encoder = lambda p: lambda t, s=cpu_session(p, 0): ort_outputs(s, lm.tokenizer, t, lm.task, lm.max_length)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        base = export_onnx(lm, Path(tmp) / "fp32")
        for i, (name, stage) in enumerate(VARIANTS):
            work = Path(tmp) / f"v{i}"
            work.mkdir()
            path, reports = apply_onnx_stages(
                list(parse_recipe({"stages": [stage]}, name, "ablation").stages), base, work, ctx
            )
            fid = evaluate(EvalSpec("fidelity"), encoder(base), encoder(path), heldout)
            rows.append(
                {
                    "variant": name,
                    "stage": stage,
                    "fidelity": fid["compressed"],
                    "fidelity_min": fid["min"],
                    "quantized": reports[-1]["metrics"]["quantized"],
                }
            )
            print(rows[-1], flush=True)
    save(
        "quant_ablation",
        {
            "host": host_info().as_dict(),
            "rows": rows,
            "command": "python benchmarks/quant_ablation.py",
            "minutes": round((time.perf_counter() - t0) / 60, 1),
        },
        table,
    )


def table(out: dict) -> str:
    lines = [
        f"MiniLM-L6 on {out['host']['cpu_model']} (VNNI: {out['host']['has_vnni']}); fidelity = cosine to the fp32 "
        "export's sentence embeddings on the held-out shipped sentences.",
        "",
        "| variant | mean cosine | min cosine |",
        "|---|---|---|",
    ]
    lines += [f"| {r['variant']} | {r['fidelity']:.4f} | {r['fidelity_min']:.4f} |" for r in out["rows"]]
    return "\n".join(lines + ["", f"Command: `{out['command']}` ({out['minutes']} min).", ""])


if __name__ == "__main__":
    main()
