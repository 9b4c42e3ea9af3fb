"""``compress run`` / ``compress profile`` on the ``gpu`` target: measured on a CUDA device (runtimes/gpu.py).

The run times the compressed artefact side by side with variants of the original: fp32, fp16
(``convert_float_to_float16``) and int8 QDQ (the quant.static stage, symmetric int8 for TensorRT), on the CUDA EP
and, where onnxruntime-gpu has it, the TensorRT EP (2:4 sparse tensor cores on when the artefact is 2:4). It also
runs held-out text through every variant on the device and compares the outputs with the fp32 CPU export, so a
variant that is fast because it is broken shows it. Without a usable CUDA device nothing here runs: the target is
refused (compress.pipeline.resolve_target) and ``compress profile --estimate`` gives the roofline instead.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import onnx

from compress.core import Progress, silent
from compress.core.numerics import row_cosine
from compress.core.onnx_ops import DYNAMIC_OPS, op_counts
from compress.stages.base import OnnxContext
from compress.stages.quant import StaticQuant, apply_static
from runtimes import gpu as rgpu  # attribute access: tests stand the CPU EP in for a device
from runtimes.encode import ort_outputs
from runtimes.host import host_info
from runtimes.ort import cpu_session, input_names

FIDELITY_SAMPLES = 64  # held-out sentences run through every variant on the device


def status() -> tuple[str, str]:
    """("measured", on what) when a CUDA session really runs on the device; else ("estimate only", why)."""

    why = rgpu.cuda_usable()
    if why is not None:
        return "estimate only", why
    return "measured", f"ONNX Runtime {', '.join(rgpu.available_eps())} on {rgpu.device_name()}"


def artifact_precision(path: Path) -> tuple[str, list[str]]:
    """The precision flags an artefact gets on TensorRT ('fp32' | 'fp16' | 'int8-qdq'), and caveats."""

    model = onnx.load(str(path), load_external_data=False)
    ops = op_counts(model)
    dynamic = sorted(op for op in ops if op in DYNAMIC_OPS)
    if dynamic:
        return "fp32", [
            f"{', '.join(dynamic)} (the CPU recipes' dynamic int8 / int4 kernels) are not TensorRT or "
            "CUDA int8 paths: those nodes may run on the CUDA EP's generic kernels or the CPU; quantize "
            "for the GPU with quant.static (QDQ)"
        ]
    if ops.get("QuantizeLinear") and ops.get("DequantizeLinear"):
        return "int8-qdq", []
    if any(i.data_type == onnx.TensorProto.FLOAT16 for i in model.graph.initializer):
        return "fp16", []
    return "fp32", []


def to_int8_qdq(
    src: Path, dst: Path, calibration: tuple[dict, ...], host=None, keep_one_sided_float: bool = True
) -> dict:
    """Static int8 QDQ through the quant.static stage (compress.stages.quant.apply_static), set for TensorRT.

    TensorRT's Q/DQ are signed with zero point 0 (explicit quantization): activations are int8 and symmetric here,
    unlike the CPU stage's asymmetric uint8 default. The MatMuls fed by a GELU/ReLU stay float (fp16 under
    TensorRT): their one-sided inputs lose a bit to a symmetric range, which on MiniLM cost far more accuracy than
    the rest together (benchmarks/gpu_int8_fidelity.py). The fidelity on the device is reported beside latency."""
    ctx = OnnxContext(
        calibration=tuple(calibration), host=host or host_info(), model_type="", num_heads=0, hidden_size=0
    )
    keep = tuple(rgpu.after_one_sided_activation(src)) if keep_one_sided_float else ()
    cfg = StaticQuant(activation_type="int8", weight_type="int8", symmetric_activations=True, exclude=keep)
    return apply_static(cfg, src, dst, ctx) | {
        "activation_type": "int8",
        "weight_type": "int8",
        "symmetric_activations": True,
        "kept_float": len(keep),
    }


def variant_models(
    baseline: Path, artifact: Path, calibration: tuple[dict, ...], work: Path, progress: Progress = silent
) -> tuple[dict[str, tuple[Path, str]], dict, list[str]]:
    """{name: (path, precision)} for the compressed artefact and the original's fp32 / fp16 / int8-qdq variants."""

    precision, notes = artifact_precision(artifact)
    progress("fp16 variant of the original (onnxruntime.transformers.float16, fp32 I/O)")
    fp16 = work / "gpu-fp16.onnx"
    conversions = {"fp16": rgpu.to_fp16(baseline, fp16)}
    models = {"compressed": (artifact, precision), "fp32": (baseline, "fp32"), "fp16": (fp16, "fp16")}
    if calibration:
        progress("int8 QDQ variant of the original (quant.static: ORT quantize_static, symmetric int8)")
        int8 = work / "gpu-int8-qdq.onnx"
        metrics = to_int8_qdq(baseline, int8, calibration)
        conversions["int8-qdq"] = {k: v for k, v in metrics.items() if k != "per_layer"}
        models["int8-qdq"] = (int8, "int8-qdq")
    else:
        notes = [*notes, "int8-qdq variant not built: no calibration text"]
    return models, conversions, notes


