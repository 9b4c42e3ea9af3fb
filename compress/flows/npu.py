"""``compress run`` / ``compress profile`` for the NPU back-ends nothing here can time:

- ``npu-qnn-htp`` (runtimes/qnn.py): static shapes -> QDQ for the HTP -> compile on the HTP simulator with CPU
  fallback disabled -> per-op placement (or the blockers and their fixes) -> EPContext model; accuracy on the NPU
  numerics path; latency from the roofline, labelled analytic (never the simulator's cycles).
- ``npu-ethos-u55`` / ``-u65`` (runtimes/vela.py, export/tflite_export.py): torch -> integer TFLite (litert-torch,
  ai-edge-quantizer) ->
  Vela with explicit configs -> per-layer cycles and NPU/CPU placement; latency labelled vendor_model.

The recipe's torch-level stages (pruning, ...) apply first; its ONNX-level stages do not, because each target
quantizes with its own vendor's tool (the report says which were skipped).
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import onnx

from compress.core import Progress, silent
from compress.core.data import calibration_and_heldout, shipped_sentences
from compress.core.errors import CompressError
from compress.core.evaluate import evaluate
from compress.core.kinds import ENCODER_GRAPH, ModelKind, encoder_graph
from compress.core.models import torch_outputs
from compress.core.numerics import row_cosine
from compress.core.onnx_ops import QUANTIZED_OPS
from compress.flows.types import ProfileRequest, ProfileResult
from compress.report import markdown_head, versions
from compress.steps import (
    Run,
    apply_torch_stages,
    check_inputs,
    estimate_row,
    gated_export,
    load_inputs,
    target_section,
)
from export import tflite_export
from export.onnx_export import copy_app_files
from profiles import DeviceProfile, missing_requirements
from runtimes import qnn, vela
from runtimes.encode import ort_outputs
from runtimes.host import host_info
from runtimes.mobile import mobile_coverage
from runtimes.ort import cpu_session

BACKENDS = {"onnxruntime-qnn": "qnn", "vela": "vela"}
SIM_SAMPLES = 8  # held-out sentences run through the HTP simulator (~5-15 s each at 1x128 on one core)


def backend(profile) -> str | None:
    return BACKENDS.get(profile.runtime)


def status(profile) -> tuple[str, str] | None:
    """("simulated" | "vendor model" | "estimate only", why) for an NPU back-end profile; None for other profiles."""
    kind = backend(profile)
    if kind is None:
        return None
    missing = missing_requirements(profile)
    extra = "qnn" if kind == "qnn" else "ethos"
    if missing:
        return "estimate only", f'needs {", ".join(missing)}: pip install "edge-compress[{extra}]"'
    if kind == "qnn":
        return "simulated", "HTP simulator (onnxruntime-qnn): op placement, NPU numerics, EPContext; latency analytic"
    return "vendor model", "Vela performance model (ethos-u-vela): per-layer cycles, NPU/CPU placement"


def require(profile) -> None:
    """Fail before any heavy work when the target's extra is missing (one line naming it)."""
    kind = backend(profile)
    if kind == "qnn":
        qnn.require_qnn()
    elif kind == "vela":
        vela.require_vela()
        tflite_export.require_litert()
        vela.VelaConfig.from_profile(profile)


# --- compress run ---------------------------------------------------------------------------------------


