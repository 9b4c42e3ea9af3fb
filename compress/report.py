"""The run report: report.json (everything), report.md (tables a person reads), plot.png."""
from __future__ import annotations

import dataclasses
import hashlib
import json
import platform
import tempfile
import zipfile
from importlib import metadata
from pathlib import Path

from compress.stages.base import file_bytes

PACKAGES = ("edge-compress", "torch", "onnx", "onnxruntime", "optimum", "optimum-onnx", "transformers",
            "sentence-transformers", "neural-compressor-pt", "numpy")


def versions() -> dict:
    out = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return out


def _lat_dicts(rows) -> list[dict]:
    return [dataclasses.asdict(r) for r in rows]


def findings(report: dict) -> list[str]:
    """Plain sentences a user can act on, derived from the measured numbers only."""
    out = []
    for comp, base in zip(report["latency"], report["baseline_latency"]):
        ratio = comp["p50_ms"] / base["p50_ms"]
        verdict = "faster" if ratio < 0.95 else "slower" if ratio > 1.05 else "no faster"
        out.append(f"At batch {comp['batch']} x seq {comp['seq']} the compressed model's p50 is {ratio:.2f}x the "
                   f"original's ({comp['p50_ms']:.1f} vs {base['p50_ms']:.1f} ms, measured interleaved): {verdict}.")
    a, b = report["artifact"]["bytes"], report["baseline_artifact"]["bytes"]
    out.append(f"Size: {a / 1e6:.1f} MB vs {b / 1e6:.1f} MB fp32 ({a / b:.2f}x); "
               f"{report['artifact']['bytes_zip'] / 1e6:.1f} MB zipped.")
    for e in report["eval"]:
        if e["name"] == "fidelity":
            out.append(f"Fidelity: mean cosine {e['compressed']:.4f} (min {e['min']:.4f}) to the original's outputs on held-out text.")
        else:
            out.append(f"{e['name']}: {e['compressed']:.2f} vs {e['original']:.2f} original ({e['delta']:+.2f}).")
    host = report["host"]
    quantized = any(s["name"].startswith("quant.") for s in report["stages"])
    if quantized and not host["has_vnni"] and report["target"]["kind"] == "cpu":
        out.append("This CPU has no VNNI/AMX: int8 runs on AVX2 (vpmaddubsw) and gains less than on VNNI or AMX CPUs; "
                   "re-measure on the deployment CPU.")
    return out


def build_report(*, cfg, lm, recipe, profile, stages, artifact: Path, baseline: Path, parity, evals, latency, ops,
                 roofline: dict) -> dict:
    from runtimes.host import host_info

    report = {
        "model": {"name": lm.name, "path": str(lm.path), "architecture": getattr(lm.config, "model_type", "")},
        "task": lm.task,
        "target": {"name": profile.name, "kind": profile.kind, "runtime": profile.runtime,
                   "execution_provider": profile.execution_provider, "profile": profile.source_file},
        "recipe": recipe.as_dict(),
        "stages": stages,
        "artifact": {"path": str(artifact.name), "bytes": file_bytes(artifact), "bytes_zip": zipped_bytes(artifact),
                     "sha256": _sha256(artifact)},
        "baseline_artifact": {"bytes": file_bytes(baseline), "note": "fp32 export of the original model (not kept)"},
        "parity": parity,
        "eval": evals,
        "latency": _lat_dicts(latency["compressed"]),
        "baseline_latency": _lat_dicts(latency["original"]),
        "ops": ops,
        "roofline": roofline,
        "host": host_info().as_dict(),
        "versions": versions(),
    }
    report["findings"] = findings(report)
    return report


