"""The generative flow: decoder-only (with past) and encoder-decoder language models on the CPU.

    load -> export (optimum, + greedy-token parity gate) -> torch stages (causal LMs) -> export of the compressed
    model (+ its own greedy gate) -> int4 / 8-bit packing -> ONNX stages on each ONNX file -> the artefact still
    generates (optimum's ORTModelFor*) -> perplexity, next-token fidelity, greedy agreement -> perplexity gate (a
    compressed causal LM whose perplexity rises past --max-ppl-rise fails the run: nothing written) ->
    TTFT / tokens/s measured, original and compressed interleaved -> report.

Which stages apply comes from the registry (``kinds``); the recipe is checked before any heavy work. Language-model
text (compress.core.lm_eval): torch stages calibrate and train on the calibration sentences (shipped even lines or
--data) packed into contexts of up to 256 tokens; perplexity and fidelity are scored on other text.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import shutil
from pathlib import Path

from compress.card import generative_card
from compress.core import Progress
from compress.core.data import calibration_and_heldout, read_texts, shipped_sentences
from compress.core.errors import CompressError, first_line
from compress.core.evaluate import EvalSpec, parse_eval
from compress.core.fs import file_bytes
from compress.core.kinds import GEN_KIND_OF, GenKind, ModelKind, artifact_kind
from compress.core.lm_eval import (
    CHUNKS,
    context_length,
    next_token_fidelity,
    packed_texts,
    perplexity,
    ppl_rise,
    reference_logprobs,
    sentences_of,
    token_chunks,
)
from compress.core.models import LoadedModel, generative_task, resolve_path
from compress.flows.types import ProfileRequest, ProfileResult
from compress.report import markdown_head, versions
from compress.stages import OnnxContext, Scorer
from compress.steps import (
    GEN_RUNS,
    Run,
    apply_onnx_stages,
    apply_torch_stages,
    genai_graph,
    pack_int4_layers,
    target_section,
)
from export.genai import GENAI_CONFIG, write_genai_config
from export.genai_graph import ARCHITECTURES
from export.generative import check_generation, export_generative, greedy, load_torch, prompts_from
from export.onnx_export import copy_app_files
from profiles import DeviceProfile
from runtimes.generative import (
    GenPoint,
    GenProfileConfig,
    PrefillLogits,
    check_lengths,
    measure_generation,
    peak_rss_mb,
)
from runtimes.host import host_info

PARITY_TOKENS = 16  # greedy tokens compared per prompt
PARITY_PROMPTS = 8
FIDELITY_CHUNKS = 4  # held-out chunks for next-token KL / top-1 (LENGTH tokens each)


def _gate_float(parity, what: str) -> None:
    if not parity.passed:
        raise CompressError(
            f"{what} generates different tokens from torch ({parity.identical}/{parity.prompts} prompts "
            "identical): report this model as an export bug; nothing was written"
        )


def lm_specs(evals: tuple[str, ...], kind: GenKind) -> list[EvalSpec]:
    """The run's evals; a causal LM always gets perplexity (first, on the default text when --eval gives none)."""
    specs = [parse_eval(e, kind) for e in evals]
    if kind == "text-generation" and not any(s.kind == "ppl" for s in specs):
        specs.insert(0, EvalSpec("ppl"))
    return [s for s in specs if kind == "text-generation" or s.kind != "ppl"]


def ppl_sentences(spec: EvalSpec, heldout: list[str]) -> list[str]:
    return sentences_of(spec.path) if spec.path is not None else heldout


def ppl_text(spec: EvalSpec) -> str:
    return str(spec.path) if spec.path is not None else "held-out shipped sentences"


def lm_scorer(chunks, threads: int, text: str) -> Scorer:
    """quant.mixed's search metric for a causal LM: minus the perplexity of an ONNX file (higher is better), so a
    relative budget (--max-drop 5%) is a perplexity rise of 5%."""
    n, length = chunks.shape
    return Scorer(
        name=f"-perplexity ({n} x {length} tokens of {text})",
        score=lambda path: -perplexity(PrefillLogits(path, threads), chunks)["ppl"],
    )


def _onnx_context(run: Run, stages, lm, calibration, chunks, specs, progress) -> OnnxContext:
    c = lm.model.config
    needs = {n for s in stages for n in s.type.needs_for(s.config)}
    return OnnxContext(
        calibration=(),
        host=host_info(),
        model_type=getattr(c, "model_type", ""),
        num_heads=int(getattr(c, "num_attention_heads", 0) or 0),
        hidden_size=int(getattr(c, "hidden_size", 0) or 0),
        calibration_texts=tuple(packed_texts(lm.tokenizer, calibration, lm.max_length)),
        precisions=run.profile.precisions,
        torch_model=lm if "torch_model" in needs else None,
        scorer=lm_scorer(chunks, run.cfg.latency.threads, ppl_text(specs[0])) if "scorer" in needs else None,
        progress=progress,
        kind=run.kind,
    )