def where(eps: list[str]) -> str:
    """The device the variants run on: the GPU's name, or the host CPU when the harness checks itself (CPU EP)."""

    return (
        rgpu.device_name()
        if any(e in rgpu.EPS for e in eps)
        else f"{host_info().cpu_model} (CPU EP: harness check, not a GPU)"
    )


def trt_caveat(eps: list[str]) -> list[str]:
    """Why there is no TensorRT column, when there is none."""

    if rgpu.TRT_EP in eps or rgpu.CUDA_EP not in eps:
        return []
    return [f"TensorRT EP not measured: {rgpu.trt_usable()}"]


def primary_ep(profile, eps: list[str]) -> tuple[str, list[str]]:
    """The profile's EP when this host has it, else the CUDA EP (with a caveat saying so)."""

    want = profile.execution_provider
    if want in eps:
        return want, []
    return rgpu.CUDA_EP, [
        f"profile {profile.name} asks for {want}, which this onnxruntime-gpu lacks: the headline "
        f"numbers are {rgpu.CUDA_EP}"
    ]


def _fidelity(variants, lm, heldout: list[str], reference, cache: Path, device_id: int = 0) -> dict[str, dict]:
    """Mean/min cosine of each variant's task output on the device to the fp32 CPU export's, on held-out text."""
    import onnxruntime as ort

    out = {}
    seq = min(128, lm.max_length)
    so = ort.SessionOptions()
    so.log_severity_level = 3
    for v in variants:
        if v.ep == rgpu.TRT_EP:
            names = input_names(ort.InferenceSession(str(v.path), sess_options=so, providers=["CPUExecutionProvider"]))
            opts = rgpu.trt_options(
                cache / f"fidelity-{v.label.replace('/', '-')}",
                precision=v.precision,
                sparsity=v.sparsity,
                device_id=device_id,
                inputs=names,
                batch=32,
                seq=seq,
                min_shape=(1, 1),
            )
        else:
            opts = rgpu.cuda_options(device_id)
        sess = ort.InferenceSession(str(v.path), sess_options=so, providers=rgpu.providers(v.ep, opts, device_id))
        got = ort_outputs(sess, lm.tokenizer, heldout, lm.task, seq)
        cos = row_cosine(reference, got)
        out[v.label] = {
            "fidelity_mean": round(float(cos.mean()), 6),
            "fidelity_min": round(float(cos.min()), 6),
            "samples": len(heldout),
        }
    return out


def measure_run(
    cfg,
    profile,
    lm,
    baseline: Path,
    artifact: Path,
    calibration: tuple[dict, ...],
    heldout: list[str],
    work: Path,
    progress: Progress,
    on_latency=None,
) -> tuple[dict, dict]:
    """The gpu target's measurement inside ``compress run``: ({"original", "compressed"} latency rows for the
    report's tables, the report's "gpu" section with every variant side by side)."""

    eps = rgpu.require_cuda()
    ep, caveats = primary_ep(profile, eps)
    caveats += trt_caveat(eps)
    runs = max(cfg.latency.runs, rgpu.MIN_RUNS)
    if runs != cfg.latency.runs:
        caveats.append(f"--runs {cfg.latency.runs} raised to {runs}: the GPU path times >= {rgpu.MIN_RUNS} runs")
    models, conversions, notes = variant_models(baseline, artifact, calibration, work, progress)
    sparse = "2:4" in profile.sparsity_patterns and rgpu.is_two_four(artifact)
    variants = rgpu.variants_for(models, eps, {"compressed": sparse})
    gcfg = rgpu.GpuConfig(runs=runs, cache_dir=work / "trt-cache")
    shapes = ", ".join(str(s) for s in cfg.latency.shapes)
    progress(
        f"measuring on {where(eps)} ({shapes}; {runs} runs each; {len(variants)} variants interleaved, "
        "IOBinding, first run excluded)"
    )
    lat = rgpu.measure_gpu(variants, cfg.latency.shapes, gcfg, work=work, on_progress=on_latency, log=progress)
    sample = heldout[:FIDELITY_SAMPLES]
    progress(f"fidelity of every variant on the device ({len(sample)} held-out sentences vs the fp32 CPU export)")
    reference = ort_outputs(cpu_session(baseline, 0), lm.tokenizer, sample, lm.task, min(128, lm.max_length))
    fidelity = _fidelity(variants, lm, sample, reference, work / "trt-cache", gcfg.device_id)
    short = {v.ep: v.label.split("/")[1] for v in variants}[ep]
    section = {
        "device": where(eps),
        "tool": rgpu.tool_label(ep),
        "eps": eps,
        "primary_ep": ep,
        "sparsity_2_4": sparse,
        "conversions": conversions,
        "caveats": caveats + notes,
        "variants": {label: [dataclasses.asdict(r) for r in rows] for label, rows in lat.items()},
        "precisions": {v.label: v.precision for v in variants},
        "fidelity": fidelity,
    }
    headline = {"original": lat[f"fp32/{short}"], "compressed": lat[f"compressed/{short}"]}
    return headline, section


