"""One run, data flowing one way:
load -> torch stages -> export (+ parity) -> ONNX stages -> parity -> evaluate -> measure -> report.

Everything is written into a temporary sibling of the output folder and renamed into place at the end,
so a failed run leaves nothing half-written and an existing result is only replaced with ``force``.
"""
from __future__ import annotations

import contextlib
import os
import re
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from compress.data import calibration_and_heldout, read_texts, shipped_sentences
from compress.errors import CompressError
from compress.evaluate import EvalSpec, evaluate, parse_eval
from compress.models import LoadedModel, load_model
from compress.recipe import Recipe, StageSpec, load_recipe
from compress.stages import OnnxContext, Scorer, TorchContext
from profiles import DeviceProfile, ProfileError, load_profile
from runtimes.profiler import ProfileConfig

Progress = Callable[[str], None]


@dataclass(frozen=True)
class RunConfig:
    model: str
    target: str = "cpu"
    recipe: str = "cpu-default"
    out: Path | None = None
    evals: tuple[str, ...] = ("fidelity",)
    task: str | None = None
    data: Path | None = None
    base: str | None = None        # the base model a fine-tuned MODEL came from (delta stages)
    max_drop: str | None = None    # quant.mixed budget override: points ("0.3") or percent of the score ("0.5%")
    min_drop: str | None = None
    force: bool = False
    latency: ProfileConfig = field(default_factory=ProfileConfig)
    new_tokens: int = 32           # generative models: tokens generated per timed run (compress.generative)


def default_out(cfg: RunConfig) -> Path:
    slug = re.sub(r"[^A-Za-z0-9_.-]+", "-", Path(cfg.model).name or cfg.model).strip("-")
    return Path("runs") / f"{slug}-{Path(cfg.recipe).stem}-{Path(cfg.target).stem}"


def check_out_dir(out: Path, force: bool) -> None:
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not force:
        raise CompressError(f"output {out} already exists and is not empty: pass --force to replace it or choose --out")


def target_status(profile: DeviceProfile) -> tuple[str, str]:
    """What this host can do for a target today: ("measured" | "simulated" | "vendor model" | "estimate only", why)."""
    from compress import npu
    from profiles import missing_requirements

    if npu.status(profile) is not None:       # QNN HTP simulator / Vela performance model (compress.npu)
        return npu.status(profile)
    if profile.kind == "cpu" and profile.latency_source == "measured":
        return "measured", "ONNX Runtime CPU EP on this host"
    if profile.kind == "gpu":                 # measured only where a CUDA session really runs (compress.gpu)
        from compress.gpu import status as gpu_status

        return gpu_status()
    missing = missing_requirements(profile)
    why = f"needs {', '.join(missing)} (not installed)" if missing else f"{profile.runtime} back-end not built yet"
    return "estimate only", why


def load_target(name: str) -> DeviceProfile:
    try:
        return load_profile(name)
    except ProfileError as e:
        raise CompressError(str(e)) from None


def resolve_target(name: str) -> DeviceProfile:
    """A target this host can measure; anything else is refused with the way to get an estimate."""
    profile = load_target(name)
    mode, why = target_status(profile)
    if mode not in ("measured", "simulated", "vendor model"):
        raise CompressError(f"target '{profile.name}' cannot be measured here ({why}): use --target cpu, or "
                            f"`compress profile ARTIFACT --target {profile.name} --estimate` for an analytic roofline")
    return profile


def tokenized_batches(lm: LoadedModel, texts: list[str], batch: int = 8, seq: int = 128) -> tuple[dict, ...]:
    """Calibration feeds padded to one fixed length: ORT's entropy/percentile calibrators stack all batches."""
    seq = min(seq, lm.max_length)
    return tuple(dict(lm.tokenizer(texts[i:i + batch], padding="max_length", truncation=True, max_length=seq,
                                   return_tensors="np")) for i in range(0, len(texts), batch))


