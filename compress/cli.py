"""The command line: parse -> validate -> one call. A ``CompressError`` (the project's one error base) is one line
on stderr and exit status 2; anything else is a bug and keeps its traceback."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
import signal
import sys
import threading
import time
import warnings
from pathlib import Path

import click

from compress import pipeline
from compress.core.errors import CompressError, Terminated, first_line, on_signal, raise_if_signalled
from compress.core.fs import write_text
from compress.flows import ProfileRequest
from compress.recipe import load_recipe, shipped_recipes
from compress.search import SearchConfig
from compress.search import search as search_command
from compress.stages import REGISTRY
from compress.steps import RunConfig, onnx_file
from profiles import available_profiles, load_profile
from runtimes.mobile import mobile_coverage
from runtimes.profiler import ProfileConfig, Shape
from runtimes.roofline import estimate


def _quiet_libraries() -> None:
    """Third-party import chatter (torchao's optional CUDA kernels, tracer warnings) is not the user's business."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    for name in (
        "torchao",
        "torch.utils._pytree",
        "optimum",
        "transformers",
        "sentence_transformers",
        "onnxruntime",
        "root",
        "torch.onnx",
    ):
        logging.getLogger(name).setLevel(logging.ERROR)
    logging.getLogger().setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")


def _latency_config(shapes: str, runs: int, threads: int) -> ProfileConfig:
    return ProfileConfig(
        shapes=tuple(Shape.parse(s) for s in shapes.split(",") if s.strip()), runs=runs, threads=threads
    )


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


def _fail(e: CompressError) -> None:
    click.echo(f"error: {first_line(e)}", err=True)
    sys.exit(2)


class _Group(click.Group):
    """Every command's CompressError becomes one line and exit status 2; SIGINT / SIGTERM clean up (the staged
    output folder is removed on the way out) and exit 130 / 143, as shells expect."""

    def invoke(self, ctx: click.Context):
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, on_signal)
            signal.signal(signal.SIGINT, on_signal)
        try:
            result = super().invoke(ctx)
            raise_if_signalled()
            return result
        except CompressError as e:
            _fail(e)
        except KeyboardInterrupt:
            click.echo("interrupted (SIGINT): stopped; nothing half-written was left", err=True)
            sys.exit(130)
        except Terminated:
            click.echo("terminated (SIGTERM): stopped; nothing half-written was left", err=True)
            sys.exit(143)


@click.group(cls=_Group)
@click.version_option(package_name="edge-compress")
def main() -> None:
    """Compress a trained model for a target device, export it to ONNX, and report honestly how it runs."""
    _quiet_libraries()