class NpuFlow:
    """QNN HTP pre-flight / Ethos-U through Vela. The recipe's torch-level stages apply first; its ONNX-level stages
    do not (each target quantizes with its own vendor's tool, and the report says which were skipped)."""

    name = "npu"
    levels = ("torch",)
    formats = ("onnx",)

    def accepts(self, kind: ModelKind, profile: DeviceProfile) -> bool:
        return kind == "encoder" and backend(profile) is not None

    def strict_precisions(self, profile: DeviceProfile) -> bool:
        return True  # the vendor's quantizer picks the precision; a torch stage must not pre-empt it

    def check(self, run: Run) -> None:
        require(run.profile)
        check_inputs(run.cfg)

    def run(self, run: Run, staging: Path, work: Path, progress: Progress, on_latency) -> dict:
        cfg = run.cfg
        inputs = load_inputs(cfg, progress)
        lm, evals, calibration, heldout = inputs.lm, inputs.evals, inputs.calibration, inputs.heldout
        shape = cfg.latency.shapes[0]
        torch_stages = [s for s in run.recipe.stages if s.type.level == "torch"]
        skipped = [s.name for s in run.recipe.stages if s.type.level != "torch"]
        if skipped:
            progress(
                f"recipe {run.recipe.name}: ONNX stage(s) {', '.join(skipped)} not used: "
                f"{run.profile.name} quantizes with its own tool"
            )
        lm, stage_reports = apply_torch_stages(
            torch_stages, lm, calibration, progress, artifact_dir=staging, base_model=cfg.base, labelled=inputs.labelled
        )
        if backend(run.profile) == "qnn":
            section, results = run_qnn(lm, run.profile, calibration, heldout, evals, shape, staging, work, progress)
        else:
            section, results = run_vela(lm, run.profile, calibration, heldout, evals, shape, staging, work, progress)
        report = _report(run, lm, stage_reports, skipped, section, results)
        report["consistency"] = {  # what encoder reports measure: a static-shape artefact cannot batch texts
            "applicable": False,
            "why": f"static input shapes {shape}: every text runs alone, padded to the same length",
        }
        graph = staging / "model.onnx"
        if run.profile.mobile and graph.is_file():  # a phone: how much of it NNAPI / Core ML would take (ORT Mobile)
            progress("NNAPI / Core ML partition coverage (ORT's mobile usability checker)")
            report["mobile"] = {"coverage": mobile_coverage(graph)}
            nn = report["mobile"]["coverage"]["nnapi:fixed"]
            report["findings"].append(
                f"ORT Mobile instead of the QNN EP: NNAPI would take {nn['supported_nodes']}/{nn['nodes']} nodes of "
                f"this QDQ graph at fixed shapes ({nn['partitions']} partitions; checker: {nn['suitability']})."
            )
        return report

    def summary(self, report: dict) -> str:
        return summary(report)

    def write(self, report: dict, folder: Path) -> None:
        (folder / "report.md").write_text(markdown(report))

    def profiles(self, artifact: Path, profile: DeviceProfile) -> bool:
        return backend(profile) is not None

    def profile(self, request: ProfileRequest, progress: Progress, on_latency) -> ProfileResult:
        shape = request.latency.shapes[0]
        res = profile_artifact(request.artifact, request.profile, shape.batch, shape.seq, progress=progress)
        return ProfileResult(profile_text(res).splitlines(), {"target": request.profile.name, **res})


NPU = NpuFlow()


