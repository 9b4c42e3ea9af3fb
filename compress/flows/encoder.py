"""The encoder flow: sentence-embedding, feature-extraction and classification models on the CPU or a GPU.

load -> export (+ parity gate) -> torch stages -> export of the compressed model (+ gate) -> int4 packing ->
ONNX stages -> artefact + parity record -> evaluate -> measure (CPU interleaved, or every GPU variant side by
side: compress.gpu) -> roofline beside the measurement -> report.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

from compress import gpu
from compress.card import consistency_sentence, encoder_card, mobile_table, source_card
from compress.core import Progress
from compress.core.errors import CompressError
from compress.core.evaluate import evaluate
from compress.core.fs import file_bytes
from compress.core.kinds import ENCODER_GRAPH, ModelKind, artifact_kind
from compress.core.models import hub_id, torch_outputs
from compress.flows.types import ProfileRequest, ProfileResult
from compress.report import markdown_head, sha256, versions, zipped_bytes
from compress.stages import REGISTRY
from compress.steps import (
    Run,
    apply_onnx_stages,
    apply_torch_stages,
    check_inputs,
    estimate_row,
    gated_export,
    load_inputs,
    onnx_context,
    onnx_file,
    pack_int4_layers,
    target_section,
    tokenized_batches,
)
from export.layout import graph_io, pooling, write_encoder_layout
from export.verify import FLOAT_COSINE_MIN, compare, verify_against_torch
from profiles import DeviceProfile
from runtimes.consistency import batch_consistency
from runtimes.encode import ort_outputs
from runtimes.host import host_info
from runtimes.mobile import convert_to_ort, mobile_coverage
from runtimes.ort import cpu_session
from runtimes.profiler import measure_latency, op_breakdown

MEASURED_KINDS = ("cpu", "gpu")


class EncoderFlow:
    name = "encoder"
    levels = ("torch", "onnx")
    formats = ("onnx", "ort")

    def accepts(self, kind: ModelKind, profile: DeviceProfile) -> bool:
        return kind == "encoder" and profile.kind in MEASURED_KINDS

    def strict_precisions(self, profile: DeviceProfile) -> bool:
        # On a GPU, the CPU recipes' kernels (dynamic int8, int4) still run and are measured with a caveat saying they
        # are not GPU int8 paths (compress.gpu.artifact_precision); a CPU profile lists what that CPU runs.
        return profile.kind != "gpu"

    def check(self, run: Run) -> None:
        check_inputs(run.cfg)

    def run(self, run: Run, staging: Path, work: Path, progress: Progress, on_latency) -> dict:
        """Compress, export, verify, evaluate and measure one encoder; the artefact lands in ``staging``."""
        cfg = run.cfg
        inputs = load_inputs(cfg, progress)
        lm, evals, calibration, heldout = inputs.lm, inputs.evals, inputs.calibration, inputs.heldout
        torch_stages = [s for s in run.recipe.stages if s.type.level == "torch"]
        onnx_stages = [s for s in run.recipe.stages if s.type.level == "onnx"]
        stage_reports = []

        progress("exporting the original model to ONNX (optimum)")
        reference = torch_outputs(lm, heldout)
        baseline_dir = work / "original"
        baseline, parity_original = gated_export(lm, baseline_dir, heldout, reference)

        lm, reports = apply_torch_stages(
            torch_stages, lm, calibration, progress, artifact_dir=staging, base_model=cfg.base, labelled=inputs.labelled
        )
        stage_reports += reports
        current, float_dir, parity_float = baseline, baseline_dir, parity_original
        if torch_stages:
            progress("exporting the compressed model to ONNX")
            float_dir = work / "compressed-float"
            current, parity_float = gated_export(
                lm, float_dir, heldout, what="the float export of the compressed model"
            )
        if lm.int4_layers:
            progress(f"packing {len(lm.int4_layers)} int4 layers into MatMulNBits")
            current, report = pack_int4_layers(lm, current, work)
            stage_reports.append(report)

        ctx = None
        if onnx_stages:
            ctx = onnx_context(onnx_stages, lm, calibration, run.profile, evals[0] if evals else None, progress)
        current, reports = apply_onnx_stages(onnx_stages, current, work, ctx, progress)
        stage_reports += reports

        progress(f"writing the artefact ({ENCODER_GRAPH} + what every consumer reads) and checking it against torch")
        layout = write_encoder_layout(
            current, float_dir, lm.path, staging, lm.task == "sentence-embedding", lm.max_length
        )
        artifact = staging / ENCODER_GRAPH
        exact = not onnx_stages and not lm.int4_layers  # a float artefact is held to the float gate
        parity_final = verify_against_torch(
            lm,
            artifact,
            heldout,
            FLOAT_COSINE_MIN if exact else None,
            reference=reference if not torch_stages else None,
        )

        sess_orig, sess_comp = cpu_session(baseline, 0), cpu_session(artifact, 0)
        results = []
        for spec in evals:
            progress(f"evaluating {spec}")
            results.append(
                evaluate(
                    spec,
                    lambda t: ort_outputs(sess_orig, lm.tokenizer, t, lm.task, lm.max_length),
                    lambda t: ort_outputs(sess_comp, lm.tokenizer, t, lm.task, lm.max_length),
                    heldout,
                )
            )

        progress(
            "consistency: each held-out sentence alone vs inside padded 32-sentence batches; ORT optimisation levels"
        )
        consistency = batch_consistency(artifact, lm.tokenizer, heldout, lm.task, lm.max_length)
        mobile = None
        if "ort" in cfg.formats:
            progress("ORT format for ORT Mobile (convert_onnx_models_to_ort) and NNAPI / Core ML coverage")
            mobile = ort_format(artifact, lm, heldout)

        load_before = os.getloadavg()
        lat, ops, gpu_section = self._measure(
            run, lm, baseline, artifact, calibration, heldout, work, progress, on_latency
        )
        load = {"before": [round(x, 2) for x in load_before], "after": [round(x, 2) for x in os.getloadavg()]}
        parity = {"original_export": parity_original.as_dict(), "artifact": parity_final.as_dict()}
        if torch_stages:
            parity["compressed_float_export"] = parity_float.as_dict()
        progress("roofline estimate for the host CPU profile (analytic, next to the measurement)")
        roofline = {
            label: [estimate_row(path, run.profile, s.batch, s.seq) for s in cfg.latency.shapes]
            for label, path in (("original", baseline), ("compressed", artifact))
        }
        report = {
            "model": {
                "name": lm.name,
                "path": str(lm.path),
                "architecture": getattr(lm.config, "model_type", ""),
                "base_model": hub_id(lm.name, lm.path),
                "source_card": source_card(lm.path),
            },
            "task": lm.task,
            "target": target_section(run.profile),
            "recipe": run.recipe.as_dict(),
            "stages": stage_reports,
            "artifact": {
                "path": ENCODER_GRAPH,
                "bytes": file_bytes(artifact),
                "bytes_zip": zipped_bytes(artifact),
                "sha256": sha256(artifact),
                "layout": layout,
            },
            "interface": {
                **graph_io(artifact),
                "max_length": lm.max_length,
                "pooling": pooling(staging),
            },
            "baseline_artifact": {
                "bytes": file_bytes(baseline),
                "note": "fp32 export of the original model (not kept)",
            },
            "parity": parity,
            "eval": results,
            "consistency": consistency,
            "latency": [dataclasses.asdict(r) for r in lat["compressed"]],
            "baseline_latency": [dataclasses.asdict(r) for r in lat["original"]],
            "ops": ops,
            "load_average": load,  # 1 / 5 / 15-minute, around the latency measurement: how busy the host was
            "roofline": roofline,
            "host": host_info().as_dict(),
            "versions": versions(),
        }
        if mobile is not None:
            report["mobile"] = mobile
        report["findings"] = findings(report)
        if gpu_section is not None:
            report["gpu"] = gpu_section
        return report

    def _measure(
        self,
        run: Run,
        lm,
        baseline: Path,
        artifact: Path,
        calibration,
        heldout,
        work: Path,
        progress: Progress,
        on_latency,
    ):
        """(latency rows, op breakdown, gpu section or None): the CPU interleaved with the original, or on a GPU
        every variant side by side."""
        cfg = run.cfg
        first = cfg.latency.shapes[0]
        if run.profile.kind == "gpu":  # CUDA / TensorRT EPs, fp32 / fp16 / int8 side by side
            lat, section = gpu.measure_run(
                cfg,
                run.profile,
                lm,
                baseline,
                artifact,
                tokenized_batches(lm, calibration),
                heldout,
                work,
                progress,
                on_latency,
            )
            ops = {"shape": str(first), "original": [], "compressed": [], "note": "CPU EP op breakdown not run for gpu"}
            return lat, ops, section
        shapes = ", ".join(str(s) for s in cfg.latency.shapes)
        progress(
            f"measuring latency on the CPU ({shapes}; {cfg.latency.runs} runs each, original and compressed "
            "interleaved)"
        )
        lat = measure_latency({"original": baseline, "compressed": artifact}, cfg.latency, on_progress=on_latency)
        progress(f"op breakdown at {first} (ORT profiler)")
        t, n, top = cfg.latency.threads, cfg.latency.op_runs, cfg.latency.top_ops
        ops = {
            "shape": str(first),
            "original": op_breakdown(baseline, first, t, n, top),
            "compressed": op_breakdown(artifact, first, t, n, top),
        }
        return lat, ops, None

    def summary(self, report: dict) -> str:
        lines = [f"{report['model']['name']} -> {report['target']['name']} with recipe {report['recipe']['name']}"]
        roof = report.get("roofline", {}).get("compressed", [])
        for i, (c, b) in enumerate(zip(report["latency"], report["baseline_latency"])):
            est = roof[i] if i < len(roof) else {}
            est_txt = f"; roofline {est['p50_ms']:.2f} ms [analytic]" if "p50_ms" in est else ""
            lines.append(
                f"  latency {c['batch']}x{c['seq']}: p50 {c['p50_ms']:.2f} ms [{c['source']}] vs original "
                f"{b['p50_ms']:.2f} ms [{b['source']}]  ratio {c['p50_ms'] / b['p50_ms']:.2f}{est_txt}"
            )
        for e in report["eval"]:
            lines.append(f"  {e['name']}: {e['compressed']} (original {e['original']})")
        lines.append(
            f"  size: {report['artifact']['bytes'] / 1e6:.1f} MB (original "
            f"{report['baseline_artifact']['bytes'] / 1e6:.1f} MB)"
        )
        if "consistency" in report:
            c = report["consistency"]
            warn = "" if c["batch_independent"] else "WARNING "
            lines.append(f"  {warn}{consistency_sentence(c)}")
        if "gpu" in report:
            lines += gpu.variant_lines(report["gpu"])
        return "\n".join(lines)

    def write(self, report: dict, folder: Path) -> None:
        (folder / "report.md").write_text(markdown(report))
        plot(report, folder / "plot.png")
        files = sorted(str(f.relative_to(folder)) for f in folder.rglob("*") if f.is_file())
        (folder / "README.md").write_text(encoder_card(report, sorted({*files, "README.md"})))
        for s in report["stages"]:
            st = REGISTRY.get(s["name"])
            if st is not None and st.plot is not None:
                st.plot(s["metrics"], folder)

    def profiles(self, artifact: Path, profile: DeviceProfile) -> bool:
        return profile.kind in MEASURED_KINDS

    def profile(self, request: ProfileRequest, progress: Progress, on_latency) -> ProfileResult:
        if request.profile.kind == "gpu":
            if artifact_kind(request.artifact) is not None:
                raise CompressError(
                    f"{request.artifact} is a generative folder: those are not measured on the gpu "
                    "target yet; use --target cpu"
                )
            res = gpu.profile_artifact(
                onnx_file(request.artifact),
                request.profile,
                request.latency.shapes,
                request.latency.runs,
                onnx_file(request.baseline) if request.baseline is not None else None,
                progress=progress,
                on_latency=on_latency,
            )
            return ProfileResult(gpu.variant_lines(res), {"target": request.profile.name, **res})
        cfg = request.latency
        models = {"artifact": onnx_file(request.artifact)}
        if request.baseline is not None:
            models["baseline"] = onnx_file(request.baseline)
        shapes = ",".join(str(s) for s in cfg.shapes)
        progress(f"measuring {', '.join(str(p) for p in models.values())} ({shapes}; {cfg.runs} runs each)")
        res = measure_latency(models, cfg, on_progress=on_latency)
        ops = op_breakdown(models["artifact"], cfg.shapes[0], cfg.threads, cfg.op_runs, cfg.top_ops)
        host = host_info()
        lines = [
            f"host: {host.summary()}",
            f"{'model':<10} {'shape':>8} {'p50 ms':>9} {'p90 ms':>9} {'p99 ms':>9} {'seq/s':>9}  source",
        ]
        for label, rows in res.items():
            for r in rows:
                lines.append(
                    f"{label:<10} {r.batch:>4}x{r.seq:<3} {r.p50_ms:>9.2f} {r.p90_ms:>9.2f} {r.p99_ms:>9.2f} "
                    f"{r.throughput_per_s:>9.1f}  {r.source} ({r.tool}, {r.threads} threads)"
                )
        lines.append(
            f"top ops at {cfg.shapes[0]} (ORT profiler): "
            + ", ".join(f"{o['op_type']} {o['ms_per_run']:.2f} ms ({o['share'] * 100:.0f}%)" for o in ops)
        )
        data = {
            "host": host.as_dict(),
            "latency": {k: [dataclasses.asdict(r) for r in v] for k, v in res.items()},
            "ops": ops,
            "models": {k: str(v) for k, v in models.items()},
        }
        return ProfileResult(lines, data)


ENCODER = EncoderFlow()


def ort_format(artifact: Path, lm, texts: list[str]) -> dict:
    """``onnx/model.ort`` beside the graph (ORT Mobile), checked to give the .onnx's outputs on held-out text, and
    the NNAPI / Core ML partition coverage of the graph from ORT's mobile usability checker."""
    ort_path = artifact.with_suffix(".ort")
    made = convert_to_ort(artifact, ort_path)
    encode = lambda p: ort_outputs(cpu_session(p, 0), lm.tokenizer, texts, lm.task, lm.max_length)
    same = compare(encode(artifact), encode(ort_path), None)
    return {
        "ort": {
            "path": str(ort_path.relative_to(artifact.parent.parent)),
            "bytes": file_bytes(ort_path),
            "sha256": sha256(ort_path),
            **made,
            "vs_onnx": {"cosine_min": same.cosine_min, "max_abs_diff": same.max_abs_diff, "samples": same.samples},
        },
        "coverage": mobile_coverage(artifact),
    }