@main.command()
@click.argument("model")
@click.option("--target", default="cpu", show_default=True, help="Device profile name or profile .toml path.")
@click.option("--recipe", default="cpu-default", show_default=True, help="Shipped recipe name or .toml path.")
@click.option("--out", type=click.Path(path_type=Path), help="Output folder (default runs/MODEL-RECIPE-TARGET).")
@click.option(
    "--eval",
    "evals",
    multiple=True,
    help="stsb:PATH, fidelity, accuracy:PATH; causal LMs: ppl[:FILE] (always scored, held-out "
    "shipped text by default) and fidelity (repeatable; default fidelity).",
)
@click.option(
    "--task",
    type=click.Choice(
        ["sentence-embedding", "feature-extraction", "text-classification", "text-generation", "text2text-generation"]
    ),
    help="Override the task read from the model's config.",
)
@click.option(
    "--data", type=click.Path(path_type=Path), help="Calibration text (.txt/.jsonl/.csv); default: shipped sentences."
)
@click.option(
    "--base", help="The base model MODEL was fine-tuned from (for delta stages): minilm, a folder or a hub id."
)
@click.option("--train", help="Labelled pairs for a recovery stage's task loss: stsb:PATH (e.g. STS-B train).")
@click.option("--shapes", default="1x128,32x128", show_default=True, help="Latency shapes BATCHxSEQ, comma-separated.")
@click.option(
    "--runs",
    type=int,
    help="Timed runs per shape and model [default: 50; 10 for generative models, whose every run generates "
    "--new-tokens tokens].",
)
@click.option("--threads", default=0, show_default=True, help="ORT intra-op threads (0: physical cores).")
@click.option(
    "--max-drop",
    help="Accuracy budget for quant.mixed (--recipe mixed): points of the first --eval "
    "(0.3) or percent of its float score (0.5%).",
)
@click.option("--min-drop", help="Lower end of the budget range: a probe inside [min, max] ends the search early.")
@click.option(
    "--set",
    "sets",
    multiple=True,
    metavar="PARAM=VALUE",
    help="Set a stage parameter of the recipe (every stage that has it), e.g. --set steps=400 (repeatable).",
)
@click.option("--new-tokens", default=32, show_default=True, help="Generative models: tokens generated per timed run.")
@click.option(
    "--format",
    "fmt",
    type=click.Choice(["onnx", "ort"]),
    default="onnx",
    show_default=True,
    help="ort: also write onnx/model.ort for ORT Mobile, with NNAPI / Core ML coverage in the report.",
)
@click.option(
    "--max-ppl-rise",
    default="10%",
    show_default=True,
    help="Causal LMs: fail the run (nothing written) when the compressed perplexity rises more than this above the "
    "float model's (percent).",
)
@click.option("--force", is_flag=True, help="Replace an existing non-empty output folder.")
def run(sets, max_drop, min_drop, shapes, runs, threads, evals, fmt, max_ppl_rise, **fields) -> None:
    """Compress MODEL (minilm, smollm2, a local HF folder, or a cached hub id) with a recipe for a target."""
    overrides, flags = _overrides(sets, max_drop=max_drop, min_drop=min_drop)
    cfg = RunConfig(**fields, evals=tuple(evals) or ("fidelity",), overrides=overrides, override_flags=flags,
                    formats=("onnx", fmt) if fmt != "onnx" else ("onnx",),
                    latency=_latency_config(shapes, 50 if runs is None else runs, threads), gen_runs=runs,
                    max_ppl_rise=_percent(max_ppl_rise))  # fmt: skip
    folder, report = pipeline.run(cfg, progress=_Clock(), on_latency=_latency_progress())
    click.echo("")
    click.echo(pipeline.summary(report))
    click.echo(f"\nartefact and reports: {folder}/ ({', '.join(report['files'])})")


def _percent(text: str) -> float:
    """ "10%" or "10" -> 10.0 (percent)."""
    try:
        value = float(str(text).strip().rstrip("%"))
    except ValueError:
        raise CompressError(f"--max-ppl-rise {text!r}: give a percentage such as 10% or 5") from None
    if not value >= 0:
        raise CompressError(f"--max-ppl-rise {text!r} must be >= 0")
    return value


def _overrides(sets: tuple[str, ...], **named: str | None) -> tuple[tuple, tuple]:
    """(parameter, value) pairs and the option each came from: --set PARAM=VALUE and named options like --max-drop."""
    pairs, flags = [], []
    for text in sets:
        key, sep, value = text.partition("=")
        if not sep or not key.strip():
            raise CompressError(f"--set {text!r}: write PARAM=VALUE, e.g. --set steps=400")
        pairs.append((key.strip(), value.strip()))
        flags.append((key.strip(), f"--set {key.strip()}"))
    for key, value in named.items():
        if value is not None:
            pairs.append((key, value))
            flags.append((key, "--" + key.replace("_", "-")))
    return tuple(pairs), tuple(flags)


@main.command()
@click.argument("artifact", type=click.Path(path_type=Path))
@click.option("--target", default="cpu", show_default=True)
@click.option(
    "--baseline", type=click.Path(path_type=Path), help="Another .onnx/folder to time interleaved, side by side."
)
@click.option("--shapes", default="1x128,32x128", show_default=True)
@click.option("--runs", default=50, show_default=True)
@click.option("--threads", default=0, show_default=True)
@click.option("--json", "json_out", type=click.Path(path_type=Path), help="Also write the results as JSON here.")
@click.option("--estimate", is_flag=True, help="Analytic roofline from the target's profile instead of a measurement.")
@click.option("--new-tokens", default=32, show_default=True, help="Generative folders: tokens generated per timed run.")
def profile(artifact, target, baseline, shapes, runs, threads, json_out, estimate, new_tokens) -> None:
    """Measure an existing artefact folder or .onnx file on a target (or estimate it with --estimate)."""
    cfg = _latency_config(shapes, runs, threads)
    if json_out is not None and not os.access(json_out.parent if str(json_out.parent) else Path("."), os.W_OK):
        raise CompressError(
            f"cannot write --json {json_out}: its folder does not exist or is not writable "
            "(read-only file system?): choose another path"
        )
    prof = load_profile(target)
    if estimate:
        lines, data = _estimate(artifact, prof, cfg.shapes)
    else:
        res = pipeline.profile(
            ProfileRequest(artifact, prof, cfg, baseline, new_tokens), progress=_Clock(), on_latency=_latency_progress()
        )
        lines, data = res.lines, res.data
    for line in lines:
        click.echo(line)
    if json_out:
        write_text(json_out, json.dumps(data, indent=2, default=str) + "\n")


