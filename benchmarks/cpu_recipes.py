"""Which int8 recipe is best on this CPU? Measured, not guessed: this is how `cpu-default` was chosen.

Exports MiniLM once, builds every candidate recipe's artefact from that export, scores each on STS-B dev
(from ../shared/data/stsb when present) and on fidelity to the fp32 outputs, then times all of them
interleaved in one loop (so the ratios hold on a noisy machine).

    python benchmarks/cpu_recipes.py [--runs 50] [--shapes 1x128,32x128]

Writes benchmarks/results/cpu_recipes.{json,md,png}.
"""

from __future__ import annotations

import argparse
import dataclasses
import tempfile
import time
from pathlib import Path

from _results import save

from compress.cli import _quiet_libraries

CANDIDATES = ("fp32", "fused", "dynamic-int8", "fused-dynamic-int8", "static-int8", "fused-static-int8")
STSB_DEV = Path(__file__).resolve().parents[2] / "shared" / "data" / "stsb" / "sts-dev.csv"
MAX_STSB_DROP = 0.5  # cpu-default = the fastest candidate at batch 1 within this many Spearman points of fp32


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=50)
    ap.add_argument("--shapes", default="1x128,32x128")
    ap.add_argument("--stsb", type=Path, default=STSB_DEV)
    args = ap.parse_args()
    _quiet_libraries()

    from compress.core.data import calibration_and_heldout, shipped_sentences
    from compress.core.evaluate import EvalSpec, evaluate
    from compress.core.fs import file_bytes
    from compress.core.models import load_model
    from compress.recipe import load_recipe
    from compress.steps import apply_onnx_stages, onnx_context
    from export.onnx_export import export_onnx
    from runtimes.encode import ort_outputs
    from runtimes.host import host_info
    from runtimes.ort import cpu_session
    from runtimes.profiler import ProfileConfig, Shape, measure_latency

    t_start = time.perf_counter()
    lm = load_model("minilm")
    calibration, heldout = calibration_and_heldout(shipped_sentences())
    ctx = onnx_context([], lm, calibration)
    rows, paths = {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        base = export_onnx(lm, work / "export")
        enc = lambda p: lambda t, s=cpu_session(p, 0): ort_outputs(s, lm.tokenizer, t, lm.task, lm.max_length)
        encode_base = enc(base)
        for name in CANDIDATES:
            recipe = load_recipe(name)
            sub = work / name
            sub.mkdir()
            t0 = time.perf_counter()
            path, _ = apply_onnx_stages(list(recipe.stages), base, sub, ctx)
            build_s = time.perf_counter() - t0
            encode = enc(path)
            fid = evaluate(EvalSpec("fidelity"), encode_base, encode, heldout)
            row = {
                "recipe": name,
                "stages": [s.name for s in recipe.stages],
                "mb": round(file_bytes(path) / 1e6, 2),
                "fidelity": fid["compressed"],
                "fidelity_min": fid["min"],
                "build_seconds": round(build_s, 1),
            }
            if args.stsb.is_file():
                st = evaluate(EvalSpec("stsb", args.stsb), encode_base, encode, heldout)
                row["stsb_dev"] = st["compressed"]
            rows[name], paths[name] = row, path
            print(f"{name:<20} built in {build_s:5.1f}s  {row}", flush=True)
        shapes = tuple(Shape.parse(s) for s in args.shapes.split(","))
        cfg = ProfileConfig(shapes=shapes, runs=args.runs)
        print(f"timing {len(paths)} variants interleaved: {args.shapes}, {args.runs} runs each", flush=True)
        lat = measure_latency(
            paths, cfg, on_progress=lambda d, t: print(f"  {d}/{t}", flush=True) if d % 10 == 0 else None
        )
    for name, results in lat.items():
        for r in results:
            rows[name][f"p50_ms_{r.batch}x{r.seq}"] = r.p50_ms
            rows[name][f"ratio_{r.batch}x{r.seq}"] = round(
                r.p50_ms / lat["fp32"][shapes.index(Shape(r.batch, r.seq))].p50_ms, 3
            )
    key = f"p50_ms_{shapes[0]}"
    fp32_stsb = rows["fp32"].get("stsb_dev")
    ok = [
        r
        for r in rows.values()
        if (fp32_stsb is None and r["fidelity"] >= 0.99)
        or (fp32_stsb is not None and fp32_stsb - r["stsb_dev"] <= MAX_STSB_DROP)
    ]
    best = min(ok, key=lambda r: r[key])["recipe"]
    out = {
        "host": host_info().as_dict(),
        "runs": args.runs,
        "shapes": args.shapes,
        "rows": list(rows.values()),
        "latency": {k: [dataclasses.asdict(r) for r in v] for k, v in lat.items()},
        "rule": f"fastest p50 at {shapes[0]} within {MAX_STSB_DROP} STS-B dev points of fp32",
        "best": best,
        "minutes": round((time.perf_counter() - t_start) / 60, 1),
        "command": "python benchmarks/cpu_recipes.py " + f"--runs {args.runs} --shapes {args.shapes}",
    }
    save("cpu_recipes", out, table, plot)


def table(out: dict) -> str:
    shapes = out["shapes"].split(",")
    head = (
        "| recipe | STS-B dev | fidelity (mean / min cos) | MB | "
        + " | ".join(f"p50 {s} ms (ratio)" for s in shapes)
        + " |"
    )
    lines = [
        f"Host: {out['host']['cpu_model']}, {out['host']['physical_cores']} cores, VNNI: {out['host']['has_vnni']}; "
        f"latency measured (ORT CPU EP), {out['runs']} runs, all variants interleaved.",
        "",
        head,
        "|" + "---|" * (4 + len(shapes)),
    ]
    for r in out["rows"]:
        lat = " | ".join(f"{r[f'p50_ms_{s}']:.1f} ({r[f'ratio_{s}']:.2f})" for s in shapes)
        lines.append(
            f"| {r['recipe']} | {r.get('stsb_dev', float('nan')):.2f} | {r['fidelity']:.4f} / {r['fidelity_min']:.4f} "
            f"| {r['mb']:.1f} | {lat} |"
        )
    lines += ["", f"Rule: {out['rule']} -> **{out['best']}**. Command: `{out['command']}` ({out['minutes']} min).", ""]
    return "\n".join(lines)


def plot(out: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shape = out["shapes"].split(",")[0]
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
    ykey = "stsb_dev" if "stsb_dev" in out["rows"][0] else "fidelity"
    big = max(r["mb"] for r in out["rows"])
    for i, r in enumerate(out["rows"]):
        ax.scatter(r[f"p50_ms_{shape}"], r[ykey], s=600 * r["mb"] / big, alpha=0.6, edgecolors="black")
        ax.annotate(
            f"{r['recipe']} ({r['mb']:.0f} MB)",
            (r[f"p50_ms_{shape}"], r[ykey]),
            fontsize=8,
            textcoords="offset points",
            xytext=(8, 10 - 22 * (i % 3)),
        )
    xs = [r[f"p50_ms_{shape}"] for r in out["rows"]]
    ax.set_xlim(min(xs) * 0.95, max(xs) * 1.25)
    ax.set_xlabel(f"p50 latency at {shape} (ms, measured, ORT CPU EP, interleaved)")
    ax.set_ylabel("STS-B dev Spearman x100" if ykey == "stsb_dev" else "fidelity (mean cosine)")
    ax.set_title("MiniLM-L6 on this CPU: accuracy vs latency per recipe (marker: size)", fontsize=10)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


if __name__ == "__main__":
    main()