# ---- report -------------------------------------------------------------------------------------------------


def findings(report: dict) -> list[str]:
    """Plain sentences a user can act on, derived from the measured numbers only."""
    out = []
    for comp, base in zip(report["latency"], report["baseline_latency"]):
        ratio = comp["p50_ms"] / base["p50_ms"]
        verdict = "faster" if ratio < 0.95 else "slower" if ratio > 1.05 else "no faster"
        out.append(
            f"At batch {comp['batch']} x seq {comp['seq']} the compressed model's p50 is {ratio:.2f}x the "
            f"original's ({comp['p50_ms']:.1f} vs {base['p50_ms']:.1f} ms, measured interleaved): {verdict}."
        )
    a, b = report["artifact"]["bytes"], report["baseline_artifact"]["bytes"]
    out.append(
        f"Size: {a / 1e6:.1f} MB vs {b / 1e6:.1f} MB fp32 ({a / b:.2f}x); "
        f"{report['artifact']['bytes_zip'] / 1e6:.1f} MB zipped."
    )
    for e in report["eval"]:
        if e["name"] == "fidelity":
            out.append(
                f"Fidelity: mean cosine {e['compressed']:.4f} (min {e['min']:.4f}) to the original's outputs "
                "on held-out text."
            )
        else:
            out.append(f"{e['name']}: {e['compressed']:.2f} vs {e['original']:.2f} original ({e['delta']:+.2f}).")
    if "consistency" in report:
        out.append(consistency_sentence(report["consistency"]))
    cov = report.get("mobile", {}).get("coverage", {})
    if cov:
        nn, ml = cov["nnapi:dynamic"], cov["coreml_mlprogram:dynamic"]
        out.append(
            f"ORT Mobile: NNAPI would take {nn['coverage_pct']}% of the nodes ({nn['partitions']} partitions), Core ML "
            f"(MLProgram) {ml['coverage_pct']}%, with the graph's dynamic shapes (ORT's mobile usability checker: "
            f"{nn['suitability']} / {ml['suitability']}); the rest runs on the CPU EP."
        )
    host = report["host"]
    quantized = any(s["name"].startswith("quant.") for s in report["stages"])
    if quantized and not host["has_vnni"] and report["target"]["kind"] == "cpu":
        out.append(
            "This CPU has no VNNI/AMX: int8 runs on AVX2 (vpmaddubsw) and gains less than on VNNI or AMX CPUs; "
            "re-measure on the deployment CPU."
        )
    return out