def run_qnn(
    lm,
    profile,
    calibration,
    heldout,
    evals,
    shape,
    staging: Path,
    work: Path,
    progress: Progress,
    sim_samples: int = SIM_SAMPLES,
) -> tuple[dict, list[dict]]:

    batch, seq = shape.batch, shape.seq
    progress("exporting to ONNX (optimum) and checking it against torch")
    float_dir = work / "float"
    fp32, parity = gated_export(lm, float_dir, heldout)
    progress(f"static shapes {batch}x{seq}, QNN pre-processing (ORT qnn_preprocess_model)")
    static = work / "static.onnx"
    pre = qnn.prepare_static(fp32, static, batch, seq)
    activations = profile.option("activations", "uint16")  # uint8 loses MiniLM (benchmarks/npu_targets.py)
    progress(
        f"QDQ for the HTP: {activations} activations, uint8 weights (get_qnn_qdq_config, "
        f"{len(calibration)} calibration sentences)"
    )
    inputs = [i.name for i in cpu_session(static, 1).get_inputs()]
    qdq = staging / "model.onnx"
    quant = qnn.quantize_qdq(static, qdq, qnn.static_feeds(lm.tokenizer, calibration, inputs, batch, seq), activations)
    copy_app_files(float_dir, staging)

    progress("partitioning on the HTP simulator (verbose ORT log: which node goes where)")
    placement = qnn.partition(qdq, profile, work)
    blockers = qnn.blockers(placement)
    progress("compiling on the HTP simulator with CPU fallback disabled, writing the EPContext model")
    ctx = staging / "model_ctx.onnx"
    error = qnn.compile_context(qdq, profile, ctx)
    compiled = error is None and ctx.is_file()
    if not compiled:
        for f in staging.glob("model_ctx*"):
            f.unlink()

    sess_fp32, sess_qdq = cpu_session(fp32, 1), cpu_session(qdq, 1)
    original = lambda t: ort_outputs(sess_fp32, lm.tokenizer, t, lm.task, seq)
    emulated = lambda t: qnn.static_outputs(sess_qdq, lm.tokenizer, t, lm.task, batch, seq)
    results = []
    for spec in evals:
        progress(f"evaluating {spec}: QDQ model on the CPU EP (emulates the NPU's integer numerics)")
        results.append(dict(evaluate(spec, original, emulated, heldout), path="qdq-cpu-emulation"))
    simulator = None
    if compiled:
        sample = heldout[:sim_samples]
        progress(f"running {len(sample)} held-out sentences through the HTP simulator (EPContext model; slow)")
        t0 = time.perf_counter()
        sim = qnn.static_outputs(qnn.htp_session(ctx, profile), lm.tokenizer, sample, lm.task, batch, seq)
        ref, emu = original(sample), emulated(sample)
        cos, agree = row_cosine(ref, sim), row_cosine(emu, sim)
        simulator = {
            "samples": len(sample),
            "fidelity_mean": round(float(cos.mean()), 6),
            "fidelity_min": round(float(cos.min()), 6),
            "cpu_emulation_fidelity_mean": round(float(row_cosine(ref, emu).mean()), 6),
            "agreement_with_cpu_emulation_mean": round(float(agree.mean()), 6),
            "agreement_with_cpu_emulation_min": round(float(agree.min()), 6),
            "seconds_per_sample": round((time.perf_counter() - t0) / len(sample), 2),
            "metric": "mean cosine of the task output to the fp32 export (held-out shipped sentences)",
        }

    progress("roofline latency for the target (analytic)")
    # On the static float graph that was quantized, every tensor counted as int8: the roofline's shape
    # inference does not get through the uint16 QDQ graph (ORT's com.microsoft Q/DQ).
    latency = estimate_row(static, profile, batch, seq, "int8")
    if "caveats" in latency:
        latency["caveats"] = [
            "the HTP simulator's cycle counts are not used: they vary run to run and are far off the hardware",
            f"{activations} activations counted as int8 (1 byte, the int8 rate): optimistic where they are 16-bit",
            *(c for c in latency["caveats"] if not c.startswith("op coverage is not checked")),
            f"op coverage checked on the HTP simulator: {len(placement.cpu_nodes)} fallback node(s); "
            "the roofline times every node as if on the NPU",
        ]
    cpu = len(placement.cpu_nodes)
    section = {
        "backend": "qnn",
        "tool": qnn.qnn_version(),
        "options": {
            "backend": profile.option("backend", "htp"),
            "htp_arch": profile.option("htp_arch"),
            "soc_model": profile.option("soc_model"),
            "disable_cpu_ep_fallback": True,
        },
        "static_shape": {"batch": batch, "seq": seq},
        "preprocess": {k: v for k, v in pre.items() if k != "ops"},
        "quantization": quant,
        "fallback_nodes": cpu,
        "npu_partitions": placement.partitions.get(qnn.EP_NAME, 0),
        "compiled_wholly_on_npu": compiled and cpu == 0,
        "compile_error": error,
        "ops": qnn.op_table(qdq, placement),
        "blockers": blockers,
        "epcontext": {"model": ctx.name, "files": sorted(f.name for f in staging.glob("model_ctx*"))}
        if compiled
        else None,
        "simulator": simulator,
        "latency": [latency],
        "parity_float_export": parity.as_dict(),
    }
    return section, results