def _estimate(artifact: Path, profile, shapes) -> tuple[list[str], dict]:
    path = onnx_file(artifact)
    rows = [estimate(path, profile, s.batch, s.seq) for s in shapes]
    lines = [f"target {profile.name}: {profile.description}"]
    lines += [
        f"  {r['batch']}x{r['seq']}: {r['p50_ms']:.2f} ms [{r['source']}, {r['tool']}]  "
        f"{r['macs'] / 1e9:.2f} GMAC, {r['bytes'] / 1e6:.1f} MB moved"
        for r in rows
    ]
    lines.append("caveats:\n" + "\n".join(f"  - {c}" for c in rows[0]["caveats"]))
    data = {"target": profile.name, "estimates": rows}
    if profile.mobile:  # a phone-class target: how much of the graph NNAPI / Core ML would take (ORT Mobile)
        data["mobile_coverage"] = mobile_coverage(path)
        lines.append(f"ORT Mobile on a {profile.form_factor} (ORT's mobile usability checker; nodes the EP takes):")
        lines += [
            f"  {key:<30} {v['supported_nodes']:>5}/{v['nodes']:<5} {v['coverage_pct']:5.1f}%  "
            f"{v['partitions']:>3} partitions  {v['suitability']}"
            for key, v in data["mobile_coverage"].items()
        ]
    return lines, data


