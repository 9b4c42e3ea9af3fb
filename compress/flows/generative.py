"""The generative flow: decoder-only (with past) and encoder-decoder language models on the CPU.

    load -> export (optimum, + greedy-token parity gate) -> ONNX stages on each ONNX file -> the artefact still
    generates (optimum's ORTModelFor*) -> TTFT / tokens/s measured, original and compressed interleaved -> report.

Which stages apply comes from the registry (``kinds``); the recipe is checked before any heavy work.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

from compress.card import generative_card
from compress.core import Progress
from compress.core.data import calibration_and_heldout, shipped_sentences
from compress.core.errors import CompressError, first_line
from compress.core.fs import file_bytes
from compress.core.kinds import ModelKind, artifact_kind
from compress.core.models import generative_task, resolve_path
from compress.flows.types import ProfileRequest, ProfileResult
from compress.report import markdown_head, versions
from compress.stages import OnnxContext
from compress.steps import Run, apply_onnx_stages, target_section
from export.genai import write_genai_config
from export.generative import check_generation, export_generative, greedy, load_torch, prompts_from
from export.onnx_export import copy_app_files
from profiles import DeviceProfile
from runtimes.generative import GenPoint, GenProfileConfig, check_lengths, measure_generation, peak_rss_mb
from runtimes.host import host_info

PARITY_TOKENS = 16  # greedy tokens compared per prompt
PARITY_PROMPTS = 8


def gen_profile_config(shapes, runs: int, threads: int, new_tokens: int) -> GenProfileConfig:
    """The CLI's BATCHxSEQ shapes read as batch x input length."""
    return GenProfileConfig(
        points=tuple(GenPoint(s.batch, s.seq) for s in shapes), runs=runs, threads=threads, new_tokens=new_tokens
    )


