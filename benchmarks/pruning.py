"""Pruning on MiniLM: gradual magnitude (unstructured 50/75%), FFN channels 50%, heads 25%, 2:4 one shot,
2:4 one shot + recovery, 2:4 trained with MDGF / SDGF / SR-STE (same step count for every trained variant);
each with and without dynamic int8. STS-B dev Spearman, p50 side by side with the dense model (all variants
timed interleaved in one loop), size raw and zipped, training minutes.

    python benchmarks/pruning.py [--steps 400] [--runs 50]

Recovery is distillation from the original model on unlabelled text: sentences of the STS-B *train* split
(labels unused), so the dev split stays held out. Writes benchmarks/results/pruning.{json,md}. Then the FFN
check: FFN channels 50% and dense, fp32 and int8, timed alone with 4x the runs, ORT's per-op profile and the
MatMul weight shapes of each graph (does the pruned FFN really shrink, and where does int8 time go).
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import os
import tempfile
import time
from collections import Counter
from pathlib import Path

from _results import save

from compress.cli import _quiet_libraries

STSB = Path(__file__).resolve().parents[2] / "shared" / "data" / "stsb"


def variants(steps: int) -> list[tuple[str, list[dict]]]:
    g = {"type": "prune.gradual", "end_step": int(steps * 0.75), "total_steps": steps, "frequency": max(steps // 16, 1)}
    nm = {"type": "prune.nm", "n": 2, "m": 4, "steps": steps}  # every 2:4 trainer gets the same step count
    return [
        ("dense", []),
        ("unstructured 50%", [{**g, "final_sparsity": 0.5}]),
        ("unstructured 75%", [{**g, "final_sparsity": 0.75}]),
        ("2:4 one-shot (no recovery)", [{"type": "prune.nm", "n": 2, "m": 4}]),
        ("2:4 one-shot + recovery", [{**nm, "method": "oneshot"}]),
        ("2:4 MDGF", [{**nm, "method": "mdgf", "decay": "exponential"}]),
        ("2:4 SDGF", [{**nm, "method": "sdgf", "schedule": "stepwise"}]),
        ("2:4 SR-STE", [{**nm, "method": "srste"}]),
        ("FFN channels 50%", [{**g, "granularity": "channel", "final_sparsity": 0.5}]),
        ("heads 25%", [{**g, "granularity": "head", "final_sparsity": 0.25}]),
    ]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=400)
    ap.add_argument("--train-sentences", type=int, default=4000)
    ap.add_argument("--runs", type=int, default=50)
    ap.add_argument(
        "--only", default="", help="Comma-separated variant names to run (default: all); dense always runs."
    )
    ap.add_argument(
        "--name", default="pruning", help="Results name under benchmarks/results/ (debug runs: another name)."
    )
    args = ap.parse_args()
    _quiet_libraries()
    dev, train = STSB / "sts-dev.csv", STSB / "sts-train.csv"
    if not dev.is_file() or not train.is_file():
        raise SystemExit(f"STS-B not found under {STSB}")

    from compress.core.data import read_stsb
    from compress.core.evaluate import stsb_spearman
    from compress.core.fs import file_bytes
    from compress.core.models import load_model
    from compress.recipe import parse_recipe
    from compress.report import zipped_bytes
    from compress.steps import apply_onnx_stages, apply_torch_stages
    from export.onnx_export import export_onnx
    from runtimes.encode import ort_outputs
    from runtimes.host import host_info
    from runtimes.ort import cpu_session
    from runtimes.profiler import ProfileConfig, Shape, measure_latency

    t_start = time.perf_counter()
    lm0 = load_model("minilm")
    pairs = read_stsb(train)
    text = list(dict.fromkeys(pairs.first + pairs.second))[: args.train_sentences]
    int8 = parse_recipe({"stages": [{"type": "quant.dynamic"}]}, "int8", "benchmark").stages
    rows, paths = [], {}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        only = {v.strip() for v in args.only.split(",") if v.strip()}
        for i, (name, stages) in enumerate(variants(args.steps)):
            if only and name != "dense" and name not in only:
                continue
            t0 = time.perf_counter()
            recipe = parse_recipe({"stages": stages}, name, "benchmark")
            lm, reports = apply_torch_stages(
                list(recipe.stages),
                copy.deepcopy(lm0),
                text,
                progress=lambda m: print(m, flush=True) if "step" in m else None,
            )
            train_min = (time.perf_counter() - t0) / 60
            fp = export_onnx(lm, work / f"v{i}")
            q, _ = apply_onnx_stages(list(int8), fp, work / f"v{i}", None)
            for label, path in ((name, fp), (f"{name} + int8", q)):
                s = cpu_session(path, 0)
                row = {
                    "variant": label,
                    "stsb_dev": round(
                        stsb_spearman(lambda t: ort_outputs(s, lm.tokenizer, t, lm.task, lm.max_length), dev), 3
                    ),
                    "mb": round(file_bytes(path) / 1e6, 2),
                    "mb_zip": round(zipped_bytes(path) / 1e6, 2),
                    "training_minutes": round(train_min, 2),
                }
                rows.append(row)
                paths[label] = path
                print(row, flush=True)
        shapes = (Shape(1, 128),)
        print(f"timing {len(paths)} variants interleaved (1x128, {args.runs} runs)", flush=True)
        lat = measure_latency(paths, ProfileConfig(shapes=shapes, runs=args.runs))
        ffn = ffn_check(paths, args.runs, measure_latency, ProfileConfig, Shape)
    dense = rows[0]["stsb_dev"]
    dense_int8_p50 = lat["dense + int8"][0].p50_ms
    for r in rows:
        r["p50_ms_1x128"] = lat[r["variant"]][0].p50_ms
        r["p50_vs_dense"] = round(r["p50_ms_1x128"] / lat["dense"][0].p50_ms, 3)
        r["p50_vs_dense_int8"] = round(r["p50_ms_1x128"] / dense_int8_p50, 3)
        r["delta_vs_dense"] = round(r["stsb_dev"] - dense, 3)
    out = {
        "host": host_info().as_dict(),
        "rows": rows,
        "runs": args.runs,
        "steps": args.steps,
        "train_sentences": len(text),
        "latency": {k: [dataclasses.asdict(x) for x in v] for k, v in lat.items()},
        "command": (f"OMP_NUM_THREADS={os.environ['OMP_NUM_THREADS']} " if "OMP_NUM_THREADS" in os.environ else "")
        + f"python benchmarks/pruning.py --steps {args.steps} --train-sentences {args.train_sentences} "
        f"--runs {args.runs}" + (f" --only '{args.only}'" if args.only else ""),
        "minutes": round((time.perf_counter() - t_start) / 60, 1),
        "ffn_check": ffn,
    }
    save(args.name, out, table)


def matmul_weight_shapes(path: Path) -> dict[str, int]:
    """How many weight matrices of each shape feed a MatMul / MatMulInteger / Gemm in the exported graph."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    inits = {t.name: tuple(t.dims) for t in model.graph.initializer}
    shapes = Counter(
        "x".join(map(str, inits[i]))
        for node in model.graph.node
        if node.op_type in ("MatMul", "MatMulInteger", "Gemm")
        for i in node.input
        if len(inits.get(i, ())) == 2
    )
    return dict(sorted(shapes.items()))


