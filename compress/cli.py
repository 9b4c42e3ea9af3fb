"""The command line: parse -> validate -> one call. Errors are one line and a non-zero exit."""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import sys
import time
import warnings
from pathlib import Path

import click

from compress.errors import CompressError


def _quiet_libraries() -> None:
    """Third-party import chatter (torchao's optional CUDA kernels, tracer warnings) is not the user's business."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    for name in ("torchao", "torch.utils._pytree", "optimum", "transformers", "sentence_transformers",
                 "onnxruntime", "root", "torch.onnx"):
        logging.getLogger(name).setLevel(logging.ERROR)
    logging.getLogger().setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")


def _shapes(text: str):
    from runtimes.profiler import Shape

    try:
        return tuple(Shape.parse(s) for s in text.split(",") if s.strip())
    except ValueError as e:
        raise click.BadParameter(str(e)) from None


def _latency_config(shapes: str, runs: int, threads: int):
    from runtimes.profiler import ProfileConfig

    try:
        return ProfileConfig(shapes=_shapes(shapes), runs=runs, threads=threads)
    except ValueError as e:
        raise click.BadParameter(str(e)) from None


class _Clock:
    def __init__(self) -> None:
        self.t0 = time.perf_counter()

    def __call__(self, msg: str) -> None:
        click.echo(f"[{time.perf_counter() - self.t0:6.1f}s] {msg}", err=True)


def _latency_progress():
    state = {"last": -1}

    def on(done: int, total: int) -> None:
        pct = done * 100 // total
        if pct // 10 != state["last"] // 10 or done == total:
            state["last"] = pct
            click.echo(f"          latency runs {done}/{total} ({pct}%)", err=True)

    return on


@click.group()
@click.version_option(package_name="edge-compress")
def main() -> None:
    """Compress a trained model for a target device, export it to ONNX, and report honestly how it runs."""
    _quiet_libraries()


def _fail(e: Exception) -> None:
    msg = str(e).splitlines()[0] if str(e) else type(e).__name__
    click.echo(f"error: {msg}", err=True)
    sys.exit(2)


@main.command()
@click.argument("model")
@click.option("--target", default="cpu", show_default=True, help="Device profile name or profile .toml path.")
@click.option("--recipe", default="cpu-default", show_default=True, help="Shipped recipe name or .toml path.")
@click.option("--out", type=click.Path(path_type=Path), help="Output folder (default runs/MODEL-RECIPE-TARGET).")
@click.option("--eval", "evals", multiple=True, help="stsb:PATH, fidelity, accuracy:PATH (repeatable; default fidelity).")
@click.option("--task", type=click.Choice(["sentence-embedding", "feature-extraction", "text-classification",
                                           "text-generation", "text2text-generation"]),
              help="Override the task read from the model's config.")
@click.option("--data", type=click.Path(path_type=Path), help="Calibration text (.txt/.jsonl/.csv); default: shipped sentences.")
@click.option("--base", help="The base model MODEL was fine-tuned from (for delta stages): minilm, a folder or a hub id.")
@click.option("--shapes", default="1x128,32x128", show_default=True, help="Latency shapes BATCHxSEQ, comma-separated.")
@click.option("--runs", default=50, show_default=True, help="Timed runs per shape and model.")
@click.option("--threads", default=0, show_default=True, help="ORT intra-op threads (0: physical cores).")
@click.option("--max-drop", help="Accuracy budget for quant.mixed (--recipe mixed): points of the first --eval "
              "(0.3) or percent of its float score (0.5%).")
@click.option("--min-drop", help="Lower end of the budget range: a probe inside [min, max] ends the search early.")
@click.option("--new-tokens", default=32, show_default=True, help="Generative models: tokens generated per timed run.")
@click.option("--force", is_flag=True, help="Replace an existing non-empty output folder.")
def run(model, target, recipe, out, evals, task, data, base, shapes, runs, threads, max_drop, min_drop, force,
        new_tokens) -> None:
    """Compress MODEL (minilm, a local HF folder, or a cached hub id) with a recipe for a target."""
    from compress.pipeline import RunConfig, run as run_pipeline

    cfg = RunConfig(model=model, target=target, recipe=recipe, out=out, evals=tuple(evals) or ("fidelity",),
                    task=task, data=data, base=base, force=force, max_drop=max_drop, min_drop=min_drop,
                    latency=_latency_config(shapes, runs, threads), new_tokens=new_tokens)
    try:
        folder, report = run_pipeline(cfg, progress=_Clock(), on_latency=_latency_progress())
    except CompressError as e:
        _fail(e)
    click.echo("")
    click.echo(_summary(report))
    files = report.get("files", ["model.onnx", "report.json", "report.md", "plot.png"])
    click.echo(f"\nartefact and reports: {folder}/ ({', '.join(files)})")


def _summary(report: dict) -> str:
    if "npu" in report:                  # QNN HTP pre-flight / Ethos-U via Vela (compress.npu)
        from compress.npu import summary as npu_summary

        return npu_summary(report)
    if report.get("kind") == "generative":
        from compress.generative import summary

        return summary(report)
    lines = [f"{report['model']['name']} -> {report['target']['name']} with recipe {report['recipe']['name']}"]
    roof = report.get("roofline", {}).get("compressed", [])
    for i, (c, b) in enumerate(zip(report["latency"], report["baseline_latency"])):
        est = roof[i] if i < len(roof) else {}
        est_txt = f"; roofline {est['p50_ms']:.2f} ms [analytic]" if "p50_ms" in est else ""
        lines.append(f"  latency {c['batch']}x{c['seq']}: p50 {c['p50_ms']:.2f} ms [{c['source']}] vs original "
                     f"{b['p50_ms']:.2f} ms [{b['source']}]  ratio {c['p50_ms'] / b['p50_ms']:.2f}{est_txt}")
    for e in report["eval"]:
        lines.append(f"  {e['name']}: {e['compressed']} (original {e['original']})")
    lines.append(f"  size: {report['artifact']['bytes'] / 1e6:.1f} MB (original {report['baseline_artifact']['bytes'] / 1e6:.1f} MB)")
    if "gpu" in report:              # fp32 / fp16 / int8 variants on the CUDA / TensorRT EPs (compress.gpu)
        from compress.gpu import variant_lines

        lines += variant_lines(report["gpu"])
    return "\n".join(lines)


@main.command()
@click.argument("artifact", type=click.Path(path_type=Path))
@click.option("--target", default="cpu", show_default=True)
@click.option("--baseline", type=click.Path(path_type=Path), help="Another .onnx/folder to time interleaved, side by side.")
@click.option("--shapes", default="1x128,32x128", show_default=True)
@click.option("--runs", default=50, show_default=True)
@click.option("--threads", default=0, show_default=True)
@click.option("--json", "json_out", type=click.Path(path_type=Path), help="Also write the results as JSON here.")
@click.option("--estimate", is_flag=True, help="Analytic roofline from the target's profile instead of a measurement.")
@click.option("--new-tokens", default=32, show_default=True, help="Generative folders: tokens generated per timed run.")
def profile(artifact, target, baseline, shapes, runs, threads, json_out, estimate, new_tokens) -> None:
    """Measure an existing artefact folder or .onnx file on a target (or estimate it with --estimate)."""
    from compress.pipeline import resolve_target
    from runtimes.host import host_info
    from runtimes.profiler import measure_latency, op_breakdown

    cfg = _latency_config(shapes, runs, threads)
    if estimate:
        _estimate_cmd(artifact, load_target_or_fail(target), cfg.shapes, json_out)
        return
    if _npu_profile(artifact, load_target_or_fail(target), cfg.shapes[0], json_out):
        return
    if _gpu_profile(artifact, load_target_or_fail(target), baseline, cfg, json_out):
        return
    from export.generative import artifact_kind

    if artifact_kind(artifact) is not None:        # decoder-only / encoder-decoder folder: TTFT and tokens/s
        _profile_generative(artifact, target, baseline, cfg, new_tokens, json_out)
        return
    try:
        resolve_target(target)
        models = {"artifact": _onnx_path(artifact)}
        if baseline is not None:
            models["baseline"] = _onnx_path(baseline)
        clock = _Clock()
        clock(f"measuring {', '.join(str(p) for p in models.values())} ({shapes}; {runs} runs each)")
        res = measure_latency(models, cfg, on_progress=_latency_progress())
        ops = op_breakdown(models["artifact"], cfg.shapes[0], threads, cfg.op_runs, cfg.top_ops)
    except CompressError as e:
        _fail(e)
    host = host_info()
    click.echo(f"host: {host.summary()}")
    click.echo(f"{'model':<10} {'shape':>8} {'p50 ms':>9} {'p90 ms':>9} {'p99 ms':>9} {'seq/s':>9}  source")
    for label, rows in res.items():
        for r in rows:
            click.echo(f"{label:<10} {r.batch:>4}x{r.seq:<3} {r.p50_ms:>9.2f} {r.p90_ms:>9.2f} {r.p99_ms:>9.2f} "
                       f"{r.throughput_per_s:>9.1f}  {r.source} ({r.tool}, {r.threads} threads)")
    click.echo(f"top ops at {cfg.shapes[0]} (ORT profiler): " +
               ", ".join(f"{o['op_type']} {o['ms_per_run']:.2f} ms ({o['share'] * 100:.0f}%)" for o in ops))
    if json_out:
        data = {"host": host.as_dict(), "latency": {k: [dataclasses.asdict(r) for r in v] for k, v in res.items()},
                "ops": ops, "models": {k: str(v) for k, v in models.items()}}
        json_out.write_text(json.dumps(data, indent=2) + "\n")


def _profile_generative(artifact: Path, target: str, baseline, cfg, new_tokens: int, json_out) -> None:
    from compress.generative import gen_profile_config, profile_folders, profile_lines
    from compress.pipeline import resolve_target
    from export.generative import artifact_kind
    from runtimes.host import host_info

    try:
        resolve_target(target)
        gen_cfg = gen_profile_config(cfg.shapes, cfg.runs, cfg.threads, new_tokens)
        models = {"artifact": artifact}
        if baseline is not None:
            if artifact_kind(baseline) != artifact_kind(artifact):
                raise CompressError(f"--baseline {baseline} is not the same kind of generative folder as {artifact}")
            models["baseline"] = baseline
        _Clock()(f"measuring {', '.join(str(p) for p in models.values())} ({artifact_kind(artifact)}; batch x input "
                 f"{', '.join(str(p) for p in gen_cfg.points)}; {new_tokens} new tokens; {cfg.runs} runs each)")
        res, rss = profile_folders(models, gen_cfg, on_progress=_latency_progress())
    except (CompressError, ValueError) as e:
        _fail(e)
    host = host_info()
    click.echo(f"host: {host.summary()}")
    for line in profile_lines(res, rss):
        click.echo(line)
    if json_out:
        data = {"host": host.as_dict(), "kind": artifact_kind(artifact), "peak_rss": rss,
                "latency": {k: [dataclasses.asdict(r) for r in v] for k, v in res.items()},
                "models": {k: str(v) for k, v in models.items()}}
        json_out.write_text(json.dumps(data, indent=2) + "\n")


def _npu_profile(artifact: Path, profile, shape, json_out: Path | None) -> bool:
    """QNN HTP pre-flight or Vela compile of an artefact (compress.npu); False for targets that are not NPU back-ends."""
    from compress import npu

    if npu.backend(profile) is None:
        return False
    try:
        res = npu.profile_artifact(artifact, profile, shape.batch, shape.seq, progress=_Clock())
    except CompressError as e:
        _fail(e)
    click.echo(npu.profile_text(res))
    if json_out:
        json_out.write_text(json.dumps({"target": profile.name, **res}, indent=2, default=str) + "\n")
    return True


def _gpu_profile(artifact: Path, profile, baseline, cfg, json_out: Path | None) -> bool:
    """Measure an artefact on the CUDA / TensorRT EPs (compress.gpu); False for targets that are not GPUs.
    Without a usable CUDA device the target is refused in one line (resolve_target), --estimate still works."""
    if profile.kind != "gpu":
        return False
    from compress.gpu import profile_artifact, variant_lines
    from compress.pipeline import resolve_target
    from export.generative import artifact_kind

    try:
        resolve_target(str(profile.source_file or profile.name))
        if artifact_kind(artifact) is not None:
            raise CompressError(f"{artifact} is a generative folder: those are not measured on the gpu target yet; "
                                "use --target cpu")
        res = profile_artifact(_onnx_path(artifact), profile, cfg.shapes, cfg.runs,
                               _onnx_path(baseline) if baseline is not None else None, progress=_Clock(),
                               on_latency=_latency_progress())
    except CompressError as e:
        _fail(e)
    for line in variant_lines(res):
        click.echo(line)
    if json_out:
        json_out.write_text(json.dumps({"target": profile.name, **res}, indent=2, default=str) + "\n")
    return True


def load_target_or_fail(name: str):
    from compress.pipeline import load_target

    try:
        return load_target(name)
    except CompressError as e:
        _fail(e)


def _estimate_cmd(artifact: Path, profile, shapes, json_out: Path | None) -> None:
    from runtimes.roofline import RooflineError, estimate

    try:
        path = _onnx_path(artifact)
        rows = [estimate(path, profile, s.batch, s.seq) for s in shapes]
    except (CompressError, RooflineError) as e:
        _fail(e)
    click.echo(f"target {profile.name}: {profile.description}")
    for r in rows:
        click.echo(f"  {r['batch']}x{r['seq']}: {r['p50_ms']:.2f} ms [{r['source']}, {r['tool']}]  "
                   f"{r['macs'] / 1e9:.2f} GMAC, {r['bytes'] / 1e6:.1f} MB moved")
    click.echo("caveats:\n" + "\n".join(f"  - {c}" for c in rows[0]["caveats"]))
    if json_out:
        json_out.write_text(json.dumps({"target": profile.name, "estimates": rows}, indent=2, default=str) + "\n")


@main.command()
def targets() -> None:
    """List device profiles and what this host can do for each: measured or estimate only."""
    from compress.pipeline import target_status
    from profiles import available_profiles, load_profile

    click.echo(f"{'target':<18} {'kind':<5} {'this host':<14} {'latency source on its device':<28} why")
    for name in available_profiles():
        p = load_profile(name)
        mode, why = target_status(p)
        click.echo(f"{name:<18} {p.kind:<5} {mode:<14} {p.latency_source:<28} {why}")
    click.echo("\nAdd your own: pass a profile .toml path as --target (fields: see profiles/cpu.toml).")


def _onnx_path(p: Path) -> Path:
    if p.is_dir():
        p = p / "model.onnx"
    if not p.is_file():
        raise CompressError(f"{p} not found: pass an artefact folder holding model.onnx, or an .onnx file")
    try:
        import onnx

        onnx.checker.check_model(str(p))
    except Exception as e:
        raise CompressError(f"{p} is not a valid ONNX model ({type(e).__name__}): re-export it with compress run") from None
    return p


@main.command()
def recipes() -> None:
    """List shipped recipes and the stage types a recipe may use, with their parameters."""
    from compress.recipe import load_recipe, shipped_recipes
    from compress.stages import REGISTRY

    click.echo("Recipes:")
    for name in shipped_recipes():
        r = load_recipe(name)
        stages = " -> ".join(s.name for s in r.stages) or "(no stages)"
        click.echo(f"  {name:<20} {stages:<36} {r.description}")
    click.echo("\nStage types:")
    for name, st in REGISTRY.items():
        params = ", ".join(f"{f.name}={f.default!r}" for f in dataclasses.fields(st.config))
        click.echo(f"  {name:<16} [{st.level}] {st.summary}\n  {'':<16} {params}")


@main.command("apply-delta")
@click.argument("base")
@click.argument("delta", type=click.Path(path_type=Path))
@click.option("--out", required=True, type=click.Path(path_type=Path), help="Folder for the rebuilt model.")
@click.option("--force", is_flag=True, help="Replace an existing non-empty output folder.")
def apply_delta(base, delta, out, force) -> None:
    """Rebuild a fine-tuned model from BASE plus a DELTA file (delta.safetensors written by prune.delta)."""
    from compress.delta_io import apply_delta as rebuild

    try:
        res = rebuild(base, delta, out, force=force)
    except CompressError as e:
        _fail(e)
    click.echo(f"rebuilt {res['task']} model: {base} + {res['entries']} delta entries in {res['tensors']} tensors "
               f"({res['method']}, p={res['p']}) -> {res['out']}/ (load it with compress run {res['out']})")


if __name__ == "__main__":
    main()