def onnx_context(lm: LoadedModel, calibration: list[str], profile: DeviceProfile | None = None,
                 search_eval: EvalSpec | None = None, progress: Progress | None = None) -> OnnxContext:
    from runtimes.host import host_info

    c = lm.config
    return OnnxContext(calibration=tokenized_batches(lm, calibration), host=host_info(),
                       model_type=getattr(c, "model_type", ""), num_heads=int(getattr(c, "num_attention_heads", 0)),
                       hidden_size=int(getattr(c, "hidden_size", 0)), torch_model=lm,
                       calibration_texts=tuple(calibration), precisions=profile.precisions if profile else (),
                       scorer=make_scorer(search_eval, lm, calibration) if search_eval else None, progress=progress)


def make_scorer(spec: EvalSpec, lm: LoadedModel, texts: list[str]) -> Scorer:
    """The search metric of a run (its first --eval) on any ONNX file, run in ORT like the final evaluation."""
    from compress.evaluate import search_score
    from compress.models import torch_outputs
    from runtimes.encode import ort_outputs
    from runtimes.ort import cpu_session

    reference = torch_outputs(lm, texts) if spec.kind == "fidelity" else None

    def score(path: Path) -> float:
        sess = cpu_session(path, 0)
        return search_score(spec, lambda t: ort_outputs(sess, lm.tokenizer, t, lm.task, lm.max_length), texts, reference)

    name = "fidelity x100 (mean cosine to the original on the calibration text)" if spec.kind == "fidelity" else str(spec)
    return Scorer(name=name, score=score)


def parse_drop(text: str, flag: str) -> tuple[float, bool]:
    """"0.3" -> (0.3, absolute points); "0.5%" -> (0.5, relative to the float score)."""
    raw = text.strip()
    relative = raw.endswith("%")
    try:
        value = float(raw.rstrip("%"))
    except ValueError:
        raise CompressError(f"{flag} {text!r} is not a number: pass points (0.3) or a percentage (0.5%)") from None
    if not value >= 0:
        raise CompressError(f"{flag} {text!r} must be >= 0: it is the accuracy drop you accept")
    return value, relative


def with_budget(recipe: Recipe, max_drop: str | None, min_drop: str | None) -> Recipe:
    """Apply --max-drop / --min-drop to the recipe's quant.mixed stages (refused when it has none)."""
    import dataclasses

    if max_drop is None and min_drop is None:
        return recipe
    if not any(s.name == "quant.mixed" for s in recipe.stages):
        raise CompressError(f"--max-drop/--min-drop set an accuracy budget for quant.mixed, which recipe "
                            f"'{recipe.name}' does not have: use --recipe mixed")
    stages = []
    for spec in recipe.stages:
        if spec.name == "quant.mixed":
            changes = {}
            if max_drop is not None:
                changes["max_drop"], changes["relative"] = parse_drop(max_drop, "--max-drop")
            if min_drop is not None:
                value, rel = parse_drop(min_drop, "--min-drop")
                if max_drop is not None and rel != changes["relative"]:
                    raise CompressError("--min-drop and --max-drop must both be points or both percentages")
                changes["min_drop"] = value
            try:
                spec = dataclasses.replace(spec, config=dataclasses.replace(spec.config, **changes))
            except ValueError as e:
                raise CompressError(str(e).splitlines()[0]) from None
        stages.append(spec)
    return dataclasses.replace(recipe, stages=tuple(stages))


@dataclass(frozen=True)
class Prepared:
    """Everything validated before any heavy work starts."""

    recipe: Recipe
    profile: DeviceProfile
    out: Path


def prepare(cfg: RunConfig) -> Prepared:
    recipe = with_budget(load_recipe(cfg.recipe), cfg.max_drop, cfg.min_drop)
    profile = resolve_target(cfg.target)
    out = cfg.out or default_out(cfg)
    check_out_dir(out, cfg.force)
    if cfg.data is not None:
        read_texts(cfg.data)
    for spec in recipe.stages:          # fail before any heavy work, not after the export
        if spec.name == "prune.delta" and not getattr(spec.config, "base", "") and not cfg.base:
            raise CompressError("prune.delta needs the base model: pass --base MODEL or set base in the recipe")
    return Prepared(recipe, profile, out)