def zipped_bytes(path: Path) -> int:
    """Size after deflate: what sparsity buys on disk and over the air even where no kernel skips zeros."""
    with tempfile.TemporaryFile() as f:
        with zipfile.ZipFile(f, "w", compression=zipfile.ZIP_DEFLATED) as z:
            z.write(path, path.name)
        return f.tell()


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def markdown(report: dict) -> str:
    lines = [f"# Compression report: {report['model']['name']} -> {report['target']['name']}", "",
             f"Recipe `{report['recipe']['name']}` ({report['recipe']['description']}); task {report['task']}; "
             f"host {report['host']['cpu_model']}.", "", "## Findings", ""]
    lines += [f"- {f}" for f in report["findings"]]
    tool = report["latency"][0].get("tool") or "ONNX Runtime CPU EP" if report["latency"] else "ONNX Runtime CPU EP"
    lines += ["", f"## Latency (source: measured, {tool}, original and compressed interleaved)", "",
              "| shape | original p50 ms | compressed p50 ms | ratio | compressed p90 ms | p99 ms | seq/s | runs | threads |",
              "|---|---|---|---|---|---|---|---|---|"]
    for c, b in zip(report["latency"], report["baseline_latency"]):
        lines.append(f"| {c['batch']}x{c['seq']} | {b['p50_ms']:.2f} | {c['p50_ms']:.2f} | {c['p50_ms'] / b['p50_ms']:.2f} | "
                     f"{c['p90_ms']:.2f} | {c['p99_ms']:.2f} | {c['throughput_per_s']:.1f} | {c['runs']} | {c['threads']} |")
    roof = report.get("roofline", {})
    if roof:
        lines += ["", f"## Roofline estimate vs measurement (how far the estimator is from reality on "
                      f"{'this CPU' if report['target']['kind'] == 'cpu' else report['target']['name']})", "",
                  "| shape | model | measured p50 ms | roofline ms (analytic) | estimate / measured |", "|---|---|---|---|---|"]
        for label, measured in (("original", report["baseline_latency"]), ("compressed", report["latency"])):
            for m, e in zip(measured, roof.get(label, [])):
                est = f"{e['p50_ms']:.2f}" if "p50_ms" in e else f"n/a ({e.get('error', '')})"
                ratio = f"{e['p50_ms'] / m['p50_ms']:.2f}" if "p50_ms" in e else ""
                lines.append(f"| {m['batch']}x{m['seq']} | {label} | {m['p50_ms']:.2f} | {est} | {ratio} |")
        first = next((e for rows in roof.values() for e in rows if "caveats" in e), None)
        if first:
            lines += [""] + [f"- {c}" for c in first["caveats"]]
    if "gpu" in report:             # every GPU variant side by side (compress.gpu)
        from compress.gpu import markdown_lines

        lines += markdown_lines(report["gpu"])
    lines += ["", "## Accuracy", "", "| eval | metric | original | compressed |", "|---|---|---|---|"]
    for e in report["eval"]:
        lines.append(f"| {e['name']} | {e['metric']} | {e['original']} | {e['compressed']} |")
    lines += ["", "## Parity against torch", "", "| check | min cosine | mean cosine | max abs diff | gate |", "|---|---|---|---|---|"]
    for name, p in report["parity"].items():
        gate = "recorded" if p["threshold"] is None else f"{'pass' if p['passed'] else 'FAIL'} (>= {p['threshold']})"
        lines.append(f"| {name} | {p['cosine_min']:.6f} | {p['cosine_mean']:.6f} | {p['max_abs_diff']:.3g} | {gate} |")
    lines += _mixed_section(report)
    lines += ["", "## Stages", "", "| stage | seconds | metrics |", "|---|---|---|"]
    for s in report["stages"]:
        brief = {k: v for k, v in s["metrics"].items() if k not in BULKY}
        lines.append(f"| {s['name']} | {s['seconds']} | `{json.dumps(brief)}` |")
    if not report["stages"]:
        lines.append("| (none) | | |")
    ops = report["ops"]
    if ops["original"] or ops["compressed"]:        # none on the gpu target (no CPU EP breakdown there)
        lines += ["", f"## Top ops at {ops['shape']} (ORT profiler, ms per run)", "", "| model | op | ms | share |", "|---|---|---|---|"]
    for which in ("original", "compressed"):
        for o in ops[which]:
            lines.append(f"| {which} | {o['op_type']} | {o['ms_per_run']:.2f} | {o['share'] * 100:.1f}% |")
    a = report["artifact"]
    lines += ["", "## Artefact", "", f"`{a['path']}`: {a['bytes']:,} bytes ({a['bytes_zip']:,} zipped), sha256 `{a['sha256']}` "
              f"(fp32 original: {report['baseline_artifact']['bytes']:,} bytes).", "",
              "Versions: " + ", ".join(f"{k} {v}" for k, v in report["versions"].items()), ""]
    return "\n".join(lines)