def _duration(text: str) -> float:
    """ "60m", "90s", "1.5h" or plain minutes -> seconds."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([smh]?)\s*", text or "")
    if not m or float(m.group(1)) <= 0:
        raise CompressError(f"--budget {text!r}: give a duration such as 60m, 90s or 1.5h")
    return float(m.group(1)) * {"s": 1, "m": 60, "h": 3600, "": 60}[m.group(2)]


@main.command()
@click.argument("model")
@click.option("--target", default="cpu", show_default=True, help="Device profile name or profile .toml path.")
@click.option(
    "--eval",
    "eval_spec",
    required=True,
    help="stsb:PATH: the split the search scores (even rows) and the "
    "held-out rows only the winner is scored on (odd rows), unless --holdout.",
)
@click.option("--holdout", type=click.Path(path_type=Path), help="An STS-B file for the winner's final check instead.")
@click.option("--max-drop", default=0.5, show_default=True, help="Accuracy budget: points of STS-B Spearman x100.")
@click.option("--confidence", default=0.6, show_default=True,
              help="A trial is inside the budget when its selection drop + z(confidence) x its bootstrap standard "
              "error <= --max-drop (0.5: no margin).")  # fmt: skip
@click.option("--train", help="Labelled pairs for the recovery's task loss: stsb:PATH (e.g. STS-B train).")
@click.option("--budget", default="60m", show_default=True, help="Wall time for the search (e.g. 60m, 2h).")
@click.option("--trials", default=0, show_default=True, help="Stop after this many trials (0: when the budget ends).")
@click.option("--steps", default=400, show_default=True, help="Recovery training steps per trained trial.")
@click.option(
    "--teacher",
    type=click.Choice(["tuned", "original"]),
    default="tuned",
    show_default=True,
    help="Recovery teacher with --train: the original fine-tuned on the pairs first, or the original.",
)
@click.option(
    "--storage",
    help="Optuna storage: sqlite:///study.db, postgresql://..., or journal:FILE "
    "(default: OUT.journal beside the output); rerunning with it resumes the study.",
)
@click.option("--study", help="Study name (default: derived from model, target, eval, train and steps).")
@click.option(
    "--allow-batch-dependent",
    is_flag=True,
    help="Let the winner use dynamic int8 (its embeddings depend on the batch a text is in).",
)
@click.option("--shapes", default="1x128", show_default=True, help="The latency shape BATCHxSEQ the search optimises.")
@click.option("--runs", default=30, show_default=True, help="Timed runs per latency probe.")
@click.option("--threads", default=0, show_default=True, help="ORT intra-op threads (0: physical cores).")
@click.option("--out", type=click.Path(path_type=Path), help="Output folder (default runs/MODEL-search-TARGET).")
@click.option("--force", is_flag=True, help="Replace an existing non-empty output folder.")
def search(model, target, eval_spec, holdout, max_drop, confidence, train, budget, trials, steps, teacher, storage, study,
           allow_batch_dependent, shapes, runs, threads, out, force) -> None:  # fmt: skip
    """Find the fastest compressed MODEL on a target inside an accuracy budget (multi-objective, resumable)."""
    cfg = SearchConfig(model=model, eval=eval_spec, target=target, max_drop=max_drop, holdout=holdout, train=train,
                       confidence=confidence,
                       budget_s=_duration(budget), trials=trials, steps=steps, teacher=teacher, storage=storage,
                       study=study, out=out,
                       force=force, allow_batch_dependent=allow_batch_dependent,
                       latency=_latency_config(shapes, runs, threads))  # fmt: skip
    folder, report = search_command(cfg, progress=_Clock())
    w = report["winner"]
    if w:
        click.echo(f"\nwinner: trial {w['trial']} {w['params']}: p50 {w['p50_ms']:.2f} ms ({w['ratio_fp32']:.2f}x fp32, "
                   f"{w['ratio_int8']:.2f}x ORT int8), {w['mb']:.1f} MB; held-out drop {w['heldout_drop']:+.3f} "
                   f"({'inside' if w['inside_budget'] else 'OUTSIDE'} the {max_drop} budget)")  # fmt: skip
    else:
        click.echo("\nno trained trial stayed inside the budget")
    click.echo(f"report, frontier plot and winner recipe: {folder}/")


@main.command()
def targets() -> None:
    """List device profiles and what this host can do for each: measured or estimate only."""
    click.echo(f"{'target':<18} {'kind':<5} {'this host':<14} {'latency source on its device':<28} why")
    for name in available_profiles():
        p = load_profile(name)
        mode, why = pipeline.target_status(p)
        click.echo(f"{name:<18} {p.kind:<5} {mode:<14} {p.latency_source:<28} {why}")
    click.echo("\nAdd your own: pass a profile .toml path as --target (fields: see profiles/cpu.toml).")


@main.command()
def recipes() -> None:
    """List shipped recipes and the stage types a recipe may use, with their parameters."""
    click.echo("Recipes:")
    for name in shipped_recipes():
        r = load_recipe(name)
        stages = " -> ".join(s.name for s in r.stages) or "(no stages)"
        stages += " -> genai graph" if r.export == "genai" else ""
        click.echo(f"  {name:<20} {stages:<36} {r.description}")
    click.echo("\nStage types:")
    for name, st in REGISTRY.items():
        params = ", ".join(f"{f.name}={f.default!r}" for f in dataclasses.fields(st.config))
        kinds = ", ".join(st.kinds)
        click.echo(f"  {name:<16} [{st.level}; {kinds}] {st.summary}\n  {'':<16} {params}")


@main.command("apply-delta")
@click.argument("base")
@click.argument("delta", type=click.Path(path_type=Path))
@click.option("--out", required=True, type=click.Path(path_type=Path), help="Folder for the rebuilt model.")
@click.option("--force", is_flag=True, help="Replace an existing non-empty output folder.")
def apply_delta(base, delta, out, force) -> None:
    """Rebuild a fine-tuned model from BASE plus a DELTA file (delta.safetensors written by prune.delta)."""
    res = pipeline.rebuild_from_delta(base, delta, out, force=force)
    click.echo(
        f"rebuilt {res['task']} model: {base} + {res['entries']} delta entries in {res['tensors']} tensors "
        f"({res['method']}, p={res['p']}) -> {res['out']}/ (load it with compress run {res['out']})"
    )


if __name__ == "__main__":
    main()