def run_vela(
    lm, profile, calibration, heldout, evals, shape, staging: Path, work: Path, progress: Progress
) -> tuple[dict, list[dict]]:

    batch, seq = shape.batch, shape.seq
    config = vela.VelaConfig.from_profile(profile)
    activations = profile.option("activations", "int16")
    tflite = staging / "model_int.tflite"
    conversion = tflite_export.export_int_tflite(lm, tflite, calibration, batch, seq, activations, progress)
    original = lambda t: torch_outputs(lm, t)
    converted = lambda t: tflite_export.tflite_outputs(tflite, lm, t, batch, seq)
    results = []
    for spec in evals:
        progress(f"evaluating {spec}: {activations}x8 TFLite in the LiteRT interpreter (CPU) vs the torch model")
        results.append(dict(evaluate(spec, original, converted, heldout), path=f"tflite-{activations}x8-litert"))
    progress(f"Vela: {config.accelerator_config}, {config.system_config}, {config.memory_mode}")
    res = vela.compile_tflite(tflite, staging / "vela", config)
    section = {"backend": "vela", "tool": res.tool, "conversion": conversion, **vela.report(res, batch, seq)}
    section["latency"] = [section["latency"]]
    return section, results


# --- the report -----------------------------------------------------------------------------------------


def _report(run: Run, lm, stage_reports, skipped, section, results) -> dict:
    report = {
        "model": {"name": lm.name, "path": str(lm.path), "architecture": getattr(lm.config, "model_type", "")},
        "task": lm.task,
        "target": target_section(run.profile, description=True),
        "recipe": run.recipe.as_dict(),
        "stages": stage_reports,
        "onnx_stages_not_used": skipped,
        "npu": section,
        "eval": results,
        "host": host_info().as_dict(),
        "versions": versions(extras=True),
    }
    report["findings"] = findings(report)
    return report


def findings(report: dict) -> list[str]:
    n = report["npu"]
    out = []
    if n["backend"] == "qnn":
        if n["compiled_wholly_on_npu"]:
            out.append(
                f"Compiles wholly onto the HTP simulator ({n['tool']}): 0 fallback nodes with CPU fallback "
                f"disabled; EPContext model {n['epcontext']['model']} written."
            )
        else:
            ops = sorted({b["op_type"] for b in n["blockers"]})
            out.append(
                f"Does not run wholly on the HTP: {n['fallback_nodes']} node(s) would fall back to the CPU "
                f"({', '.join(ops) or 'see compile_error'}); blockers and fixes in the report."
            )
        s = n.get("simulator")
        if s:
            out.append(
                f"NPU numerics (HTP simulator, {s['samples']} held-out sentences): mean cosine to fp32 "
                f"{s['fidelity_mean']:.4f} (CPU QDQ emulation {s['cpu_emulation_fidelity_mean']:.4f}; "
                f"simulator vs emulation {s['agreement_with_cpu_emulation_mean']:.4f})."
            )
    else:
        o = n["operators"]
        out.append(
            f"Vela ({n['tool']}): {n['cycles_npu']:,} NPU cycles, {n['cycles_total']:,} total; "
            f"{o['npu']} of {o['total']} operators on the NPU, {o['cpu']} on the CPU (not in the cycles)."
        )
    for e in report["eval"]:
        delta = f" (delta {e['delta']:+.3f})" if "delta" in e else ""
        out.append(f"{e['name']} on {e['path']}: {e['compressed']} vs original {e['original']}{delta}.")
    for lat in n["latency"]:
        if "p50_ms" in lat:
            out.append(f"Latency {lat['batch']}x{lat['seq']}: {lat['p50_ms']:.2f} ms [{lat['source']}, {lat['tool']}].")
    return out


def summary(report: dict) -> str:
    n = report["npu"]
    lines = [f"{report['model']['name']} -> {report['target']['name']} ({n['tool']})"]
    lines += [f"  {f}" for f in report["findings"]]
    if n["backend"] == "qnn" and n["blockers"]:
        lines.append("  blockers:")
        lines += [f"    {b['op_type']} {b['node']}: {b['reason']} -> fix: {b['fix']}" for b in n["blockers"][:20]]
    if n["backend"] == "vela":
        top = sorted(n["layers"], key=lambda r: -r["cycles"])[:8]
        lines.append("  top layers by cycles [vendor_model]:")
        lines += [f"    {r['cycles']:>10,}  {r['target']}  {r['op']:<16} {r['name'][-70:]}" for r in top]
        lines += [f"  CPU: {b['count']} x {b['op']}: {b['reason']} -> {b['fix']}" for b in n["cpu_blockers"][:6]]
    return "\n".join(lines)


