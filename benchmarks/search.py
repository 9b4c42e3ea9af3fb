"""`compress search` on MiniLM, then its winner next to the anchors, all timed in one interleaved loop.

    python benchmarks/search.py [--budget 60m] [--runs 200] [--steps 400]

1. Runs `compress search minilm --target cpu --max-drop 0.5 --eval stsb:sts-dev.csv --train stsb:sts-train.csv
   --budget 60m` (selection = even dev rows, held-out = odd dev rows; training = STS-B train) and records its wall time.
2. Builds the anchors: the fp32 export and ORT dynamic int8 of the original, and the shipped recipes cpu-default,
   fused-hybrid-int8, ffn-50 and static-int8 (each through `compress run`).
3. Scores every artefact on the held-out split (which the search never scored) and times all of them interleaved,
   round by round, at 1x128 and 32x128 under the machine's benchmark lock, with the load average recorded.
4. Runs the winner's recipe with `compress run` (what the shipped `minilm-fast` recipe does) and records its wall time.

Writes benchmarks/results/search.{json,md,png} (the search's own frontier plot is copied there too).
"""

from __future__ import annotations

import argparse
import fcntl
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _results import RESULTS, save

from compress.cli import _quiet_libraries

ROOT = Path(__file__).resolve().parents[1]
STSB = ROOT.parent / "shared" / "data" / "stsb"
LOCK = "/tmp/edge-bench.lock"
SHIPPED = ("cpu-default", "fused-hybrid-int8", "ffn-50", "static-int8")