BULKY = ("per_layer", "trajectory", "order")  # per-layer tables get their own section, not a JSON dump


def markdown(report: dict) -> str:
    recipe = report["recipe"]
    lines = markdown_head(
        f"Compression report: {report['model']['name']} -> {report['target']['name']}",
        f"Recipe `{recipe['name']}` ({recipe['description']}); task {report['task']}; "
        f"host {report['host']['cpu_model']}.",
        report["findings"],
    )
    tool = report["latency"][0].get("tool") or "ONNX Runtime CPU EP" if report["latency"] else "ONNX Runtime CPU EP"
    lines += [
        "",
        f"## Latency (source: measured, {tool}, original and compressed interleaved)",
        "",
        "| shape | original p50 ms | compressed p50 ms | ratio | compressed p90 ms | p99 ms | seq/s | runs | threads |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for c, b in zip(report["latency"], report["baseline_latency"]):
        lines.append(
            f"| {c['batch']}x{c['seq']} | {b['p50_ms']:.2f} | {c['p50_ms']:.2f} | {c['p50_ms'] / b['p50_ms']:.2f} | "
            f"{c['p90_ms']:.2f} | {c['p99_ms']:.2f} | {c['throughput_per_s']:.1f} | {c['runs']} | {c['threads']} |"
        )
    lines += _roofline_section(report)
    if "gpu" in report:  # every GPU variant side by side
        lines += gpu.markdown_lines(report["gpu"])
    lines += ["", "## Accuracy", "", "| eval | metric | original | compressed |", "|---|---|---|---|"]
    for e in report["eval"]:
        lines.append(f"| {e['name']} | {e['metric']} | {e['original']} | {e['compressed']} |")
    if "consistency" in report:
        c = report["consistency"]
        lines += [
            "",
            "## Consistency (measured: the same text alone vs in a batch, and across ORT optimisation levels)",
            "",
            "| check | min cosine | mean cosine | max abs diff |",
            "|---|---|---|---|",
        ]
        for pad, st in c["alone_vs_batch"]["padding"].items():
            lines.append(
                f"| alone vs inside {c['batch']}-sentence batches padded to the {pad.replace('_', ' ')} | {st['min']:.6f} | "
                f"{st['mean']:.6f} | {st['max_abs_diff']:.3g} |"
            )
        lv = c["optimization_levels"]
        lines.append(
            f"| ORT_DISABLE_ALL vs ORT_ENABLE_ALL, each sentence alone | {lv['min']:.6f} | {lv['mean']:.6f} | "
            f"{lv['max_abs_diff']:.3g} |"
        )
        lines += ["", consistency_sentence(c)]
    if "mobile" in report:
        m = report["mobile"]
        lines += ["", "## ORT Mobile", ""]
        if "ort" in m:
            o = m["ort"]
            lines += [
                f"`{o['path']}`: {o['bytes']:,} bytes, {o['optimization_style']} optimisations for {o['target_platform']}; "
                f"outputs vs the .onnx: min cosine {o['vs_onnx']['cosine_min']:.6f}, max abs diff "
                f"{o['vs_onnx']['max_abs_diff']:.3g} ({o['vs_onnx']['samples']} held-out sentences).",
                "",
            ]
        lines += mobile_table(m["coverage"])
    lines += [
        "",
        "## Parity against torch",
        "",
        "| check | min cosine | mean cosine | max abs diff | gate |",
        "|---|---|---|---|---|",
    ]
    for name, p in report["parity"].items():
        gate = "recorded" if p["threshold"] is None else f"{'pass' if p['passed'] else 'FAIL'} (>= {p['threshold']})"
        lines.append(f"| {name} | {p['cosine_min']:.6f} | {p['cosine_mean']:.6f} | {p['max_abs_diff']:.3g} | {gate} |")
    for s in report["stages"]:  # a stage's own section (e.g. quant.mixed's search), from its registry entry
        st = REGISTRY.get(s["name"])
        if st is not None and st.report is not None:
            lines += st.report(s["metrics"])
    lines += ["", "## Stages", "", "| stage | seconds | metrics |", "|---|---|---|"]
    for s in report["stages"]:
        brief = {k: v for k, v in s["metrics"].items() if k not in BULKY}
        lines.append(f"| {s['name']} | {s['seconds']} | `{json.dumps(brief)}` |")
    if not report["stages"]:
        lines.append("| (none) | | |")
    ops = report["ops"]
    if ops["original"] or ops["compressed"]:  # none on the gpu target (no CPU EP breakdown there)
        lines += [
            "",
            f"## Top ops at {ops['shape']} (ORT profiler, ms per run)",
            "",
            "| model | op | ms | share |",
            "|---|---|---|---|",
        ]
    for which in ("original", "compressed"):
        for o in ops[which]:
            lines.append(f"| {which} | {o['op_type']} | {o['ms_per_run']:.2f} | {o['share'] * 100:.1f}% |")
    a = report["artifact"]
    lines += [
        "",
        "## Artefact",
        "",
        f"`{a['path']}`: {a['bytes']:,} bytes ({a['bytes_zip']:,} zipped), sha256 "
        f"`{a['sha256']}` (fp32 original: {report['baseline_artifact']['bytes']:,} bytes).",
        "",
        "Versions: " + ", ".join(f"{k} {v}" for k, v in report["versions"].items()),
        "",
    ]
    return "\n".join(lines)


def _roofline_section(report: dict) -> list[str]:
    roof = report.get("roofline", {})
    if not roof:
        return []
    where = "this CPU" if report["target"]["kind"] == "cpu" else report["target"]["name"]
    lines = [
        "",
        f"## Roofline estimate vs measurement (how far the estimator is from reality on {where})",
        "",
        "| shape | model | measured p50 ms | roofline ms (analytic) | estimate / measured |",
        "|---|---|---|---|---|",
    ]
    for label, measured in (("original", report["baseline_latency"]), ("compressed", report["latency"])):
        for m, e in zip(measured, roof.get(label, [])):
            est = f"{e['p50_ms']:.2f}" if "p50_ms" in e else f"n/a ({e.get('error', '')})"
            ratio = f"{e['p50_ms'] / m['p50_ms']:.2f}" if "p50_ms" in e else ""
            lines.append(f"| {m['batch']}x{m['seq']} | {label} | {m['p50_ms']:.2f} | {est} | {ratio} |")
    first = next((e for rows in roof.values() for e in rows if "caveats" in e), None)
    if first:
        lines += [""] + [f"- {c}" for c in first["caveats"]]
    return lines


def plot(report: dict, path: Path) -> None:
    """Accuracy vs p50 latency at the first shape; marker area proportional to the model size."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ev = next((e for e in report["eval"] if e["name"] != "fidelity"), report["eval"][0] if report["eval"] else None)
    fig, ax = plt.subplots(figsize=(6, 4.2), dpi=120)
    points = [
        (
            "original fp32",
            report["baseline_latency"][0]["p50_ms"],
            ev["original"] if ev else 0,
            report["baseline_artifact"]["bytes"],
            "tab:gray",
        ),
        (
            f"compressed ({report['recipe']['name']})",
            report["latency"][0]["p50_ms"],
            ev["compressed"] if ev else 0,
            report["artifact"]["bytes"],
            "tab:blue",
        ),
    ]
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