def markdown(report: dict) -> str:
    n = report["npu"]
    lines = markdown_head(
        f"NPU report: {report['model']['name']} -> {report['target']['name']}",
        f"{report['target']['description']} Tool: {n['tool']}.",
        report["findings"],
    )
    if report["onnx_stages_not_used"]:
        lines += [
            "",
            f"Recipe `{report['recipe']['name']}`: ONNX stage(s) {', '.join(report['onnx_stages_not_used'])} "
            "not used (the target quantizes with its own tool).",
        ]
    lines += ["", "## Latency", "", "| shape | p50 ms | source | tool |", "|---|---|---|---|"]
    for lat in n["latency"]:
        lines.append(
            f"| {lat['batch']}x{lat['seq']} | {lat.get('p50_ms', float('nan')):.2f} | {lat['source']} | "
            f"{lat.get('tool', '')} |"
        )
    lines += [""] + [f"- {c}" for c in n["latency"][0].get("caveats", [])]
    lines += ["", "## Accuracy", "", "| eval | path | original | on target | delta |", "|---|---|---|---|---|"]
    for e in report["eval"]:
        lines.append(f"| {e['name']} | {e['path']} | {e['original']} | {e['compressed']} | {e.get('delta', '')} |")
    if n["backend"] == "qnn":
        if n.get("simulator"):
            s = n["simulator"]
            lines += [
                "",
                f"HTP simulator on {s['samples']} held-out sentences: mean cosine to fp32 {s['fidelity_mean']} "
                f"(min {s['fidelity_min']}); agreement with the CPU QDQ emulation {s['agreement_with_cpu_emulation_mean']}.",
            ]
        lines += [
            "",
            "## Placement (QDQ graph, ops by type)",
            "",
            "On NPU: validated by the QNN EP (Q/DQ pairs fuse into their ops); folded: removed by ORT before "
            "partitioning (shape arithmetic on static shapes, constants). ORT duplicates shared DequantizeLinear nodes "
            "before partitioning, so their NPU count can exceed the graph's.",
            "",
            "| op | nodes | on NPU | fall back | folded |",
            "|---|---|---|---|---|",
        ]
        lines += [f"| {o['op_type']} | {o['nodes']} | {o['npu']} | {o['cpu']} | {o['folded']} |" for o in n["ops"]]
        if n["blockers"]:
            lines += ["", "## Blockers", "", "| op | node | reason | fix |", "|---|---|---|---|"]
            lines += [f"| {b['op_type']} | {b['node']} | {b['reason']} | {b['fix']} |" for b in n["blockers"]]
    else:
        lines += [
            "",
            "## Vela per layer",
            "",
            f"Command: `{n['command']}`",
            "",
            "| layer | op | target | cycles | MACs |",
            "|---|---|---|---|---|",
        ]
        lines += [
            f"| {r['name'][-60:]} | {r['op']} | {r['target']} | {r['cycles']} | {r['macs']} |" for r in n["layers"]
        ]
    lines += ["", "Versions: " + ", ".join(f"{k} {v}" for k, v in report["versions"].items()), ""]
    return "\n".join(lines)


# --- compress profile -----------------------------------------------------------------------------------