class GenerativeFlow:
    name = "generative"
    levels = ("torch", "onnx")
    formats = ("onnx",)

    def accepts(self, kind: ModelKind, profile: DeviceProfile) -> bool:
        return kind in ("causal-lm", "seq2seq") and profile.kind == "cpu"

    def strict_precisions(self, profile: DeviceProfile) -> bool:
        return True

    def check(self, run: Run) -> None:
        cfg = run.cfg
        bad = [e for e in cfg.evals if e != "fidelity"]
        if bad:
            raise CompressError(
                f"--eval {bad[0]} does not apply to a generative model: use --eval fidelity "
                "(greedy-token agreement with the float model)"
            )
        config = json.loads((resolve_path(cfg.model) / "config.json").read_text())
        check_lengths(
            config, gen_profile_config(cfg.latency.shapes, cfg.latency.runs, cfg.latency.threads, cfg.new_tokens)
        )

    def run(self, run: Run, staging: Path, work: Path, progress: Progress, on_latency) -> dict:
        """Export, compress every ONNX file, check the artefact still generates, time it against the original."""
        cfg = run.cfg
        kind = generative_task(cfg.model, cfg.task)
        progress(f"loading {cfg.model} ({kind})")
        model, tokenizer = load_torch(resolve_path(cfg.model), kind)
        lat_cfg = gen_profile_config(cfg.latency.shapes, cfg.latency.runs, cfg.latency.threads, cfg.new_tokens)

        _, heldout = calibration_and_heldout(shipped_sentences())
        prompts = prompts_from(heldout, PARITY_PROMPTS)
        reference = greedy(model, tokenizer, prompts, PARITY_TOKENS, scores=True)

        progress("exporting the original model to ONNX (optimum, with past key/values)")
        baseline_dir = work / "original"
        files = export_generative(model, tokenizer, kind, baseline_dir)
        progress("greedy generation: ONNX Runtime (optimum) vs torch")
        parity_original, _ = check_generation(model, tokenizer, baseline_dir, kind, prompts, PARITY_TOKENS, reference)
        if not parity_original.passed:
            raise CompressError(
                f"the float ONNX export generates different tokens from torch ({parity_original.identical}/"
                f"{parity_original.prompts} prompts identical): report this model as an export bug; "
                "nothing was written"
            )

        c = model.config
        ctx = OnnxContext(
            calibration=(),
            host=host_info(),
            model_type=getattr(c, "model_type", ""),
            num_heads=int(getattr(c, "num_attention_heads", 0) or 0),
            hidden_size=int(getattr(c, "hidden_size", 0) or 0),
        )
        stage_reports = []
        for f in files:
            if run.recipe.stages:
                progress(f"{f.name}:")
            (work / f.stem).mkdir()
            current, reports = apply_onnx_stages(list(run.recipe.stages), f, work / f.stem, ctx, progress)
            stage_reports += [dict(r, file=f.name) for r in reports]
            shutil.copy2(current, staging / f.name)
        copy_app_files(baseline_dir, staging)
        extra = [write_genai_config(staging).name] if kind == "text-generation" else []  # onnxruntime-genai

        progress("the artefact generates (optimum ORTModelFor*): greedy tokens vs torch")
        exact = not run.recipe.stages
        parity_final, generated = check_generation(
            model, tokenizer, staging, kind, prompts, PARITY_TOKENS, reference, gated=exact
        )
        if not parity_final.passed:
            raise CompressError(
                "the float artefact generates different tokens from torch: report this as an export bug"
            )
        evals = [
            {
                "name": "fidelity",
                "metric": "greedy-token agreement with the float model (16 tokens, 8 held-out prompts)",
                "original": 1.0,
                "compressed": parity_final.token_agreement,
                "identical_prompts": f"{parity_final.identical}/{parity_final.prompts}",
            }
        ]

        points = ", ".join(str(p) for p in lat_cfg.points)
        progress(
            f"measuring TTFT and tokens/s on the CPU (batch x input length {points}; {lat_cfg.new_tokens} new "
            f"tokens; {lat_cfg.runs} runs each, original and compressed interleaved)"
        )
        lat = measure_generation({"original": baseline_dir, "compressed": staging}, lat_cfg, on_progress=on_latency)
        progress(f"peak RSS at {lat_cfg.points[0]} (fresh process per artefact)")
        rss = {label: _rss(path, lat_cfg) for label, path in (("original", baseline_dir), ("compressed", staging))}

        report = {
            "kind": "generative",
            "model": {
                "name": cfg.model,
                "path": str(resolve_path(cfg.model)),
                "architecture": getattr(c, "model_type", ""),
                "parameters": sum(p.numel() for p in model.parameters()),
            },
            "task": kind,
            "target": target_section(run.profile),
            "recipe": run.recipe.as_dict(),
            "stages": stage_reports,
            "files": [f.name for f in files] + extra + ["report.json", "report.md", "plot.png", "README.md"],
            "artifact": {f.name: file_bytes(staging / f.name) for f in files},
            "baseline_artifact": {f.name: file_bytes(f) for f in files},
            "parity": {"original_export": parity_original.as_dict(), "artifact": parity_final.as_dict()},
            "eval": evals,
            # what the artefact itself generates (greedy, via optimum): random-weight models produce gibberish
            "samples": [
                {
                    "prompt": p,
                    "artifact": tokenizer.decode(g, skip_special_tokens=False),
                    "torch": tokenizer.decode(r, skip_special_tokens=False),
                }
                for p, g, r in list(zip(prompts, generated, reference[0]))[:3]
            ],
            "latency": [dataclasses.asdict(r) for r in lat["compressed"]],
            "baseline_latency": [dataclasses.asdict(r) for r in lat["original"]],
            "peak_rss": rss,
            "host": host_info().as_dict(),
            "versions": versions(),
        }
        report["findings"] = findings(report)
        return report

    def summary(self, report: dict) -> str:
        return summary(report)

    def write(self, report: dict, folder: Path) -> None:
        (folder / "report.md").write_text(markdown(report))
        plot(
            {
                "original fp32": report["baseline_latency"],
                f"compressed ({report['recipe']['name']})": report["latency"],
            },
            folder / "plot.png",
            f"{report['model']['name']} on {report['target']['name']}: first token and throughput",
        )
        files = sorted({f.name for f in folder.iterdir() if f.is_file()} | {"README.md"})
        (folder / "README.md").write_text(generative_card(report, files))

    def profiles(self, artifact: Path, profile: DeviceProfile) -> bool:
        return profile.kind == "cpu" and artifact_kind(artifact) is not None

    def profile(self, request: ProfileRequest, progress: Progress, on_latency) -> ProfileResult:
        cfg = request.latency
        gen_cfg = gen_profile_config(cfg.shapes, cfg.runs, cfg.threads, request.new_tokens)
        kind = artifact_kind(request.artifact)
        models = {"artifact": request.artifact}
        if request.baseline is not None:
            if artifact_kind(request.baseline) != kind:
                raise CompressError(
                    f"--baseline {request.baseline} is not the same kind of generative folder as {request.artifact}"
                )
            models["baseline"] = request.baseline
        progress(
            f"measuring {', '.join(str(p) for p in models.values())} ({kind}; batch x input "
            f"{', '.join(str(p) for p in gen_cfg.points)}; {request.new_tokens} new tokens; {cfg.runs} runs each)"
        )
        res = measure_generation(models, gen_cfg, on_progress=on_latency)
        rss = {label: _rss(path, gen_cfg) for label, path in models.items()}
        host = host_info()
        data = {
            "host": host.as_dict(),
            "kind": kind,
            "peak_rss": rss,
            "latency": {k: [dataclasses.asdict(r) for r in v] for k, v in res.items()},
            "models": {k: str(v) for k, v in models.items()},
        }
        return ProfileResult([f"host: {host.summary()}", *profile_lines(res, rss)], data)