def cli(args: list[str], log: Path) -> float:
    """Run the CLI in a fresh process (as a user would); returns wall seconds. stderr goes to ``log``."""
    t0 = time.perf_counter()
    with log.open("w") as f:
        res = subprocess.run([sys.executable, "-m", "compress.cli", *args], stdout=f, stderr=subprocess.STDOUT,
                             env={**os.environ, "HF_HUB_OFFLINE": "1"})  # fmt: skip
    if res.returncode:
        raise SystemExit(f"{' '.join(args[:2])} failed ({res.returncode}): see {log}")
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--budget", default="60m")
    ap.add_argument("--steps", type=int, default=400)
    ap.add_argument("--runs", type=int, default=200)
    ap.add_argument("--work", type=Path, help="keep the artefacts here (default: a temporary folder)")
    ap.add_argument(
        "--reuse",
        action="store_true",
        help="reuse the search output and recipe runs already in --work (after an interrupted benchmark)",
    )
    ap.add_argument("--earlier-seconds", type=float, default=0.0,
                    help="wall seconds an earlier, interrupted run of the same study in --work already spent (the "
                    "search resumes it; both are reported)")  # fmt: skip
    args = ap.parse_args()
    _quiet_libraries()
    if not (STSB / "sts-dev.csv").is_file():
        raise SystemExit(f"needs {STSB}/sts-dev.csv and sts-train.csv")

    from compress.core.evaluate import EvalSpec, stsb_spearman
    from compress.core.fs import file_bytes
    from compress.core.models import load_model
    from compress.search import split_eval
    from runtimes.encode import ort_outputs
    from runtimes.host import host_info
    from runtimes.ort import cpu_session
    from runtimes.profiler import ProfileConfig, Shape, measure_latency

    work = args.work or Path(tempfile.mkdtemp(prefix="bench-search-"))
    work.mkdir(parents=True, exist_ok=True)
    dev, train = STSB / "sts-dev.csv", STSB / "sts-train.csv"
    out = {"command": "python benchmarks/search.py " + " ".join(sys.argv[1:]), "host": host_info().as_dict(),
           "load_start": os.getloadavg()}  # fmt: skip

    # 1. the search
    search_out = work / "search"
    search_args = ["search", "minilm", "--target", "cpu", "--max-drop", "0.5", "--eval", f"stsb:{dev}",
                   "--train", f"stsb:{train}", "--budget", args.budget, "--steps", str(args.steps),
                   "--out", str(search_out), "--force", "--storage", f"journal:{work / 'study.journal'}"]  # fmt: skip
    print("running: compress " + " ".join(search_args), flush=True)
    log = work / ("search.log" if not args.earlier_seconds else "search-resumed.log")
    if args.reuse and (search_out / "report.json").is_file():
        seconds = json.loads((work / "search-seconds.json").read_text())["seconds"]
    else:
        seconds = round(cli(search_args, log), 1)
        (work / "search-seconds.json").write_text(json.dumps({"seconds": seconds}))
    out["search_seconds"] = seconds
    out["earlier_search_seconds"] = args.earlier_seconds
    report = json.loads((search_out / "report.json").read_text())
    out["search"] = {k: report[k] for k in ("winner", "anchors", "frontier", "roofline_rank", "study", "seconds")}
    out["search"]["trials"] = report["trials"]
    out["search"]["architectures"] = report["architectures"]
    shutil.copy2(search_out / "frontier.png", RESULTS / "search-frontier.png")

    # 2. anchors and shipped recipes, through compress run
    models: dict[str, Path] = {}
    for name in SHIPPED:
        folder = work / name
        if not (args.reuse and (folder / "report.json").is_file()):
            print(f"building {name}", flush=True)
            cli(["run", "minilm", "--recipe", name, "--out", str(folder), "--force", "--runs", "3", "--shapes",
                 "1x128"], work / f"{name}.log")  # fmt: skip
        models[name] = folder / "onnx" / "model.onnx"  # the consumer layout (README, "What lands ...")
    anchors = report.get("anchors", {})
    keep = search_out.parent / f".{search_out.name}.search" / "anchor-fp32"
    models = {"fp32": keep / "model.onnx", "ORT dynamic int8": next(keep.glob("stage*-quant.dynamic.onnx")), **models}
    if report["winner"]:
        models["search winner"] = search_out / "winner" / "onnx" / "model.onnx"

    # 3. held-out scores and one interleaved timing loop
    lm = load_model("minilm")
    _, held = split_eval(EvalSpec("stsb", dev), None, work)
    rows = {}
    for name, path in models.items():
        sess = cpu_session(path, 0)
        rows[name] = {"heldout": round(stsb_spearman(lambda t: ort_outputs(sess, lm.tokenizer, t, lm.task, lm.max_length),
                                                     held), 3), "mb": round(file_bytes(path) / 1e6, 2)}  # fmt: skip
    with open(LOCK, "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        out["load_timing_start"] = os.getloadavg()
        lat = measure_latency(models, ProfileConfig(shapes=(Shape(1, 128), Shape(32, 128)), runs=args.runs))
        out["load_timing_end"] = os.getloadavg()
    for name in models:
        rows[name]["p50_1x128"] = round(lat[name][0].p50_ms, 3)
        rows[name]["p50_32x128"] = round(lat[name][1].p50_ms, 3)
    for name in models:
        for shape in ("1x128", "32x128"):
            rows[name][f"vs_fp32_{shape}"] = round(rows[name][f"p50_{shape}"] / rows["fp32"][f"p50_{shape}"], 3)
            rows[name][f"vs_int8_{shape}"] = round(
                rows[name][f"p50_{shape}"] / rows["ORT dynamic int8"][f"p50_{shape}"], 3
            )
        rows[name]["heldout_drop"] = round(rows["fp32"]["heldout"] - rows[name]["heldout"], 3)
    out["rows"] = rows
    out["anchors_selection"] = anchors

    # 4. the winner's recipe through compress run (the shipped minilm-fast)
    if report["winner"]:
        out["recipe_run_seconds"] = round(cli(["run", "minilm", "--recipe", str(search_out / "winner.toml"), "--train",
                                               f"stsb:{train}", "--eval", f"stsb:{held}", "--out",
                                               str(work / "recipe-run"), "--force", "--runs", "20"],
                                              work / "recipe-run.log"), 1)  # fmt: skip
        rr = json.loads((work / "recipe-run" / "report.json").read_text())
        out["recipe_run"] = {"eval": rr["eval"], "latency": rr["latency"], "baseline_latency": rr["baseline_latency"]}
    out["load_end"] = os.getloadavg()
    save("search", out, table, plot)


def table(out: dict) -> str:
    s = out["search"]
    w = s["winner"]
    lines = ["# compress search on MiniLM (STS-B), winner next to the anchors", "",
             f"Command: `{out['command']}`; search wall time {out['search_seconds'] / 60:.1f} min"
             + (f" (resuming a run of the same study that had spent {out['earlier_search_seconds'] / 60:.1f} min: "
                f"{(out['search_seconds'] + out['earlier_search_seconds']) / 60:.1f} min in all)"
                if out.get("earlier_search_seconds") else "") + "; host "
             f"{out['host']['cpu_model']} ({out['host']['physical_cores']} cores); load average at start "
             f"{out['load_start'][0]:.1f}, while timing {out['load_timing_start'][0]:.1f} -> "
             f"{out['load_timing_end'][0]:.1f}.", ""]  # fmt: skip
    if w:
        lines += [f"Winner: trial {w['trial']} {w['params']}; selection drop {w['selection_drop']:+.3f} (bootstrap s.e. "
                  f"{w.get('selection_drop_se') or 0:.3f}); held-out drop "
                  f"{w['heldout_drop']:+.3f} ({'inside' if w['inside_budget'] else 'OUTSIDE'} the 0.5 budget).", ""]  # fmt: skip
    lines += ["| model | STS-B held-out | drop | MB | p50 1x128 ms | x fp32 | x ORT int8 | p50 32x128 ms | x fp32 | x ORT int8 |",
              "|---|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for name, r in out["rows"].items():
        lines.append(f"| {name} | {r['heldout']:.3f} | {r['heldout_drop']:+.3f} | {r['mb']:.1f} | {r['p50_1x128']:.2f} | "
                     f"{r['vs_fp32_1x128']:.2f} | {r['vs_int8_1x128']:.2f} | {r['p50_32x128']:.1f} | "
                     f"{r['vs_fp32_32x128']:.2f} | {r['vs_int8_32x128']:.2f} |")  # fmt: skip
    rr = s.get("roofline_rank")
    if rr:
        lines += ["", f"Roofline ranking of the {rr['probes']} timed architectures: Spearman with measurement "
                      f"{rr['spearman_plain']} (fixed efficiency) / {rr['spearman_calibrated']} (calibrated)."]  # fmt: skip
    if "recipe_run_seconds" in out:
        lines += ["", f"The winner's recipe through `compress run`: {out['recipe_run_seconds'] / 60:.1f} min wall."]
    return "\n".join(lines) + "\n"


def plot(out: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.4), dpi=120)
    for name, r in out["rows"].items():
        ax.scatter([r["p50_1x128"]], [r["heldout_drop"]], s=30 + 5 * r["mb"], alpha=0.7, label=name)
    ax.axhline(0.5, color="tab:red", ls="--", lw=1, label="budget")
    ax.set_xlabel("p50 at 1x128 (ms, measured interleaved)")
    ax.set_ylabel("STS-B drop on the held-out split (points)")
    ax.set_title("MiniLM: search winner vs anchors", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


if __name__ == "__main__":
    main()