def lm_evals(specs: list[EvalSpec], tokenizer, heldout: list[str], original: Path, artifact: Path, length: int,
             threads: int, progress: Progress) -> list[dict]:  # fmt: skip
    """Perplexity (original and compressed ONNX, same chunks) and next-token fidelity on held-out text."""
    orig, comp = PrefillLogits(original, threads), PrefillLogits(artifact, threads)
    out = []
    for spec in specs:
        if spec.kind == "ppl":
            chunks = token_chunks(tokenizer, ppl_sentences(spec, heldout), CHUNKS, length)
            progress(f"perplexity on {chunks.shape[0]} x {chunks.shape[1]} tokens of {ppl_text(spec)}")
            po, pc = perplexity(orig, chunks), perplexity(comp, chunks)
            out.append({
                "name": str(spec),
                "metric": "token perplexity (lower is better)",
                "text": ppl_text(spec),
                "chunks": f"{chunks.shape[0]} x {chunks.shape[1]} tokens, each from an empty KV cache",
                "tokens": pc["tokens"],
                "original": round(po["ppl"], 4),
                "compressed": round(pc["ppl"], 4),
                "rise_percent": round(ppl_rise(po["ppl"], pc["ppl"]), 3),
                "higher_is_better": False,
            })  # fmt: skip
        elif spec.kind == "fidelity":
            chunks = token_chunks(tokenizer, heldout, FIDELITY_CHUNKS, length, seed=1)
            progress(f"next-token fidelity on {chunks.shape[0]} x {chunks.shape[1]} held-out tokens")
            fid = next_token_fidelity(reference_logprobs(orig, chunks), comp, chunks)
            out.append({
                "name": "fidelity",
                "metric": "next-token top-1 agreement with the float model (held-out shipped sentences); "
                "kl = mean KL(p_float || p_compressed) per position",
                "original": 1.0,
                "compressed": round(fid["top1"], 5),
                "kl": round(fid["kl"], 6),
                "positions": fid["positions"],
                "higher_is_better": True,
            })  # fmt: skip
    return out


def check_ppl_gate(result: dict, max_rise: float) -> None:
    """A compressed causal LM whose perplexity rises past the bound fails the run (nothing is written)."""
    rise = result["rise_percent"]
    if not rise <= max_rise:  # NaN fails too
        raise CompressError(
            f"the compressed model's perplexity {result['compressed']:.4g} is {rise:+.1f}% above the float model's "
            f"{result['original']:.4g} on {result['text']}, past the {max_rise:g}% bound: nothing was written; use a "
            "milder recipe or raise --max-ppl-rise"
        )


def gen_profile_config(shapes, runs: int, threads: int, new_tokens: int) -> GenProfileConfig:
    """The CLI's BATCHxSEQ shapes read as batch x input length."""
    return GenProfileConfig(
        points=tuple(GenPoint(s.batch, s.seq) for s in shapes), runs=runs, threads=threads, new_tokens=new_tokens
    )


def run_profile_config(cfg) -> GenProfileConfig:
    """What `compress run` times for a generative model: the run's shapes and threads, ``GEN_RUNS`` generations per
    shape and model unless --runs said otherwise."""
    runs = GEN_RUNS if cfg.gen_runs is None else cfg.gen_runs
    return gen_profile_config(cfg.latency.shapes, runs, cfg.latency.threads, cfg.new_tokens)