def run(cfg: RunConfig, progress: Progress = lambda msg: None,
        on_latency: Callable[[int, int], None] | None = None) -> tuple[Path, dict]:
    """Run a recipe end to end; returns (output folder, report dict)."""
    prep = prepare(cfg)
    from compress import npu

    if npu.backend(prep.profile) is not None:     # QNN HTP pre-flight / Ethos-U through Vela
        return npu.run_npu(cfg, prep, progress)
    from compress.generative import generative_task, run_generative

    kind = generative_task(cfg.model, cfg.task)
    if kind is not None and prep.profile.kind == "gpu":
        raise CompressError(f"generative models ({kind}) are not measured on the gpu target yet: use --target cpu")
    if kind is not None:             # causal LM / seq2seq: the generative path, beside this one
        return run_generative(cfg, prep, kind, progress, on_latency)
    t_start = time.perf_counter()
    progress(f"loading {cfg.model}")
    lm = load_model(cfg.model, cfg.task)
    evals = [parse_eval(e, lm.task) for e in cfg.evals]

    texts = shipped_sentences()
    calibration, heldout = calibration_and_heldout(texts)
    if cfg.data is not None:
        calibration = read_texts(cfg.data)

    from compress.report import write_report

    with staged_folder(prep.out) as (staging, work):
        report = _run_in(cfg, prep, lm, evals, calibration, heldout, staging, work, progress, on_latency)
        report["seconds_total"] = round(time.perf_counter() - t_start, 1)
        write_report(report, staging)
    return prep.out, report