def profile_artifact(path: Path, profile, batch: int, seq: int, progress: Progress = silent) -> dict:
    """Pre-flight an existing artefact: QNN on an .onnx (fp32 is made static + QDQ first; calibration on the
    shipped sentences needs the tokenizer beside it), Vela on an integer .tflite."""
    require(profile)
    if backend(profile) == "vela":
        if path.is_dir():
            path = path / "model_int.tflite"
        if path.suffix != ".tflite" or not path.is_file():
            raise CompressError(
                f"{path}: the Ethos-U target compiles an integer .tflite: pass one, or an artefact folder "
                "from `compress run MODEL --target npu-ethos-u55`"
            )
        with tempfile.TemporaryDirectory(prefix="vela-") as tmp:
            res = vela.compile_tflite(path, Path(tmp), vela.VelaConfig.from_profile(profile))
        return {"backend": "vela", "tool": res.tool, **vela.report(res, batch, seq)}
    return _profile_qnn(path, profile, batch, seq, progress)


def _profile_qnn(path: Path, profile, batch: int, seq: int, progress: Progress) -> dict:

    folder = path if path.is_dir() else path.parent
    model = encoder_graph(path) if path.is_dir() else path
    if not model.is_file():
        raise CompressError(
            f"{model} not found: pass an artefact folder holding {ENCODER_GRAPH} (or model.onnx), or an .onnx file"
        )
    graph = onnx.load(str(model), load_external_data=False).graph
    quantized = any(n.op_type in QUANTIZED_OPS for n in graph.node)
    static = all(d.HasField("dim_value") for i in graph.input for d in i.type.tensor_type.shape.dim)
    with tempfile.TemporaryDirectory(prefix="qnn-") as tmp:
        work = Path(tmp)
        qdq = model
        if quantized and not static:  # someone else's quantization: only the shapes are fixed
            progress(f"static {batch}x{seq} (the graph is quantized already: checked as it is)")
            qdq = work / "static.onnx"
            qnn.prepare_static(model, qdq, batch, seq)
        elif not quantized:
            from transformers import AutoTokenizer

            try:
                tok = AutoTokenizer.from_pretrained(str(folder))
            except Exception:
                raise CompressError(
                    f"{folder} has no tokenizer to calibrate with: pass an artefact folder from compress run"
                ) from None
            activations = profile.option("activations", "uint16")
            progress(f"static {batch}x{seq} + QDQ ({activations} activations, uint8 weights)")
            qnn.prepare_static(model, work / "static.onnx", batch, seq)
            calibration, _ = calibration_and_heldout(shipped_sentences())
            names = [i.name for i in cpu_session(work / "static.onnx", 1).get_inputs()]
            qdq = work / "qdq.onnx"
            qnn.quantize_qdq(
                work / "static.onnx", qdq, qnn.static_feeds(tok, calibration, names, batch, seq), activations
            )
        progress("partitioning and compiling on the HTP simulator (CPU fallback disabled)")
        placement = qnn.partition(qdq, profile, work)
        error = qnn.compile_context(qdq, profile, work / "ctx.onnx")
        ops = qnn.op_table(qdq, placement)
    return {
        "backend": "qnn",
        "tool": qnn.qnn_version(),
        "fallback_nodes": len(placement.cpu_nodes),
        "compiled_wholly_on_npu": error is None and not placement.cpu_nodes,
        "compile_error": error,
        "blockers": qnn.blockers(placement),
        "ops": ops,
        "quantized_here": not quantized,
    }


def profile_text(res: dict) -> str:
    if res["backend"] == "vela":
        lat, o = res["latency"], res["operators"]
        lines = [
            f"Vela ({res['tool']}): {lat['p50_ms']:.3f} ms [{lat['source']}], {res['cycles_npu']:,} NPU cycles, "
            f"{res['cycles_total']:,} total; {o['npu']}/{o['total']} operators on the NPU"
        ]
        lines += [f"  {c}" for c in lat["caveats"]]
        return "\n".join(lines)
    head = (
        "compiles wholly onto the HTP simulator (0 fallback nodes)"
        if res["compiled_wholly_on_npu"]
        else f"does NOT compile wholly onto the HTP: {res['fallback_nodes']} fallback node(s); {res['compile_error'] or ''}"
    )
    lines = [f"QNN HTP ({res['tool']}): {head}"]
    lines += [f"  {b['op_type']} {b['node']}: {b['reason']} -> fix: {b['fix']}" for b in res["blockers"][:30]]
    return "\n".join(lines)
