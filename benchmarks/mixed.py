"""Mixed-precision PTQ (quant.mixed) on MiniLM against uniform baselines, STS-B dev as the search metric.

    python benchmarks/mixed.py [--runs 50] [--heldout-pairs 1500]

Rows: fp32; uniform ORT dynamic int8 (the cpu-default recipe: every MatMul and the embedding Gather);
uniform static int8 QDQ (the static-int8 recipe); uniform int4 weight-only (the int4 recipe: encoder Linears in
MatMulNBits); quant.mixed at budgets 0.2 / 0.3 / 0.5 / 1.0 STS-B points with the augmented and the plain-Hessian
ordering; the same at 0.3 latency-aware. Because int4 costs MiniLM nothing on STS-B, every STS-B budget admits
the most aggressive model, so the two orderings are also compared where the budget binds: a fidelity budget
(mean cosine x100 to the original on the calibration sentences) of 0.5 / 1 / 2 points. Every model is scored on
STS-B dev and on a held-out split no search saw (the first --heldout-pairs pairs of STS-B *train*); p50 at
1x128 for all models interleaved in one loop. The sensitivities (Hutchinson traces, in-context changes) are
computed once and shared by every search, as is every built-and-scored probe model; the per-search evaluation
count is what that search alone needed. Per layer: each layer alone at int4, measured on fidelity, against
both orderings' scores (Spearman rank correlation: which ordering predicts the measured damage).
Writes benchmarks/results/mixed.{json,md,png}.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import fcntl
import hashlib
import tempfile
import time
from pathlib import Path

from _results import save

from compress.cli import _quiet_libraries

STSB = Path(__file__).resolve().parents[2] / "shared" / "data" / "stsb"
LOCK = "/tmp/edge-bench.lock"


def log(msg: str) -> None:
    print(msg, flush=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=50)
    ap.add_argument("--heldout-pairs", type=int, default=1500)
    ap.add_argument("--stsb-budgets", default="0.2,0.3,0.5,1.0")
    ap.add_argument("--fidelity-budgets", default="0.5,1.0,2.0")
    ap.add_argument("--model", default="minilm", help="(for a quick check on another model folder)")
    ap.add_argument("--name", default="mixed", help="results name under benchmarks/results/")
    args = ap.parse_args()
    _quiet_libraries()
    dev, train = STSB / "sts-dev.csv", STSB / "sts-train.csv"
    if not dev.is_file() or not train.is_file():
        raise SystemExit(f"STS-B not found under {STSB}")

    from scipy.stats import spearmanr

    from compress.core.data import calibration_and_heldout, shipped_sentences
    from compress.core.evaluate import EvalSpec, stsb_spearman
    from compress.core.fs import file_bytes
    from compress.core.models import load_model
    from compress.recipe import load_recipe
    from compress.stages.mixed import MixedQuant, Plan, _measure_alone, ladder, order_moves, plan_search, run_search
    from compress.steps import apply_onnx_stages, apply_torch_stages, make_scorer, onnx_context, pack_int4_layers
    from export.onnx_export import export_onnx
    from profiles import load_profile
    from runtimes.encode import ort_outputs
    from runtimes.host import host_info
    from runtimes.ort import cpu_session
    from runtimes.profiler import ProfileConfig, Shape, measure_latency

    t_start = time.perf_counter()
    lm = load_model(args.model)
    calibration, _ = calibration_and_heldout(shipped_sentences())
    profile = load_profile("cpu")
    rows, paths = [], {}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        heldout = work / "sts-heldout.csv"
        heldout.write_text(
            "".join(train.read_text(encoding="utf-8").splitlines(keepends=True)[: args.heldout_pairs]), encoding="utf-8"
        )

        scores: dict[tuple[str, Path], float] = {}  # several searches choose the same model: score it once

        def score(path: Path, spec_path: Path) -> float:
            key = (hashlib.sha1(path.read_bytes()).hexdigest(), spec_path)
            if key not in scores:
                s = cpu_session(path, 0)
                scores[key] = stsb_spearman(
                    lambda t: ort_outputs(s, lm.tokenizer, t, lm.task, lm.max_length), spec_path
                )
            return scores[key]

        log("exporting fp32 and the uniform baselines")
        fp32 = export_onnx(lm, work / "fp32")
        paths["fp32"] = fp32
        rows.append({"variant": "fp32", "kind": "baseline"})
        for name in ("dynamic-int8", "static-int8"):
            ctx = onnx_context([], lm, calibration, profile)
            out, _ = apply_onnx_stages(list(load_recipe(name).stages), fp32, work, ctx)
            paths[f"uniform {name}"] = out
            rows.append({"variant": f"uniform {name}", "kind": "baseline"})
        lm4, _ = apply_torch_stages(list(load_recipe("int4").stages), copy.deepcopy(lm), calibration)
        int4_fp = export_onnx(lm4, work / "int4")
        paths["uniform int4 (int4 recipe)"], _ = pack_int4_layers(lm4, int4_fp, work)
        rows.append({"variant": "uniform int4 (int4 recipe)", "kind": "baseline"})

        stsb_ctx = onnx_context(list(load_recipe("mixed").stages), lm, calibration, profile, EvalSpec("stsb", dev), log)
        fid_ctx = dataclasses.replace(stsb_ctx, scorer=make_scorer(EvalSpec("fidelity"), lm, calibration))
        base_cfg = MixedQuant()
        t0 = time.perf_counter()
        plan = plan_search(base_cfg, fp32, stsb_ctx)  # traces + in-context changes, once
        plan_minutes = (time.perf_counter() - t0) / 60
        plans = {
            "augmented": plan,
            "hessian": Plan(plan.layers, plan.node_of, order_moves(plan.moves, "hessian"), plan.info),
        }
        bases = {"stsb": stsb_ctx.scorer.score(fp32), "fidelity": fid_ctx.scorer.score(fp32)}
        shared = {"stsb": {}, "fidelity": {}}
        probes = work / "probes"
        searches = [("stsb", float(b), o, False) for b in args.stsb_budgets.split(",") for o in plans]
        searches += [("stsb", 0.3, "augmented", True)]
        searches += [("fidelity", float(b), o, False) for b in args.fidelity_budgets.split(",") for o in plans]
        accounts = {}
        for metric, budget, ordering, fast in searches:
            label = f"mixed {ordering}, {metric} budget {budget:g}" + (" latency-aware" if fast else "")
            log(f"== {label}")
            cfg = dataclasses.replace(base_cfg, max_drop=budget, ordering=ordering, latency_aware=fast)
            ctx = stsb_ctx if metric == "stsb" else fid_ctx
            dst = work / f"{len(paths)}.onnx"
            t0 = time.perf_counter()
            m = run_search(cfg, plans[ordering], fp32, dst, ctx, work=probes, models=shared[metric], base=bases[metric])
            paths[label] = dst
            accounts[label] = m
            rows.append(
                {
                    "variant": label,
                    "kind": "mixed",
                    "metric": metric,
                    "budget": budget,
                    "ordering": ordering,
                    "latency_aware": fast,
                    "search_drop": m["chosen_drop"],
                    "evaluations": m["evaluations"],
                    "moves": f"{m['moves_applied']}/{m['moves_total']}",
                    "layers": m["layers"],
                    "search_minutes": round((time.perf_counter() - t0) / 60, 2),
                    "trajectory": m["trajectory"],
                }
            )

        log("scoring every model on STS-B dev and the held-out split")
        for r in rows:
            p = paths[r["variant"]]
            r["stsb_dev"] = round(score(p, dev), 3)
            r["stsb_heldout"] = round(score(p, heldout), 3)
            r["mb"] = round(file_bytes(p) / 1e6, 2)
            log(f"{r['variant']}: dev {r['stsb_dev']} held-out {r['stsb_heldout']} {r['mb']} MB")

        inc = neural_compressor_rtn(lm, dev, heldout)
        log(f"Neural Compressor RTN int4 (torch): {inc}")

        log("per layer: each layer alone at int4, fidelity drop (ORT)")
        alone = _measure_alone(base_cfg, plan.layers, plan.node_of, fp32, work, fid_ctx, bases["fidelity"], log)
        per_layer = []
        for ordering, pl in plans.items():
            for rank, mv in enumerate(m for m in pl.moves if m.dst == ladder(base_cfg)[-1]):
                per_layer.append(
                    {
                        "ordering": ordering,
                        "layer": mv.layer,
                        "rank": rank,
                        "score": mv.score,
                        "omega": mv.omega,
                        "context": mv.context,
                        "fidelity_drop_alone": alone[mv.layer],
                    }
                )
        corr = {}
        for ordering in plans:
            sel = [r for r in per_layer if r["ordering"] == ordering]
            corr[ordering] = round(
                float(spearmanr([r["score"] for r in sel], [r["fidelity_drop_alone"] for r in sel]).statistic), 3
            )
        traces = {n: t for n, t in plan.info["traces"].items()}

        log(f"timing {len(paths)} models interleaved (1x128, {args.runs} runs), under {LOCK}")
        with open(LOCK, "w") as lock:  # one latency measurement on this machine at a time (other benchmarks too)
            fcntl.flock(lock, fcntl.LOCK_EX)
            lat = measure_latency(paths, ProfileConfig(shapes=(Shape(1, 128),), runs=args.runs))
    fp = rows[0]
    int8 = next(r for r in rows if r["variant"] == "uniform dynamic-int8")
    for r in rows:
        r["p50_ms_1x128"] = lat[r["variant"]][0].p50_ms
        r["dev_drop"] = round(fp["stsb_dev"] - r["stsb_dev"], 3)
        r["heldout_drop"] = round(fp["stsb_heldout"] - r["stsb_heldout"], 3)
    for r in rows:
        r["p50_vs_fp32"] = round(r["p50_ms_1x128"] / fp["p50_ms_1x128"], 3)
        r["p50_vs_int8"] = round(r["p50_ms_1x128"] / int8["p50_ms_1x128"], 3)
        r["size_vs_int8"] = round(r["mb"] / int8["mb"], 3)
    out = {
        "host": host_info().as_dict(),
        "rows": rows,
        "runs": args.runs,
        "heldout_pairs": args.heldout_pairs,
        "plan_minutes": round(plan_minutes, 2),
        "hessian_seconds": plan.info["hessian_seconds"],
        "context_seconds": plan.info["context_seconds"],
        "hutchinson_samples": base_cfg.hutchinson_samples,
        "calibration_samples": base_cfg.calibration_samples,
        "layers": len(plan.layers),
        "base_scores": bases,
        "neural_compressor_rtn": inc,
        "per_layer": per_layer,
        "rank_correlation_with_alone": corr,
        "traces": traces,
        "command": f"python benchmarks/mixed.py --runs {args.runs} --heldout-pairs {args.heldout_pairs}"
        + (f" --model {args.model}" if args.model != "minilm" else ""),
        "minutes": round((time.perf_counter() - t_start) / 60, 1),
    }
    save(args.name, out, table, plot)


def neural_compressor_rtn(lm, dev: Path, heldout: Path) -> dict:
    """Cross-check of the int4 grid: Neural Compressor's own RTN weight-only int4 (asymmetric, group 32, every
    Linear; neural_compressor.torch.quantization) scored in torch on the same splits."""
    import copy
    import dataclasses

    from compress.core.evaluate import stsb_spearman
    from compress.core.models import torch_outputs

    try:
        from neural_compressor.torch.quantization import RTNConfig, convert, prepare

        q = convert(prepare(copy.deepcopy(lm.model), RTNConfig(bits=4, group_size=32, use_sym=False)))
        lq = dataclasses.replace(lm, model=q)
        return {
            "config": "RTNConfig(bits=4, group_size=32, use_sym=False), every nn.Linear",
            "stsb_dev": round(stsb_spearman(lambda t: torch_outputs(lq, t), dev), 3),
            "stsb_heldout": round(stsb_spearman(lambda t: torch_outputs(lq, t), heldout), 3),
        }
    except Exception as e:  # a cross-check, never fatal to the benchmark
        return {"error": f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"}


def table(out: dict) -> str:
    lines = [
        f"MiniLM-L6 on this CPU ({out['host']['cpu_model']}, VNNI: {out['host']['has_vnni']}); STS-B dev (search "
        f"metric for the STS-B budgets) and a held-out split no search saw (first {out['heldout_pairs']} pairs of "
        f"STS-B train); p50 at 1x128 measured interleaved ({out['runs']} runs, ORT CPU EP). Sensitivities once for "
        f"all searches: {out['layers']} layers ({out['layers'] - 1} Linears + the word embeddings), Hutchinson {out['hutchinson_samples']} "
        f"samples ({out['hessian_seconds']} s), in-context changes ({out['context_seconds']} s), on "
        f"{out['calibration_samples']} calibration sentences.",
        "",
        "| variant | STS-B dev | dev drop | held-out | held-out drop | MB | size vs int8 | p50 ms | vs fp32 | vs int8 "
        "| layers float/int8/int4 | evaluations | search min |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in out["rows"]:
        layers = "/".join(str(v) for v in r["layers"].values()) if "layers" in r else ""
        lines.append(
            f"| {r['variant']} | {r['stsb_dev']:.2f} | {r['dev_drop']:+.2f} | {r['stsb_heldout']:.2f} | "
            f"{r['heldout_drop']:+.2f} | {r['mb']:.1f} | {r['size_vs_int8']:.2f} | {r['p50_ms_1x128']:.1f} | "
            f"{r['p50_vs_fp32']:.2f} | {r['p50_vs_int8']:.2f} | {layers} | {r.get('evaluations', '')} | "
            f"{r.get('search_minutes', '')} |"
        )
    c = out["rank_correlation_with_alone"]
    lines += [
        "",
        f"Which ordering predicts the measured damage: Spearman between each ordering's int4 score and the "
        f"fidelity drop of that layer alone at int4 (ORT, {out['layers']} layers): augmented {c['augmented']:+.3f}, "
        f"plain Hessian {c['hessian']:+.3f}.",
        "",
        f"Command: `{out['command']}` ({out['minutes']} min).",
        "",
    ]
    inc = out.get("neural_compressor_rtn", {})
    if "stsb_dev" in inc:
        lines += [
            f"Cross-check with Neural Compressor's RTN int4 weight-only ({inc['config']}, run in torch): STS-B dev "
            f"{inc['stsb_dev']:.2f}, held-out {inc['stsb_heldout']:.2f} (compare the uniform int4 row, ORT's "
            "MatMulNBits grid on the encoder Linears).",
            "",
        ]
    elif inc:
        lines += [f"Neural Compressor RTN cross-check failed: {inc['error']}", ""]
    lines += ["Fidelity-budget searches, trajectory (k: moves applied; drop in fidelity points):", ""]
    for r in out["rows"]:
        if r.get("metric") == "fidelity":
            traj = ", ".join(f"k={t['k']} {t['drop']:+.2f}" for t in r["trajectory"])
            lines.append(f"- {r['variant']}: {traj}")
    lines.append("")
    return "\n".join(lines)


def plot(out: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(12, 4.6), dpi=120)
    for r in out["rows"]:
        color = (
            "tab:gray" if r["kind"] == "baseline" else "tab:blue" if r.get("ordering") == "augmented" else "tab:orange"
        )
        marker = "o" if r.get("metric", "stsb") == "stsb" else "s"
        a.scatter(r["mb"], r["stsb_dev"], color=color, marker=marker, s=50, alpha=0.8, edgecolors="black")
        a.annotate(
            r["variant"].replace("mixed ", "").replace(" budget", ""),
            (r["mb"], r["stsb_dev"]),
            textcoords="offset points",
            xytext=(4, 3),
            fontsize=6,
        )
    a.set_xlabel("model MB")
    a.set_ylabel("STS-B dev Spearman x100")
    a.set_title(
        "size vs accuracy (gray: uniform; blue: augmented; orange: Hessian; squares: fidelity budget)", fontsize=8
    )
    a.grid(alpha=0.3)
    for r in out["rows"]:
        if r.get("metric") == "fidelity":
            style = "-" if r["ordering"] == "augmented" else "--"
            a_ = [t["drop"] for t in r["trajectory"]]
            b.plot(range(1, len(a_) + 1), a_, style, marker="o", label=f"{r['ordering']}, budget {r['budget']:g}")
    b.set_xlabel("probe (bisection step)")
    b.set_ylabel("fidelity drop (points)")
    b.set_title("bisection trajectories, fidelity budgets", fontsize=9)
    b.legend(fontsize=7)
    b.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


if __name__ == "__main__":
    main()