@contextlib.contextmanager
def staged_folder(out: Path, work: bool = True):
    """Yield (staging, work dir): the output is built in a temporary sibling of ``out`` and renamed into place
    when the block ends; any failure removes it, so nothing half-written is left. ``work`` is a scratch folder
    removed at the end (None when ``work`` is False)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        if work:
            with tempfile.TemporaryDirectory(prefix="compress-work-") as work_dir:
                yield staging, Path(work_dir)
        else:
            yield staging, None
        commit_folder(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def commit_folder(staging: Path, out: Path) -> None:
    """Rename the finished folder into place; an old one (allowed by --force) is removed only after."""
    old = None
    if out.exists():
        old = out.with_name(f".{out.name}.old-{os.getpid()}")
        out.rename(old)
    staging.rename(out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True) if old.is_dir() else old.unlink()


def _estimate(path: Path, profile: DeviceProfile, shape) -> dict:
    """The analytic roofline for one shape; an estimator failure is reported, never fatal to a measured run."""
    from runtimes.roofline import RooflineError, estimate

    try:
        est = estimate(path, profile, shape.batch, shape.seq)
    except (RooflineError, ValueError) as e:
        return {"batch": shape.batch, "seq": shape.seq, "source": "analytic", "error": str(e).splitlines()[0]}
    keep = ("batch", "seq", "p50_ms", "source", "tool", "profile", "macs", "bytes", "bound", "caveats")
    return {k: est[k] for k in keep if k in est}


def apply_torch_stages(stages: list[StageSpec], lm: LoadedModel, calibration: list[str],
                       progress: Progress = lambda msg: None, artifact_dir: Path | None = None,
                       base_model: str | None = None) -> tuple[LoadedModel, list[dict]]:
    """Apply torch-level stages in order; each sees the untouched original model and the calibration text."""
    if not stages:
        return lm, []
    import copy

    ctx = TorchContext(original=copy.deepcopy(lm), calibration=tuple(calibration), artifact_dir=artifact_dir,
                       base_model=base_model, progress=progress)
    reports = []
    for i, spec in enumerate(stages):
        progress(f"stage {i + 1}/{len(stages)}: {spec.name}")
        t0 = time.perf_counter()
        try:
            lm, metrics = spec.type.apply(spec.config, lm, ctx)
        except ValueError as e:
            raise CompressError(f"stage {spec.name} failed: {str(e).splitlines()[0]}") from None
        reports.append({"name": spec.name, "level": "torch", "params": spec.params(), "metrics": metrics,
                        "seconds": round(time.perf_counter() - t0, 2)})
    return lm, reports


def pack_int4_layers(lm: LoadedModel, src: Path, work: Path) -> tuple[Path, dict]:
    """Pack the layers a stage put on the int4 grid into MatMulNBits (export.int4_pack)."""
    from export.int4_pack import pack_int4

    t0 = time.perf_counter()
    modules = dict(lm.model.named_modules())
    weights = {name: (modules[name].weight.detach().float().T.numpy(), fmt) for name, fmt in lm.int4_layers.items()}
    dst = work / "int4-packed.onnx"
    try:
        metrics = pack_int4(src, dst, weights)
    except ValueError as e:
        raise CompressError(f"int4 packing failed: {e}: report this model as a bug") from None
    return dst, {"name": "export.int4_pack", "level": "onnx", "params": {}, "metrics": metrics,
                 "seconds": round(time.perf_counter() - t0, 2)}


def apply_onnx_stages(stages: list[StageSpec], src: Path, work: Path, ctx: OnnxContext | None,
                      progress: Progress = lambda msg: None) -> tuple[Path, list[dict]]:
    """Apply ONNX-level stages in order, each writing a new file in ``work``; returns the last file and reports."""
    current, reports = src, []
    for i, spec in enumerate(stages):
        progress(f"stage {i + 1}/{len(stages)}: {spec.name}")
        dst = work / f"stage{i + 1}-{spec.name}.onnx"
        t0 = time.perf_counter()
        try:
            metrics = spec.type.apply(spec.config, current, dst, ctx)
        except ValueError as e:
            raise CompressError(f"stage {spec.name} failed: {str(e).splitlines()[0]}") from None
        reports.append({"name": spec.name, "level": "onnx", "params": spec.params(), "metrics": metrics,
                        "seconds": round(time.perf_counter() - t0, 2)})
        current = dst
    return current, reports


def _run_in(cfg: RunConfig, prep: Prepared, lm: LoadedModel, evals: list[EvalSpec], calibration: list[str],
            heldout: list[str], staging: Path, work: Path, progress: Progress, on_latency) -> dict:
    from export.onnx_export import MODEL_FILE, copy_app_files, export_onnx
    from export.verify import FLOAT_COSINE_MIN, verify_against_torch
    from compress.models import torch_outputs
    from compress.report import build_report
    from runtimes.encode import ort_outputs
    from runtimes.ort import cpu_session
    from runtimes.profiler import op_breakdown, measure_latency

    recipe = prep.recipe
    torch_stages = [s for s in recipe.stages if s.type.level == "torch"]
    onnx_stages = [s for s in recipe.stages if s.type.level == "onnx"]
    stage_reports = []

    progress("exporting the original model to ONNX (optimum)")
    reference = torch_outputs(lm, heldout)
    baseline_dir = work / "original"
    baseline = export_onnx(lm, baseline_dir)
    parity_original = verify_against_torch(lm, baseline, heldout, FLOAT_COSINE_MIN, reference=reference)
    if not parity_original.passed:
        raise CompressError(f"the float ONNX export diverges from torch (min cosine {parity_original.cosine_min:.5f} "
                            f"< {FLOAT_COSINE_MIN}): report this model as an export bug; nothing was written")

    lm, reports = apply_torch_stages(torch_stages, lm, calibration, progress, artifact_dir=staging, base_model=cfg.base)
    stage_reports += reports
    current, float_dir = baseline, baseline_dir
    parity_float = parity_original
    if torch_stages:
        progress("exporting the compressed model to ONNX")
        float_dir = work / "compressed-float"
        current = export_onnx(lm, float_dir)
        parity_float = verify_against_torch(lm, current, heldout, FLOAT_COSINE_MIN)
        if not parity_float.passed:
            raise CompressError(f"the float export of the compressed model diverges from its torch model "
                                f"(min cosine {parity_float.cosine_min:.5f}): report this as an export bug")
    if lm.int4_layers:
        progress(f"packing {len(lm.int4_layers)} int4 layers into MatMulNBits")
        current, report = pack_int4_layers(lm, current, work)
        stage_reports.append(report)

    search = any(s.name == "quant.mixed" for s in onnx_stages)
    ctx = onnx_context(lm, calibration, prep.profile, evals[0] if search and evals else None, progress) \
        if onnx_stages else None
    current, reports = apply_onnx_stages(onnx_stages, current, work, ctx, progress)
    stage_reports += reports

    progress("writing the artefact and checking it against torch")
    artifact = staging / MODEL_FILE
    shutil.copy2(current, artifact)
    copy_app_files(float_dir, staging)
    exact = not onnx_stages and not lm.int4_layers          # float artefact: held to the float gate
    parity_final = verify_against_torch(lm, artifact, heldout, FLOAT_COSINE_MIN if exact else None,
                                        reference=reference if not torch_stages else None)

    sess_orig, sess_comp = cpu_session(baseline, 0), cpu_session(artifact, 0)
    encode_orig = lambda t: ort_outputs(sess_orig, lm.tokenizer, t, lm.task, lm.max_length)
    encode_comp = lambda t: ort_outputs(sess_comp, lm.tokenizer, t, lm.task, lm.max_length)
    results = []
    for spec in evals:
        progress(f"evaluating {spec}")
        results.append(evaluate(spec, encode_orig, encode_comp, heldout))

    shapes = ", ".join(str(s) for s in cfg.latency.shapes)
    first = cfg.latency.shapes[0]
    gpu = None
    if prep.profile.kind == "gpu":     # CUDA / TensorRT EPs, fp32 / fp16 / int8 side by side (compress.gpu)
        from compress.gpu import measure_run

        lat, gpu = measure_run(cfg, prep, lm, baseline, artifact, tokenized_batches(lm, calibration), heldout, work,
                               progress, on_latency)
        ops = {"shape": str(first), "original": [], "compressed": [], "note": "CPU EP op breakdown not run for gpu"}
    else:
        progress(f"measuring latency on the CPU ({shapes}; {cfg.latency.runs} runs each, original and compressed "
                 "interleaved)")
        lat = measure_latency({"original": baseline, "compressed": artifact}, cfg.latency, on_progress=on_latency)
        progress(f"op breakdown at {first} (ORT profiler)")
        ops = {"shape": str(first),
               "original": op_breakdown(baseline, first, cfg.latency.threads, cfg.latency.op_runs, cfg.latency.top_ops),
               "compressed": op_breakdown(artifact, first, cfg.latency.threads, cfg.latency.op_runs, cfg.latency.top_ops)}

    parity = {"original_export": parity_original.as_dict(), "artifact": parity_final.as_dict()}
    if torch_stages:
        parity["compressed_float_export"] = parity_float.as_dict()
    progress("roofline estimate for the host CPU profile (analytic, next to the measurement)")
    roofline = {label: [_estimate(path, prep.profile, shape) for shape in cfg.latency.shapes]
                for label, path in (("original", baseline), ("compressed", artifact))}
    report = build_report(cfg=cfg, roofline=roofline, lm=lm, recipe=recipe, profile=prep.profile, stages=stage_reports,
                          artifact=artifact, baseline=baseline, parity=parity,
                          evals=results, latency=lat, ops=ops)
    if gpu is not None:
        report["gpu"] = gpu
    return report