BULKY = ("per_layer", "trajectory", "order")     # per-layer tables get their own section, not a JSON dump


def _mixed(report: dict) -> dict | None:
    return next((s["metrics"] for s in report["stages"] if s["name"] == "quant.mixed"), None)


def _mixed_section(report: dict) -> list[str]:
    """quant.mixed: the search and the per-layer account of why each layer got its precision."""
    m = _mixed(report)
    if not m:
        return []
    lo, hi = m["budget_points"]
    lines = ["", "## Mixed precision (quant.mixed)", "",
             f"Search metric {m['metric']}: float {m['base_score']:.3f}; budget drop in [{lo:g}, {hi:g}] points; "
             f"ordering {m['ordering']}; {m['verdict']} ({m['moves_applied']}/{m['moves_total']} moves, "
             f"{m['evaluations']} evaluations incl. the float model; traces {m['hessian_seconds']} s, "
             f"context {m['context_seconds']} s, search {m['search_seconds']} s). Layers: "
             + ", ".join(f"{k} {v}" for k, v in m["layers"].items()) + "."]
    if m.get("next_moves_that_break_budget"):
        lines.append(f"Next moves in the ordering, which the budget stopped: {', '.join(m['next_moves_that_break_budget'])}.")
    lines += ["", "Bisection trajectory (every probe is the real ONNX model, scored in ORT):", "",
              "| probe | moves k | layers | score | drop | MB | inside budget |" + (" p50 ms |" if m["latency_timed"] else ""),
              "|---|---|---|---|---|---|---|" + ("---|" if m["latency_timed"] else "")]
    timed = {t["k"]: t["p50_ms"] for t in m["latency_timed"]}
    for i, r in enumerate(m["trajectory"], 1):
        layers = ", ".join(f"{k} {v}" for k, v in r["layers"].items() if v)
        extra = f" {timed.get(r['k'], '')} |" if timed else ""
        lines.append(f"| {i} | {r['k']} | {layers} | {r['score']:.3f} | {r['drop']:+.3f} | {r['bytes'] / 1e6:.2f} | "
                     f"{'yes' if r['feasible'] else 'no'} |{extra}")
    dsts = [d for d in ("int8-dynamic", "int8-qdq", "int4-weights") if f"omega_{d}" in m["per_layer"][0]]
    head = "| layer | Hessian trace (± s.e.) | " + " | ".join(f"omega {d} | context {d} | score {d}" for d in dsts)
    alone = "drop_alone" in m["per_layer"][0]
    lines += ["", "Per layer (omega: HAWQ-V2 Tr(H)/n x ||Q(W)-W||^2; context: output change 1-cos when the layer takes "
              "the move with the others at their precision; score: augmented sensitivity per MB saved):", "",
              head + " | chosen | KB |" + (" drop alone |" if alone else ""),
              "|---|---|" + "---|---|---|" * len(dsts) + "---|---|" + ("---|" if alone else "")]
    for r in m["per_layer"]:
        cells = " | ".join(f"{r[f'omega_{d}']:.3g} | {r[f'context_{d}']:.3g} | {r[f'score_{d}']:.3g}" for d in dsts)
        lines.append(f"| {r['layer']} | {r['trace']:.4g} ± {r['trace_stderr']:.2g} | {cells} | {r['precision']} | "
                     f"{r['bytes'] / 1e3:.1f} |" + (f" {r['drop_alone']:+.3f} |" if alone else ""))
    return lines