def profile_artifact(
    artifact: Path,
    profile,
    shapes,
    runs: int,
    baseline: Path | None = None,
    progress: Progress = silent,
    on_latency=None,
) -> dict:
    """``compress profile ARTIFACT --target gpu``: the artefact (+ --baseline), and the artefact as fp16 when it is
    fp32, on every GPU EP this host has. No int8 variant here: it needs calibration text (``compress run`` has it)."""
    import tempfile

    eps = rgpu.require_cuda()
    precision, notes = artifact_precision(artifact)
    with tempfile.TemporaryDirectory(prefix="compress-gpu-") as tmp:
        work = Path(tmp)
        models = {"artifact": (artifact, precision)}
        if baseline is not None:
            models["baseline"] = (baseline, artifact_precision(baseline)[0])
        if precision == "fp32":
            progress("fp16 variant of the artefact (onnxruntime.transformers.float16, fp32 I/O)")
            rgpu.to_fp16(artifact, work / "fp16.onnx")
            models["artifact-fp16"] = (work / "fp16.onnx", "fp16")
        sparse = "2:4" in profile.sparsity_patterns and rgpu.is_two_four(artifact)
        variants = rgpu.variants_for(models, eps, {"artifact": sparse, "artifact-fp16": sparse})
        gcfg = rgpu.GpuConfig(runs=max(runs, rgpu.MIN_RUNS), cache_dir=work / "trt-cache")
        progress(f"measuring on {where(eps)} ({len(variants)} variants interleaved, {gcfg.runs} runs each)")
        lat = rgpu.measure_gpu(variants, shapes, gcfg, work=work, on_progress=on_latency, log=progress)
    if runs < rgpu.MIN_RUNS:
        notes = [*notes, f"--runs {runs} raised to {rgpu.MIN_RUNS}: the GPU path times >= {rgpu.MIN_RUNS} runs"]
    return {
        "device": where(eps),
        "eps": eps,
        "sparsity_2_4": sparse,
        "caveats": notes + trt_caveat(eps),
        "variants": {label: [dataclasses.asdict(r) for r in rows] for label, rows in lat.items()},
    }


def variant_lines(section: dict) -> list[str]:
    """Plain-text table of every variant: p50/p90/p99, engine build, fidelity on the device, label."""
    lines = [
        f"GPU: {section['device']} ({', '.join(section['eps'])})",
        f"  {'variant':<22} {'shape':>7} {'p50 ms':>8} {'p90 ms':>8} {'p99 ms':>8} {'build s':>8} "
        f"{'fidelity':>9}  source",
    ]
    fid = section.get("fidelity", {})
    for label, rows in section["variants"].items():
        f = fid.get(label, {}).get("fidelity_mean")
        for r in rows:
            lines.append(
                f"  {label:<22} {r['batch']:>3}x{r['seq']:<3} {r['p50_ms']:>8.3f} {r['p90_ms']:>8.3f} "
                f"{r['p99_ms']:>8.3f} {r['engine_build_s']:>8.2f} {f if f is not None else '':>9}  "
                f"{r['source']} ({r['tool']}, {r['device']})"
            )
    lines += [f"  - {c}" for c in section.get("caveats", [])]
    return lines


def markdown_lines(section: dict) -> list[str]:
    """The report.md section: every variant side by side (measured on the device)."""

    lines = [
        "",
        f"## GPU variants (source: measured on {section['device']}, interleaved, IOBinding, first run excluded)",
        "",
        "| variant | precision | shape | p50 ms | p90 ms | p99 ms | seq/s | engine build s | "
        "nodes by EP | fidelity (device vs fp32 CPU) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    fid = section.get("fidelity", {})
    for label, rows in section["variants"].items():
        f = fid.get(label, {})
        f_txt = f"{f['fidelity_mean']:.4f} (min {f['fidelity_min']:.4f})" if f else ""
        for r in rows:
            lines.append(
                f"| {label} | {r['precision']} | {r['batch']}x{r['seq']} | {r['p50_ms']:.3f} | "
                f"{r['p90_ms']:.3f} | {r['p99_ms']:.3f} | {r['throughput_per_s']:.1f} | "
                f"{r['engine_build_s']:.2f} | {rgpu.placement_text(r.get('placement', {}))} | {f_txt} |"
            )
    caveats = sorted(
        {c for rows in section["variants"].values() for r in rows for c in r["caveats"]}
        | set(section.get("caveats", []))
    )
    return lines + [""] + [f"- {c}" for c in caveats]