def genai_unsupported(config: dict) -> str | None:
    """Why onnxruntime-genai's builder graph cannot be made here for a model with this config.json (None: it can):
    an architecture ``export.genai_graph`` does not map, or onnxruntime-genai not installed."""
    if config.get("model_type") not in ARCHITECTURES:
        return f"mapped for {', '.join(ARCHITECTURES)} decoders, not {config.get('model_type')!r}: use lm-int4-eora"
    if importlib.util.find_spec("onnxruntime_genai") is None:
        return 'its model builder needs pip install "onnxruntime-genai>=0.18" (in the [lm] extra)'
    return None


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
        kind = next(k for k, v in GEN_KIND_OF.items() if v == run.kind)
        for spec in lm_specs(cfg.evals, kind):
            if spec.path is not None:
                sentences_of(spec.path)
        if not cfg.max_ppl_rise >= 0:
            raise CompressError(f"--max-ppl-rise {cfg.max_ppl_rise:g} must be >= 0 (percent of the float perplexity)")
        config = json.loads((resolve_path(cfg.model) / "config.json").read_text())
        why = genai_unsupported(config) if run.recipe.export == "genai" else None
        if why:
            raise CompressError(
                f'recipe {run.recipe.name} exports onnxruntime-genai\'s builder graph (export = "genai"): {why}'
            )
        check_lengths(config, run_profile_config(cfg))

    def run(self, run: Run, staging: Path, work: Path, progress: Progress, on_latency) -> dict:
        """Export, compress (torch stages, then every ONNX file), check the artefact still generates, score it
        (perplexity gate for causal LMs), time it against the original."""
        cfg = run.cfg
        kind = generative_task(cfg.model, cfg.task)
        path = resolve_path(cfg.model)
        progress(f"loading {cfg.model} ({kind})")
        model, tokenizer = load_torch(path, kind)
        lat_cfg = run_profile_config(cfg)
        causal = kind == "text-generation"
        length = context_length(model.config.to_dict())
        calibration, heldout = calibration_and_heldout(shipped_sentences())
        if cfg.data is not None:
            calibration = read_texts(cfg.data)
        prompts = prompts_from(heldout, PARITY_PROMPTS)
        reference = greedy(model, tokenizer, prompts, PARITY_TOKENS, scores=True)
        n_params = sum(p.numel() for p in model.parameters())  # torch stages change the model in place

        progress("exporting the original model to ONNX (optimum, with past key/values)")
        baseline_dir = work / "original"
        files = export_generative(model, tokenizer, kind, baseline_dir)
        progress("greedy generation: ONNX Runtime (optimum) vs torch")
        parity_original, _ = check_generation(model, tokenizer, baseline_dir, kind, prompts, PARITY_TOKENS, reference)
        _gate_float(parity_original, "the float ONNX export")
        parity = {"original_export": parity_original.as_dict()}

        torch_stages = [s for s in run.recipe.stages if s.type.level == "torch"]
        onnx_stages = [s for s in run.recipe.stages if s.type.level == "onnx"]
        stage_reports: list[dict] = []
        lm = LoadedModel(cfg.model, path, kind, model, tokenizer, max_length=length)  # type: ignore[arg-type]
        source_dir = baseline_dir
        side_files: list[str] = []  # what torch stages wrote into the artefact (prune.delta: delta.safetensors)
        if torch_stages:
            texts = packed_texts(tokenizer, calibration, length)
            lm, reports = apply_torch_stages(torch_stages, lm, texts, progress, artifact_dir=staging,
                                             base_model=cfg.base)  # fmt: skip
            stage_reports += [dict(r, file="(torch)") for r in reports]
            side_files = sorted(f.name for f in staging.iterdir() if f.is_file())
            progress("exporting the compressed model to ONNX and checking its greedy tokens against it in torch")
            source_dir = work / "compressed-float"
            files = export_generative(lm.model, tokenizer, kind, source_dir)
            parity_float, _ = check_generation(lm.model, tokenizer, source_dir, kind, prompts, PARITY_TOKENS)
            _gate_float(parity_float, "the float export of the compressed model")
            parity["compressed_float_export"] = parity_float.as_dict()
        n_compressed = sum(p.numel() for p in lm.model.parameters())
        current = {f.name: f for f in files}
        genai_dir = None
        if run.recipe.export == "genai":
            progress("building onnxruntime-genai's decoder graph (its model builder) holding the recipe's tables")
            genai_dir, report = genai_graph(lm, tokenizer, work, work / "genai")
            stage_reports.append(dict(report, file="model.onnx"))
            current = {"model.onnx": genai_dir / "model.onnx"}
        elif lm.int4_layers:
            progress(f"packing {len(lm.int4_layers)} layers into MatMulNBits / GatherBlockQuantized")
            (work / "packed").mkdir()
            current["model.onnx"], report = pack_int4_layers(lm, current["model.onnx"], work / "packed")
            stage_reports.append(dict(report, file="model.onnx"))

        specs = lm_specs(cfg.evals, kind)
        search_chunks = None
        if causal:
            first = next(s for s in specs if s.kind == "ppl")
            search_chunks = token_chunks(tokenizer, ppl_sentences(first, heldout), CHUNKS, length)
        ctx = _onnx_context(run, onnx_stages, lm, calibration, search_chunks, specs, progress)
        for name, f in current.items():
            if onnx_stages:
                progress(f"{name}:")
            (work / f.stem).mkdir(exist_ok=True)
            out, reports = apply_onnx_stages(onnx_stages, f, work / f.stem, ctx, progress)
            stage_reports += [dict(r, file=name) for r in reports]
            shutil.copy2(out, staging / name)
        copy_app_files(source_dir, staging)
        if genai_dir is not None:  # the builder's own config (its graph's inputs, shared KV buffer)
            shutil.copy2(genai_dir / GENAI_CONFIG, staging / GENAI_CONFIG)
            extra = [GENAI_CONFIG]
        else:
            extra = [write_genai_config(staging).name] if kind == "text-generation" else []  # onnxruntime-genai

        progress("the artefact generates (optimum ORTModelFor*): greedy tokens vs torch")
        exact = not run.recipe.stages
        parity_final, generated = check_generation(
            model, tokenizer, staging, kind, prompts, PARITY_TOKENS, reference, gated=exact, batched=genai_dir is None
        )
        if not parity_final.passed:
            raise CompressError(
                "the float artefact generates different tokens from torch: report this as an export bug"
            )
        parity["artifact"] = parity_final.as_dict()
        greedy_eval = {
            "name": "greedy",
            "metric": f"greedy-token agreement with the float model ({PARITY_TOKENS} tokens, {PARITY_PROMPTS} "
            "held-out prompts)",
            "original": 1.0,
            "compressed": parity_final.token_agreement,
            "identical_prompts": f"{parity_final.identical}/{parity_final.prompts}",
        }
        evals = [greedy_eval]
        if causal:
            evals = lm_evals(specs, tokenizer, heldout, baseline_dir / "model.onnx", staging / "model.onnx", length,
                             lat_cfg.threads, progress) + evals  # fmt: skip
            if run.recipe.stages:
                check_ppl_gate(evals[0], cfg.max_ppl_rise)

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
                "path": str(path),
                "architecture": getattr(model.config, "model_type", ""),
                "parameters": n_params,
                "parameters_compressed": n_compressed,
            },
            "task": kind,
            "target": target_section(run.profile),
            "recipe": run.recipe.as_dict(),
            "stages": stage_reports,
            "files": [f.name for f in files]
            + extra
            + side_files
            + ["report.json", "report.md", "plot.png", "README.md"],
            "artifact": {f.name: file_bytes(staging / f.name) for f in files},
            "baseline_artifact": {f.name: file_bytes(baseline_dir / f.name) for f in files},
            "parity": parity,
            "eval": evals,
            "ppl_gate": {"max_rise_percent": cfg.max_ppl_rise, "applied": causal and bool(run.recipe.stages)},
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
    for e in report["eval"]:
        if e["name"].startswith("ppl"):
            out.append(
                f"Perplexity {e['compressed']:.2f} vs {e['original']:.2f} float ({e['rise_percent']:+.1f}%) on "
                f"{e['chunks'].split(',')[0]} of {e['text']}"
                + (
                    f"; gate: at most +{report['ppl_gate']['max_rise_percent']:g}%."
                    if report["ppl_gate"]["applied"]
                    else "."
                )  # fmt: skip
            )
        elif e["name"] == "fidelity":
            out.append(
                f"Next-token fidelity on held-out text: top-1 agreement {e['compressed']:.3f}, KL {e['kl']:.4f} "
                f"over {e['positions']} positions."
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
        extra = (
            f"{e['identical_prompts']} prompts identical" if "identical_prompts" in e
            else f"{e['rise_percent']:+.2f}%, {e['chunks'].split(',')[0]}" if "rise_percent" in e
            else f"KL {e['kl']:.4f}"
        )  # fmt: skip
        lines.append(f"  {e['name']}: {e['compressed']} (original {e['original']}; {extra})")
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
    lines += lm_table(report)
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


def lm_table(report: dict) -> list[str]:
    """Accuracy beside speed, memory and size: one row per model (original, compressed)."""
    ppl = next((e for e in report["eval"] if e["name"].startswith("ppl")), None)
    fid = next((e for e in report["eval"] if e["name"] == "fidelity"), None)
    rss = report["peak_rss"]
    lat = {"original": report["baseline_latency"][0], "compressed": report["latency"][0]}
    sizes = {"original": report["baseline_artifact"], "compressed": report["artifact"]}
    lines = [
        "",
        "## Accuracy, speed, memory, size",
        "",
        f"Perplexity on {ppl['text']}: {ppl['chunks']} (compress.core.lm_eval documents the chunking)."
        if ppl
        else "No perplexity (not a causal LM).",
        "",
        "| model | perplexity | next-token top-1 / KL | greedy agreement | MB | TTFT p50 ms | tokens/s | peak RSS MB |",
        "|---|---|---|---|---|---|---|---|",
    ]
    greedy_ = next(e for e in report["eval"] if e["name"] == "greedy")
    for label in ("original", "compressed"):
        p = ppl[label] if ppl else "n/a"
        f = "1 / 0" if label == "original" else (f"{fid['compressed']:.3f} / {fid['kl']:.4f}" if fid else "n/a")
        g = 1.0 if label == "original" else greedy_["compressed"]
        r, t = rss.get(label, {}), lat[label]
        lines.append(
            f"| {label} | {p} | {f} | {g} | {sum(sizes[label].values()) / 1e6:.1f} | {t['ttft_p50_ms']:.1f} | "
            f"{t['tokens_per_s']:.1f} | {r.get('peak_mb', 'n/a')} |"
        )
    return lines


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