GENERATIVE = GenerativeFlow()


def _rss(folder: Path, cfg: GenProfileConfig) -> dict:
    try:
        return peak_rss_mb(folder, cfg.points[0], cfg.new_tokens, cfg.threads)
    except (RuntimeError, OSError) as e:  # a memory probe failure is reported, never fatal to the run
        return {"error": first_line(e)}


def findings(report: dict) -> list[str]:
    out = []
    for c, b in zip(report["latency"], report["baseline_latency"]):
        out.append(
            f"Batch {c['batch']} x input {c['input_len']}: TTFT {c['ttft_p50_ms']:.1f} vs {b['ttft_p50_ms']:.1f} ms "
            f"({c['ttft_p50_ms'] / b['ttft_p50_ms']:.2f}x), steady state {c['tokens_per_s']:.0f} vs "
            f"{b['tokens_per_s']:.0f} tokens/s per sequence ({c['tokens_per_s'] / b['tokens_per_s']:.2f}x), "
            "measured interleaved."
        )
    a, b = sum(report["artifact"].values()), sum(report["baseline_artifact"].values())
    out.append(
        f"Size: {a / 1e6:.1f} MB vs {b / 1e6:.1f} MB fp32 ({a / b:.2f}x) over {len(report['artifact'])} ONNX file(s)."
    )
    p = report["parity"]["artifact"]
    out.append(
        f"Greedy tokens vs torch: {p['identical']}/{p['prompts']} prompts identical over {p['new_tokens']} tokens, "
        f"agreement {p['token_agreement']:.3f}" + ("" if p["gated"] else " (recorded, not gated: compressed)") + "."
    )
    if any(s["name"].startswith("quant.") for s in report["stages"]) and not report["host"]["has_vnni"]:
        out.append(
            "This CPU has no VNNI/AMX: int8 runs on AVX2 and gains less than on VNNI or AMX CPUs; "
            "re-measure on the deployment CPU."
        )
    return out


def summary(report: dict) -> str:
    """The lines `compress run` prints for a generative run."""
    lines = [
        f"{report['model']['name']} ({report['task']}) -> {report['target']['name']} with recipe {report['recipe']['name']}"
    ]
    for c, b in zip(report["latency"], report["baseline_latency"]):
        lines.append(
            f"  {c['batch']}x{c['input_len']} (+{c['new_tokens']} tokens): TTFT p50 {c['ttft_p50_ms']:.2f} ms vs "
            f"original {b['ttft_p50_ms']:.2f} ms; {c['tokens_per_s']:.1f} vs {b['tokens_per_s']:.1f} tokens/s "
            f"per sequence [{c['source']}, {c['tool']}]"
        )
    for e in report["eval"]:
        lines.append(
            f"  {e['name']}: {e['compressed']} (original {e['original']}; {e['identical_prompts']} prompts identical)"
        )
    a, b = sum(report["artifact"].values()), sum(report["baseline_artifact"].values())
    lines.append(f"  size: {a / 1e6:.1f} MB (original {b / 1e6:.1f} MB)")
    return "\n".join(lines)


def latency_table(rows: dict[str, list]) -> list[str]:
    """Markdown rows of GenLatency dicts, one line per (label, point)."""
    lines = [
        "| model | batch x input | new tokens | TTFT p50 ms | TTFT p90 ms | decode ms/step | tokens/s (per seq) | "
        "tokens/s (batch) | runs | threads | source |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    return lines + [
        f"| {label} | {r['batch']}x{r['input_len']} | {r['new_tokens']} | {r['ttft_p50_ms']:.2f} | "
        f"{r['ttft_p90_ms']:.2f} | {r['decode_ms_per_step_p50']:.2f} | {r['tokens_per_s']:.1f} | "
        f"{r['tokens_per_s_batch']:.1f} | {r['runs']} | {r['threads']} | {r['source']} ({r['tool']}) |"
        for label, rs in rows.items()
        for r in rs
    ]


