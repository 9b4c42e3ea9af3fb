"""Low-rank error compensation on MiniLM: int4 RTN and 2:4 one-shot, each + SVD / + EoRA, STS-B dev.

    python benchmarks/lowrank.py [--ranks 8,16,32,64] [--runs 50]

Every variant is built by the same stages `compress run` uses (quant.int4 / prune.nm, lowrank.svd /
lowrank.eora), exported, int4 layers packed into MatMulNBits, scored with ONNX Runtime on STS-B dev
(../shared/data/stsb), and all variants are timed interleaved in one loop (ratios hold on a noisy host).
Writes benchmarks/results/lowrank.{json,md,png}.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import tempfile
import time
from pathlib import Path

from _results import RESULTS, save

from compress.cli import _quiet_libraries

STSB_DEV = Path(__file__).resolve().parents[2] / "shared" / "data" / "stsb" / "sts-dev.csv"


def variants(ranks: list[int]) -> list[tuple[str, list[dict]]]:
    int4 = {"type": "quant.int4", "block_size": 32, "accuracy_level": 4}
    nm = {"type": "prune.nm", "n": 2, "m": 4}
    out = [("int4 RTN", [int4])]
    for method in ("svd", "eora"):
        out += [(f"int4 + {method.upper()} r{r}", [int4, {"type": f"lowrank.{method}", "rank": r}]) for r in ranks]
    out += [("2:4 one-shot", [nm])]
    out += [(f"2:4 + {m.upper()} r32", [nm, {"type": f"lowrank.{m}", "rank": 32}]) for m in ("svd", "eora")]
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--ranks", default="8,16,32,64")
    ap.add_argument("--runs", type=int, default=50)
    ap.add_argument("--shapes", default="1x128,8x128")
    ap.add_argument("--stsb", type=Path, default=STSB_DEV)
    ap.add_argument("--replot", action="store_true", help="Redraw the plot from results/lowrank.json only.")
    args = ap.parse_args()
    if args.replot:
        plot(json.loads((RESULTS / "lowrank.json").read_text()), RESULTS / "lowrank.png")
        return
    _quiet_libraries()
    if not args.stsb.is_file():
        raise SystemExit(f"STS-B dev not found at {args.stsb}: pass --stsb PATH")

    from compress.core.data import calibration_and_heldout, shipped_sentences
    from compress.core.evaluate import stsb_spearman
    from compress.core.fs import file_bytes
    from compress.core.models import load_model
    from compress.core.numerics import row_cosine
    from compress.recipe import parse_recipe
    from compress.steps import apply_torch_stages, pack_int4_layers
    from export.onnx_export import export_onnx
    from runtimes.encode import ort_outputs
    from runtimes.host import host_info
    from runtimes.ort import cpu_session
    from runtimes.profiler import ProfileConfig, Shape, measure_latency

    t_start = time.perf_counter()
    lm0 = load_model("minilm")
    calibration, heldout = calibration_and_heldout(shipped_sentences())
    rows, paths = [], {}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        base = export_onnx(lm0, work / "fp32")
        enc = lambda p: lambda t, s=cpu_session(p, 0): ort_outputs(s, lm0.tokenizer, t, lm0.task, lm0.max_length)
        ref = enc(base)(heldout)
        fp32 = {
            "variant": "fp32",
            "stsb_dev": round(stsb_spearman(enc(base), args.stsb), 3),
            "mb": round(file_bytes(base) / 1e6, 2),
            "fidelity": 1.0,
        }
        rows.append(fp32)
        paths["fp32"] = base
        print(f"fp32: {fp32}", flush=True)
        for i, (name, stages) in enumerate(variants([int(r) for r in args.ranks.split(",")])):
            t0 = time.perf_counter()
            recipe = parse_recipe({"stages": stages}, name, "benchmark")
            lm, reports = apply_torch_stages(list(recipe.stages), copy.deepcopy(lm0), calibration)
            sub = work / f"v{i}"
            path = export_onnx(lm, sub)
            if lm.int4_layers:
                path, _ = pack_int4_layers(lm, path, sub)
            build_s = time.perf_counter() - t0
            e = enc(path)
            row = {
                "variant": name,
                "stsb_dev": round(stsb_spearman(e, args.stsb), 3),
                "mb": round(file_bytes(path) / 1e6, 2),
                "fidelity": round(float(row_cosine(ref, e(heldout)).mean()), 5),
                "build_minutes": round(build_s / 60, 2),
            }
            lr = next((r["metrics"] for r in reports if r["name"].startswith("lowrank")), None)
            if lr:
                row |= {
                    "error_before": lr["mean_error_before"],
                    "error_after": lr["mean_error_after"],
                    "added_params": lr["added_params"],
                }
            rows.append(row)
            paths[name] = path
            print(f"{name}: {row}", flush=True)
        shapes = tuple(Shape.parse(s) for s in args.shapes.split(","))
        print(f"timing {len(paths)} variants interleaved ({args.shapes}, {args.runs} runs)", flush=True)
        lat = measure_latency(paths, ProfileConfig(shapes=shapes, runs=args.runs))
    for row in rows:
        for r in lat[row["variant"]]:
            row[f"p50_ms_{r.batch}x{r.seq}"] = r.p50_ms
    drop = fp32["stsb_dev"] - rows[1]["stsb_dev"]
    for row in rows:
        row["recovered_of_int4_drop"] = round((row["stsb_dev"] - rows[1]["stsb_dev"]) / drop, 3) if drop > 0 else None
    out = {
        "host": host_info().as_dict(),
        "rows": rows,
        "shapes": args.shapes,
        "runs": args.runs,
        "latency": {k: [dataclasses.asdict(r) for r in v] for k, v in lat.items()},
        "command": f"python benchmarks/lowrank.py --ranks {args.ranks} --runs {args.runs} --shapes {args.shapes}",
        "minutes": round((time.perf_counter() - t_start) / 60, 1),
    }
    save("lowrank", out, table, plot)


def table(out: dict) -> str:
    shapes = out["shapes"].split(",")
    lines = [
        f"MiniLM-L6, STS-B dev, ORT CPU EP on {out['host']['cpu_model']} ({out['host']['physical_cores']} cores, "
        f"VNNI: {out['host']['has_vnni']}); latency measured, {out['runs']} runs, all variants interleaved.",
        "",
        "| variant | STS-B dev | fidelity | MB | "
        + " | ".join(f"p50 {s} ms" for s in shapes)
        + " | weighted error before -> after | added params |",
        "|" + "---|" * (6 + len(shapes)),
    ]
    for r in out["rows"]:
        err = f"{r['error_before']:.4f} -> {r['error_after']:.4f}" if "error_before" in r else ""
        lines.append(
            f"| {r['variant']} | {r['stsb_dev']:.2f} | {r['fidelity']:.4f} | {r['mb']:.1f} | "
            + " | ".join(f"{r[f'p50_ms_{s}']:.1f}" for s in shapes)
            + f" | {err} | {r.get('added_params', '')} |"
        )
    lines += ["", f"Command: `{out['command']}` ({out['minutes']} min).", ""]
    return "\n".join(lines)


def plot(out: dict, path: Path) -> None:
    """Fidelity and activation-weighted error vs rank (STS-B dev barely moves under int4 on this model)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = out["rows"]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4), dpi=120)
    for method, color in (("SVD", "tab:orange"), ("EORA", "tab:blue")):
        pts = sorted(
            (int(r["variant"].split(" r")[-1]), r["fidelity"], r["error_after"])
            for r in rows
            if r["variant"].startswith(f"int4 + {method}")
        )
        if pts:
            label = f"int4 RTN + {method.replace('EORA', 'EoRA')}"
            ax1.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", color=color, label=label)
            ax2.plot([p[0] for p in pts], [p[2] for p in pts], marker="o", color=color, label=label)
    int4 = next(r for r in rows if r["variant"] == "int4 RTN")
    before = next(r["error_before"] for r in rows if "error_before" in r and r["variant"].startswith("int4"))
    ax1.axhline(int4["fidelity"], color="red", ls=":", label="int4 RTN (no compensation)")
    ax2.axhline(before, color="red", ls=":", label="int4 RTN (no compensation)")
    for ax, ylabel in (
        (ax1, "fidelity: mean cosine to fp32 outputs"),
        (ax2, "activation-weighted error ||dW X|| / ||W X||"),
    ):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("rank r")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(
        "MiniLM-L6 int4 weight-only RTN: low-rank error compensation (higher left, lower right is better)", fontsize=10
    )
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


if __name__ == "__main__":
    main()