def plot_mixed(report: dict, path: Path) -> None:
    """The bisection trajectory: drop and size per probe, with the budget band."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    m = _mixed(report)
    traj = m["trajectory"]
    steps = list(range(1, len(traj) + 1))
    fig, ax = plt.subplots(figsize=(6.4, 4), dpi=120)
    ax.axhspan(*m["budget_points"], color="tab:green", alpha=0.15, label="budget (drop range)")
    ax.plot(steps, [r["drop"] for r in traj], "o-", color="tab:red", label="measured drop")
    for x, r in zip(steps, traj):
        ax.annotate(f"k={r['k']}", (x, r["drop"]), textcoords="offset points", xytext=(4, 6), fontsize=7)
    ax.set_xlabel("probe (bisection step)")
    ax.set_ylabel(f"drop of {m['metric'].split(' ')[0]} (points)")
    ax2 = ax.twinx()
    ax2.plot(steps, [r["bytes"] / 1e6 for r in traj], "s--", color="tab:blue", label="model MB")
    ax2.set_ylabel("model size (MB)")
    lines = ax.get_legend_handles_labels()
    more = ax2.get_legend_handles_labels()
    ax.legend(lines[0] + more[0], lines[1] + more[1], fontsize=7, loc="best")
    ax.set_title(f"quant.mixed search ({m['ordering']} ordering): {m['moves_applied']}/{m['moves_total']} moves", fontsize=10)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def plot(report: dict, path: Path) -> None:
    """Accuracy vs p50 latency at the first shape; marker area proportional to the model size."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ev = next((e for e in report["eval"] if e["name"] != "fidelity"), report["eval"][0] if report["eval"] else None)
    fig, ax = plt.subplots(figsize=(6, 4.2), dpi=120)
    points = [("original fp32", report["baseline_latency"][0]["p50_ms"], ev["original"] if ev else 0,
               report["baseline_artifact"]["bytes"], "tab:gray"),
              (f"compressed ({report['recipe']['name']})", report["latency"][0]["p50_ms"], ev["compressed"] if ev else 0,
               report["artifact"]["bytes"], "tab:blue")]
    biggest = max(p[3] for p in points)
    for label, x, y, size, color in points:
        ax.scatter([x], [y], s=900 * size / biggest, color=color, alpha=0.6, edgecolors="black")
        ax.annotate(f"{label}\n{size / 1e6:.1f} MB", (x, y), textcoords="offset points", xytext=(10, 10), fontsize=8)
    shape = report["latency"][0]
    ax.set_xlabel(f"p50 latency, batch {shape['batch']} x seq {shape['seq']} (ms, measured, ORT CPU)")
    short = {"fidelity": "fidelity (mean cosine to original)", "stsb": "STS-B Spearman x100", "accuracy": "accuracy %"}
    ax.set_ylabel(short.get(ev["name"].split(":")[0], ev["metric"]) if ev else "metric")
    ax.set_title(f"{report['model']['name']} on {report['target']['name']}: accuracy vs latency", fontsize=10)
    xs = [p[1] for p in points]
    ax.set_xlim(0, max(xs) * 1.35)
    ys = [p[2] for p in points]
    pad = max(abs(ys[0] - ys[1]), abs(ys[0]) * 0.01, 1e-3)
    ax.set_ylim(min(ys) - 2 * pad, max(ys) + 2 * pad)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def write_report(report: dict, folder: Path) -> None:
    (folder / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    (folder / "report.md").write_text(markdown(report))
    plot(report, folder / "plot.png")
    if _mixed(report):
        plot_mixed(report, folder / "mixed_search.png")