def markdown(report: dict) -> str:
    recipe, model = report["recipe"], report["model"]
    lines = markdown_head(
        f"Compression report: {model['name']} ({report['task']}) -> {report['target']['name']}",
        f"Recipe `{recipe['name']}` ({recipe['description']}); {model['parameters'] / 1e6:.2f} M "
        f"parameters; host {report['host']['cpu_model']}.",
        report["findings"],
    )
    lines += [
        "",
        "## Generation latency (source: measured, ONNX Runtime CPU EP, original and compressed interleaved)",
        "",
        "TTFT: input ids to the first token (decoder-only: prefill; encoder-decoder: encoder + first decoder step). "
        "Tokens/s: steady-state decode steps with the KV cache. Tokenization not included.",
        "",
    ]
    lines += latency_table({"original": report["baseline_latency"], "compressed": report["latency"]})
    rss = report["peak_rss"]
    lines += [
        "",
        "## Peak memory (fresh process per artefact, VmHWM)",
        "",
        "| model | peak MB | process baseline MB | model MB |",
        "|---|---|---|---|",
    ]
    for label, r in rss.items():
        lines.append(
            f"| {label} | {r.get('peak_mb', 'n/a')} | {r.get('baseline_mb', 'n/a')} | {r.get('model_mb', r.get('error', ''))} |"
        )
    lines += [
        "",
        "## Greedy generation vs torch",
        "",
        "| check | identical prompts | token agreement | ties | gate |",
        "|---|---|---|---|---|",
    ]
    for name, p in report["parity"].items():
        gate = f"{'pass' if p['passed'] else 'FAIL'}" if p["gated"] else "recorded"
        lines.append(
            f"| {name} | {p['identical']}/{p['prompts']} | {p['token_agreement']:.3f} | {p['ties']} | {gate} |"
        )
    lines += ["", "Greedy samples (artefact via optimum vs torch float):", ""]
    lines += [f"- `{s['prompt']}` -> artefact `{s['artifact']!r}`; torch `{s['torch']!r}`" for s in report["samples"]]
    lines += ["", "## Stages", "", "| file | stage | seconds | metrics |", "|---|---|---|---|"]
    for s in report["stages"]:
        lines.append(f"| {s['file']} | {s['name']} | {s['seconds']} | `{json.dumps(s['metrics'])}` |")
    if not report["stages"]:
        lines.append("| | (none) | | |")
    lines += ["", "## Artefact", "", "| file | bytes | fp32 bytes |", "|---|---|---|"]
    for name, n in report["artifact"].items():
        lines.append(f"| {name} | {n:,} | {report['baseline_artifact'][name]:,} |")
    lines += [
        "",
        "Loads unchanged in optimum.onnxruntime."
        f"{'ORTModelForCausalLM' if report['task'] == 'text-generation' else 'ORTModelForSeq2SeqLM'}.",
        "",
        "Versions: " + ", ".join(f"{k} {v}" for k, v in report["versions"].items()),
        "",
    ]
    return "\n".join(lines)


def plot(rows: dict[str, list], path: Path, title: str) -> None:
    """TTFT (left) and steady-state tokens/s per sequence (right) per batch x input length, one bar per label."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    labels = list(rows)
    points = [f"{r['batch']}x{r['input_len']}" for r in rows[labels[0]]]
    x = np.arange(len(points))
    width = 0.8 / len(labels)
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), dpi=120)
    for i, label in enumerate(labels):
        axes[0].bar(x + i * width, [r["ttft_p50_ms"] for r in rows[label]], width, label=label)
        axes[1].bar(x + i * width, [r["tokens_per_s"] for r in rows[label]], width, label=label)
    for ax, ylabel in zip(axes, ("TTFT p50 (ms, measured)", "steady-state tokens/s per sequence (measured)")):
        ax.set_xticks(x + width * (len(labels) - 1) / 2, points)
        ax.set_xlabel("batch x input length")
        ax.set_ylabel(ylabel)
        ax.grid(axis="y", alpha=0.3)
    axes[0].set_yscale("log")
    axes[0].legend(fontsize=7)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def profile_lines(res: dict, rss: dict) -> list[str]:
    lines = [
        f"{'model':<10} {'batch x in':>10} {'new':>4} {'TTFT p50 ms':>12} {'TTFT p90 ms':>12} {'ms/step':>8} "
        f"{'tok/s':>8} {'tok/s batch':>11}  source"
    ]
    for label, rows in res.items():
        for r in rows:
            lines.append(
                f"{label:<10} {r.batch:>5}x{r.input_len:<4} {r.new_tokens:>4} {r.ttft_p50_ms:>12.2f} "
                f"{r.ttft_p90_ms:>12.2f} {r.decode_ms_per_step_p50:>8.2f} {r.tokens_per_s:>8.1f} "
                f"{r.tokens_per_s_batch:>11.1f}  {r.source} ({r.tool}, {r.threads} threads)"
            )
    for label, r in rss.items():
        if "peak_mb" in r:
            lines.append(
                f"peak RSS {label}: {r['peak_mb']} MB ({r['model_mb']} MB above the bare process) at "
                f"{r['batch']}x{r['input_len']} [{r['source']}, {r['tool']}]"
            )
        else:
            lines.append(f"peak RSS {label}: n/a ({r['error']})")
    lines.append(
        "TTFT = input ids to first token (decoder-only: prefill; encoder-decoder: encoder + first decoder "
        "step); tok/s = steady-state decode with KV cache; tokenization not included"
    )
    return lines
