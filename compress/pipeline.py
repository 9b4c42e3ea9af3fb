"""The pipeline: check everything that can be checked, pick the flow, run it in a staged output folder, write the
report. Data flows one way:

    RunConfig -> prepare (recipe + overrides, target, output folder, model kind -> flow, stage/model/target checks)
              -> flow.run (in a temporary sibling of the output folder) -> report.json + the flow's report.md
              -> renamed into place.

A failed run leaves nothing half-written; an existing result is replaced only with ``force``. ``compress profile``
(``profile``) and ``compress apply-delta`` (``rebuild_from_delta``) are here too.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from compress import gpu
from compress.core import Progress, silent
from compress.core.data import read_texts
from compress.core.errors import CompressError
from compress.core.fs import check_out_dir, staged_folder
from compress.core.kinds import ModelKind
from compress.core.models import load_model, model_kind, resolve_path
from compress.flows import SCHEMA, Flow, ProfileRequest, ProfileResult, flow_for, flow_named, npu, profiler_for
from compress.flows.generative import genai_unsupported
from compress.recipe import apply_overrides, check_applicable, load_recipe
from compress.stages.delta_io import apply_kept, delta_tensors, fingerprint, first_mismatch, load_delta
from compress.steps import Run, RunConfig, default_out, read_labelled_pairs
from profiles import DeviceProfile, load_profile, missing_requirements

__all__ = [
    "RunConfig",
    "prepare",
    "profile",
    "rebuild_from_delta",
    "resolve_target",
    "run",
    "target_status",
    "write_report",
]


# ---- targets --------------------------------------------------------------------------------------------------


def target_status(profile: DeviceProfile) -> tuple[str, str]:
    """What this host can do for a target today: ("measured" | "simulated" | "vendor model" | "estimate only", why)."""
    if npu.status(profile) is not None:  # QNN HTP simulator / Vela performance model
        return npu.status(profile)
    if profile.kind == "cpu" and profile.latency_source == "measured":
        return "measured", "ONNX Runtime CPU EP on this host"
    if profile.kind == "gpu":  # measured only where a CUDA session really runs
        return gpu.status()
    missing = missing_requirements(profile)
    why = f"needs {', '.join(missing)} (not installed)" if missing else f"{profile.runtime} back-end not built yet"
    return "estimate only", why


def resolve_target(name: str) -> DeviceProfile:
    """A target this host can measure; anything else is refused with the way to get an estimate."""
    profile = load_profile(name)
    mode, why = target_status(profile)
    if mode not in ("measured", "simulated", "vendor model"):
        raise CompressError(
            f"target '{profile.name}' cannot be measured here ({why}): use --target cpu, or "
            f"`compress profile ARTIFACT --target {profile.name} --estimate` for an analytic roofline"
        )
    return profile


# ---- compress run ---------------------------------------------------------------------------------------------

DEFAULT_RECIPE = "cpu-default"
# What cpu-default means for the model kinds its stage (quant.hybrid, encoders) is not built for: plain dynamic int8,
# the generative flow's default before and after issue 14 (README, "Generative models"); a causal LM that
# onnxruntime-genai's builder maps gets the same 8-bit weights in the builder's graph instead (default_recipe).
KIND_DEFAULTS = {"causal-lm": "dynamic-int8", "seq2seq": "dynamic-int8"}
GENAI_DEFAULT = "lm-int8-genai"


def default_recipe(kind: ModelKind, model: str) -> str | None:
    """The recipe cpu-default stands for on a model kind it is not built for (None: cpu-default itself). A causal LM
    of an architecture the genai exporter maps gets ``lm-int8-genai`` where onnxruntime-genai is installed (smollm2:
    1.6x dynamic-int8's decode speed at about its perplexity, README "Language models"), else ``dynamic-int8``."""
    if kind == "causal-lm" and genai_unsupported(json.loads((resolve_path(model) / "config.json").read_text())) is None:
        return GENAI_DEFAULT
    return KIND_DEFAULTS.get(kind)


def prepare(cfg: RunConfig) -> tuple[Run, Flow]:
    """Everything validated before any heavy work starts: the recipe (with --max-drop etc.), the target, the output
    folder, the calibration file, which flow takes this model kind to this target, and whether every stage applies
    (model kind, precisions, the context it needs)."""
    recipe = load_recipe(cfg.recipe)
    kind = model_kind(cfg.model, cfg.task)
    if recipe.name == DEFAULT_RECIPE and kind in KIND_DEFAULTS:  # cpu-default's quant.hybrid is built for encoders
        recipe = load_recipe(default_recipe(kind, cfg.model))
    recipe = apply_overrides(recipe, dict(cfg.overrides), dict(cfg.override_flags), kind)
    profile = resolve_target(cfg.target)
    out = cfg.out or default_out(cfg)
    check_out_dir(out, cfg.force)
    if cfg.data is not None:
        read_texts(cfg.data)
    flow = flow_for(kind, profile)
    extra = [f for f in cfg.formats if f not in flow.formats]
    if extra:
        raise CompressError(
            f"--format {extra[0]} is not made for {kind} artefacts (the {flow.name} flow writes "
            f"{', '.join(flow.formats)}): drop --format {extra[0]}"
        )
    check_applicable(recipe, kind, profile, flow.levels, flow.strict_precisions(profile))
    for spec in recipe.stages:
        if (
            spec.type.level in flow.levels
            and "base" in spec.type.needs_for(spec.config)
            and not getattr(spec.config, "base", "")
            and not cfg.base
        ):
            raise CompressError(f"{spec.name} needs the base model: pass --base MODEL or set base in the recipe")
        if spec.type.level in flow.levels and "labels" in spec.type.needs_for(spec.config) and not cfg.train:
            raise CompressError(
                f"{spec.name} trains with a task loss and needs labelled pairs: pass --train "
                "stsb:PATH (e.g. STS-B train), or set its task_loss to 0"
            )
    if cfg.train:
        read_labelled_pairs(cfg.train)
    run_ = Run(cfg=cfg, recipe=recipe, profile=profile, out=out, kind=kind)
    flow.check(run_)
    return run_, flow


def run(cfg: RunConfig, progress: Progress = silent, on_latency=None) -> tuple[Path, dict]:
    """Run a recipe end to end; returns (output folder, report dict). ``report["files"]`` lists the folder."""
    run_, flow = prepare(cfg)
    t_start = time.perf_counter()
    with staged_folder(run_.out, cfg.force, progress=progress) as (staging, work):
        report = {"schema": SCHEMA, "flow": flow.name, **flow.run(run_, staging, work, progress, on_latency)}
        report["seconds_total"] = round(time.perf_counter() - t_start, 1)
        write_report(report, staging)
        files = sorted(f.name + ("/" if f.is_dir() else "") for f in staging.iterdir())
    return run_.out, {**report, "files": report.get("files", files)}


def write_report(report: dict, folder: Path) -> None:
    """report.json, then the report's own flow writes report.md and its plots."""
    (folder / "report.json").write_text(json.dumps(report, indent=2, default=str) + "\n")
    flow_named(report["flow"]).write(report, folder)


def summary(report: dict) -> str:
    """The lines `compress run` prints, from the flow that made the report."""
    return flow_named(report["flow"]).summary(report)


# ---- compress profile -----------------------------------------------------------------------------------------


def profile(request: ProfileRequest, progress: Progress = silent, on_latency=None) -> ProfileResult:
    """Measure (or pre-flight) an existing artefact on a target this host can measure or simulate."""
    resolve_target(request.profile.source_file or request.profile.name)
    return profiler_for(request.artifact, request.profile).profile(request, progress, on_latency)


# ---- compress apply-delta -------------------------------------------------------------------------------------


def rebuild_from_delta(base: str, delta_path: str | Path, out_dir: str | Path, force: bool = False) -> dict:
    """Rebuild the fine-tuned model as base + delta and save it to ``out_dir`` (loadable by ``compress run``).

    The folder is written as a temporary sibling and renamed into place: a failure leaves nothing behind, and
    an existing non-empty ``out_dir`` is replaced only with ``force``.
    """
    out = Path(out_dir)
    kept, meta = load_delta(delta_path)
    check_out_dir(out, force)
    lm = load_model(base, meta.get("task"))
    tensors = delta_tensors(lm.model)
    made_from = meta.get("base") or "the base it was made from"
    mismatch = first_mismatch({n: tuple(s) for n, s in meta["shapes"].items()}, tensors)
    if mismatch:
        raise CompressError(
            f"delta {delta_path} was made for a different architecture ({mismatch}): "
            f"pass the base model it was made from ({made_from})"
        )
    for name, (idx, _, _shape) in kept.items():
        if len(idx) and int(idx.max()) >= tensors[name].numel():
            raise CompressError(f"delta {delta_path} is damaged: an index of {name} is out of range; re-create it")
    if meta.get("base_sha256") and fingerprint(tensors) != meta["base_sha256"]:
        raise CompressError(
            f"the weights of {base} differ from the base the delta was made against: "
            f"pass the exact base model ({made_from}), not another checkpoint of the same architecture"
        )
    apply_kept(tensors, tensors, kept)  # add_delta builds each new tensor before it is copied in

    with staged_folder(out, force, work=False) as (staging, _):
        if lm.task == "sentence-embedding":
            lm.model.save(str(staging))
        else:
            lm.model.save_pretrained(staging)
            lm.tokenizer.save_pretrained(staging)
    entries = sum(len(i) for i, _, _ in kept.values())
    return {
        "out": str(out),
        "task": lm.task,
        "tensors": len(kept),
        "entries": entries,
        "method": meta.get("method"),
        "p": meta.get("p"),
        "q": meta.get("q"),
    }