def ffn_check(paths: dict, runs: int, measure_latency, ProfileConfig, Shape) -> dict:
    """Why FFN-channel 50% + int8 is (not) faster than dense int8: the four FFN / dense models alone, 4x the runs,
    interleaved, at the host's threads and at 1 thread;
    ORT's per-op profile of each; the MatMul weight shapes really in each graph."""
    from runtimes.profiler import op_breakdown

    pair = {k: paths[k] for k in ("dense + int8", "FFN channels 50% + int8", "dense", "FFN channels 50%") if k in paths}
    if len(pair) < 4:
        return {}
    print(
        f"FFN check: {len(pair)} variants interleaved ({4 * runs} runs, host threads and 1 thread) + ORT per-op profile",
        flush=True,
    )
    timing = {}
    for threads in (0, 1):  # 1 thread: no waiting on a sibling thread another process holds up
        lat = measure_latency(pair, ProfileConfig(shapes=(Shape(1, 128),), runs=4 * runs, threads=threads))
        timing[f"threads={lat['dense'][0].threads}"] = {
            "p50_ms": {k: v[0].p50_ms for k, v in lat.items()},
            "min_ms": {k: v[0].min_ms for k, v in lat.items()},
            **{
                f"{stat}_ratio_{kind}": round(
                    getattr(lat[f"FFN channels 50%{sfx}"][0], f"{stat}_ms")
                    / getattr(lat[f"dense{sfx}"][0], f"{stat}_ms"),
                    3,
                )
                for stat in ("p50", "min")
                for kind, sfx in (("fp32", ""), ("int8", " + int8"))
            },
        }
    return {
        "timing": timing,
        "ops": {k: op_breakdown(p, Shape(1, 128), 0, runs=20, top=8) for k, p in pair.items()},
        "matmul_weight_shapes": {k: matmul_weight_shapes(p) for k, p in pair.items()},
    }


def table(out: dict) -> str:
    lines = [
        f"MiniLM-L6, STS-B dev; recovery: {out['steps']} distillation steps on {out['train_sentences']} unlabelled "
        f"STS-B train sentences; p50 at 1x128 measured interleaved ({out['runs']} runs, ORT CPU EP, "
        f"{out['host']['cpu_model']}, VNNI: {out['host']['has_vnni']}).",
        "",
        "| variant | STS-B dev | vs dense | p50 ms | vs dense fp32 | vs dense int8 | MB | MB zipped | training min |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in out["rows"]:
        lines.append(
            f"| {r['variant']} | {r['stsb_dev']:.2f} | {r['delta_vs_dense']:+.2f} | {r['p50_ms_1x128']:.1f} | "
            f"{r['p50_vs_dense']:.2f} | {r['p50_vs_dense_int8']:.2f} | {r['mb']:.1f} | {r['mb_zip']:.1f} | "
            f"{r['training_minutes']:.1f} |"
        )
    lines += ["", f"Command: `{out['command']}` ({out['minutes']} min).", ""]
    ffn = out.get("ffn_check")
    if ffn:
        lines += [f"FFN channels 50% vs dense, the four alone, interleaved ({4 * out['runs']} runs each):", ""]
        for label, t in ffn["timing"].items():
            lines.append(
                f"- {label}: FFN/dense p50 ratio {t['p50_ratio_fp32']:.2f} fp32, {t['p50_ratio_int8']:.2f} int8; "
                f"min ratio {t['min_ratio_fp32']:.2f} fp32, {t['min_ratio_int8']:.2f} int8 (p50 ms: "
                + ", ".join(f"{k} {v:.1f}" for k, v in t["p50_ms"].items())
                + ")"
            )
        lines += [
            "",
            "| variant | MatMul weight shapes (count) | top ops, ms per run (ORT profiler, 1x128, host threads) |",
            "|---|---|---|",
        ]
        for k, ops in ffn["ops"].items():
            shapes = ", ".join(f"{s} ({n})" for s, n in ffn["matmul_weight_shapes"][k].items())
            top = ", ".join(f"{o['op_type']} {o['ms_per_run']:.1f}" for o in ops)
            lines.append(f"| {k} | {shapes} | {top} |")
        lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
