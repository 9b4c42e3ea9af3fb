"""Decoder-only vs encoder-decoder at matched parameter count on this CPU: first-token latency (TTFT) and
steady-state tokens/s vs input length, fp32 and int8.

    flock /tmp/edge-bench.lock python benchmarks/generative.py [--runs 5] [--new-tokens 32]

Models (random weights from published configs, compress/random_lm.py; latency does not depend on the weights):
``gpt2-narrow`` (GPT-2 small's architecture at t5-small's width and vocabulary, 14 layers) and ``t5-small``.
Each is exported by optimum with past key/values (export/generative.py), checked for greedy-token parity against
torch, quantized with the `dynamic-int8` recipe's stage on every ONNX file, and all four variants are timed
interleaved round by round (runtimes/generative.py). Writes benchmarks/results/generative.{json,md,png}.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import tempfile
import time
from pathlib import Path

from _results import RESULTS, save

from compress.cli import _quiet_libraries

PAPER = (
    "Return of the Encoder (../shared/notes/algorithms.md): encoder-decoder SLMs 47% lower first-token latency "
    "and 4.7x throughput vs decoder-only at <= 1B parameters, on GPU, CPU and NPU edge devices"
)


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def build_variants(names: list[str], work: Path, parity_prompts: list[str]) -> tuple[dict, dict]:
    """Export every model (fp32) and its int8 version; returns ({label: folder}, {model: facts})."""
    import shutil

    import torch

    from compress import random_lm
    from compress.core.kinds import generative_kind
    from compress.recipe import load_recipe
    from compress.stages import OnnxContext
    from compress.steps import apply_onnx_stages
    from export.generative import check_generation, export_generative
    from export.onnx_export import copy_app_files
    from runtimes.host import host_info

    recipe = load_recipe("dynamic-int8")
    folders, facts = {}, {}
    for name in names:
        t0 = time.perf_counter()
        model, tok = random_lm.build(name)
        kind = generative_kind(
            {
                "architectures": model.config.architectures or [type(model).__name__],
                "is_encoder_decoder": model.config.is_encoder_decoder,
            }
        )
        n_params = sum(p.numel() for p in model.parameters())
        log(f"{name}: {n_params / 1e6:.1f} M parameters ({kind}); exporting with optimum")
        fp32 = work / f"{name}-fp32"
        files = export_generative(model, tok, kind, fp32)
        with torch.inference_mode():
            parity, _ = check_generation(model, tok, fp32, kind, parity_prompts, new_tokens=8)
        log(f"{name}: greedy tokens ORT vs torch: {parity.identical}/{parity.prompts} identical, {parity.ties} ties")
        int8 = work / f"{name}-int8"
        int8.mkdir()
        ctx = OnnxContext(
            calibration=(), host=host_info(), model_type=model.config.model_type, num_heads=0, hidden_size=0
        )
        stage_metrics = {}
        for f in files:
            log(f"{name}: quant.dynamic on {f.name}")
            (work / f"{name}-{f.stem}").mkdir()
            out, reports = apply_onnx_stages(list(recipe.stages), f, work / f"{name}-{f.stem}", ctx)
            shutil.copy2(out, int8 / f.name)
            stage_metrics[f.name] = reports[0]["metrics"]
        copy_app_files(fp32, int8)
        with torch.inference_mode():
            parity8, _ = check_generation(model, tok, int8, kind, parity_prompts, new_tokens=8, gated=False)
        cfg = model.config.to_dict()
        keep = (
            "model_type",
            "vocab_size",
            "n_embd",
            "n_layer",
            "n_head",
            "n_inner",
            "n_positions",
            "d_model",
            "d_kv",
            "d_ff",
            "num_layers",
            "num_decoder_layers",
            "num_heads",
            "feed_forward_proj",
            "tie_word_embeddings",
        )
        facts[name] = {
            "kind": kind,
            "parameters": n_params,
            "config": {k: cfg[k] for k in keep if k in cfg},
            "fp32_bytes": {f.name: f.stat().st_size for f in files},
            "int8_bytes": {f.name: (int8 / f.name).stat().st_size for f in files},
            "parity_fp32": parity.as_dict(),
            "parity_int8_vs_torch": parity8.as_dict(),
            "int8_stage": stage_metrics,
            "build_seconds": round(time.perf_counter() - t0, 1),
        }
        folders[f"{name} fp32"], folders[f"{name} int8"] = fp32, int8
        del model
    return folders, facts


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", default="gpt2-narrow,t5-small", help="decoder-only first, encoder-decoder second")
    ap.add_argument("--input-lens", default="32,128,512")
    ap.add_argument("--batch", type=int, default=4, help="the larger batch, timed at input length 128 (0: skip)")
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument(
        "--long-tokens", type=int, default=128, help="output-length sweep: this many tokens at 1x128 (0: skip)"
    )
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--name", default="generative", help="results file stem (smoke tests: another name)")
    ap.add_argument(
        "--replot", action="store_true", help="Rewrite results/NAME.md and .png from results/NAME.json only."
    )
    args = ap.parse_args()
    if args.replot:
        save(args.name, json.loads((RESULTS / f"{args.name}.json").read_text()), table, plot)
        return
    _quiet_libraries()
    import torch

    from compress.core.data import calibration_and_heldout, shipped_sentences
    from compress.report import versions
    from export.generative import prompts_from
    from runtimes.generative import GenPoint, GenProfileConfig, measure_generation, peak_rss_mb
    from runtimes.host import host_info

    torch.set_num_threads(max(1, args.threads or host_info().physical_cores))
    t_start, load_start = time.perf_counter(), os.getloadavg()
    names = args.models.split(",")
    lens = [int(x) for x in args.input_lens.split(",")]
    points = tuple(GenPoint(1, n) for n in lens) + ((GenPoint(args.batch, 128),) if args.batch else ())
    prompts = prompts_from(calibration_and_heldout(shipped_sentences())[1], 4)
    with tempfile.TemporaryDirectory(prefix="bench-generative-") as tmp:
        folders, facts = build_variants(names, Path(tmp), prompts)
        cfg = GenProfileConfig(points=points, new_tokens=args.new_tokens, runs=args.runs, threads=args.threads)
        log(
            f"timing {', '.join(folders)} interleaved: batch x input {', '.join(map(str, points))}, "
            f"{args.new_tokens} new tokens, {args.runs} runs each"
        )
        lat = measure_generation(folders, cfg, on_progress=lambda d, t: log(f"  round {d}/{t}"))
        long = {}
        if args.long_tokens:
            lcfg = dataclasses.replace(cfg, points=(GenPoint(1, 128),), new_tokens=args.long_tokens)
            log(f"output-length sweep: {args.long_tokens} new tokens at 1x128")
            long = measure_generation(folders, lcfg, on_progress=lambda d, t: log(f"  round {d}/{t}"))
        rss_point = GenPoint(1, max(lens))
        rss = {}
        for label, folder in folders.items():
            log(f"peak RSS {label} at {rss_point}")
            rss[label] = peak_rss_mb(folder, rss_point, args.new_tokens, args.threads)
    out = {
        "command": "flock /tmp/edge-bench.lock python benchmarks/generative.py " + " ".join(sys.argv[1:]),
        "decoder_only": names[0],
        "encoder_decoder": names[1],
        "models": facts,
        "latency": {k: [dataclasses.asdict(r) for r in v] for k, v in lat.items()},
        "long_output": {k: [dataclasses.asdict(r) for r in v] for k, v in long.items()},
        "peak_rss": rss,
        "host": host_info().as_dict(),
        "versions": versions(),
        "paper_claim": PAPER,
        "seconds": round(time.perf_counter() - t_start, 1),
        # the machine is shared: 1-minute load average at start and end (2 cores here), for the reader
        "load_avg_1min": [round(load_start[0], 2), round(os.getloadavg()[0], 2)],
    }
    out["comparison"] = comparison(out)
    save(args.name, out, table, plot)


def _row(out: dict, label: str, batch: int, input_len: int, key: str = "latency") -> dict:
    return next(r for r in out[key][label] if r["batch"] == batch and r["input_len"] == input_len)


def comparison(out: dict) -> list[dict]:
    """Encoder-decoder / decoder-only ratios at every point, fp32 and int8 (from the measured rows only)."""
    dec, enc = out["decoder_only"], out["encoder_decoder"]
    rows = []
    for prec in ("fp32", "int8"):
        for r in out["latency"][f"{dec} {prec}"]:
            e = _row(out, f"{enc} {prec}", r["batch"], r["input_len"])
            rows.append(
                {
                    "precision": prec,
                    "batch": r["batch"],
                    "input_len": r["input_len"],
                    "ttft_ratio": round(e["ttft_p50_ms"] / r["ttft_p50_ms"], 3),
                    "throughput_ratio": round(e["tokens_per_s"] / r["tokens_per_s"], 3),
                }
            )
    return rows


def table(out: dict) -> str:
    dec, enc = out["decoder_only"], out["encoder_decoder"]
    m = out["models"]
    lines = [
        "# Generative models: decoder-only vs encoder-decoder at matched size (CPU)",
        "",
        f"Command: `{out['command']}` ({out['seconds'] / 60:.1f} min). Host: {out['host']['cpu_model']}, "
        f"{out['host']['physical_cores']} cores, onnxruntime {out['host']['onnxruntime']} CPU EP, "
        f"VNNI {'yes' if out['host']['has_vnni'] else 'no'}. Random weights from published configs "
        "(latency does not depend on the values); all variants timed interleaved, round by round."
        + (
            f" Shared machine: 1-min load average {out['load_avg_1min'][0]} at start, {out['load_avg_1min'][1]} at end."
            if "load_avg_1min" in out
            else ""
        ),
        "",
        "| model | kind | parameters | config | fp32 MB | int8 MB | greedy tokens = torch: fp32 (gated) | int8 (recorded) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name in (dec, enc):
        f = m[name]
        p, q = f["parity_fp32"], f["parity_int8_vs_torch"]
        lines.append(
            f"| {name} | {f['kind']} | {f['parameters'] / 1e6:.1f} M | `{json.dumps(f['config'])}` | "
            f"{sum(f['fp32_bytes'].values()) / 1e6:.0f} | {sum(f['int8_bytes'].values()) / 1e6:.0f} | "
            f"{p['identical']}/{p['prompts']} ({p['ties']} ties) | {q['identical']}/{q['prompts']} |"
        )
    lines += [
        "",
        f"TTFT = input ids to first token ({dec}: prefill; {enc}: encoder + first decoder step). tokens/s = "
        f"steady-state decode with the KV cache, per sequence; {out['latency'][dec + ' fp32'][0]['new_tokens']} "
        "new tokens per run; p50 over the runs. Tokenization not included.",
        "",
        "| precision | batch x input | TTFT "
        + dec
        + " ms | TTFT "
        + enc
        + " ms | TTFT enc-dec / dec | tokens/s "
        + dec
        + " | tokens/s "
        + enc
        + " | throughput enc-dec / dec |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for c in out["comparison"]:
        d = _row(out, f"{dec} {c['precision']}", c["batch"], c["input_len"])
        e = _row(out, f"{enc} {c['precision']}", c["batch"], c["input_len"])
        lines.append(
            f"| {c['precision']} | {c['batch']}x{c['input_len']} | {d['ttft_p50_ms']:.1f} | {e['ttft_p50_ms']:.1f} | "
            f"**{c['ttft_ratio']:.2f}** | {d['tokens_per_s']:.1f} | {e['tokens_per_s']:.1f} | **{c['throughput_ratio']:.2f}** |"
        )
    lines += [
        "",
        "int8 (dynamic, per-channel, every ONNX file) vs fp32 of the same model:",
        "",
        "| model | batch x input | TTFT int8 / fp32 | tokens/s int8 / fp32 |",
        "|---|---|---|---|",
    ]
    for name in (dec, enc):
        for r in out["latency"][f"{name} fp32"]:
            q = _row(out, f"{name} int8", r["batch"], r["input_len"])
            lines.append(
                f"| {name} | {r['batch']}x{r['input_len']} | {q['ttft_p50_ms'] / r['ttft_p50_ms']:.2f} | "
                f"{q['tokens_per_s'] / r['tokens_per_s']:.2f} |"
            )
    if out["long_output"]:
        n_short, n_long = (
            out["latency"][dec + " fp32"][0]["new_tokens"],
            out["long_output"][dec + " fp32"][0]["new_tokens"],
        )
        lines += [
            "",
            f"Output length (1x128): steady-state tokens/s with {n_short} vs {n_long} new tokens (the KV cache grows):",
            "",
            f"| variant | tokens/s ({n_short} new) | tokens/s ({n_long} new) |",
            "|---|---|---|",
        ]
        for label, rows in out["long_output"].items():
            short = next((r for r in out["latency"][label] if r["batch"] == 1 and r["input_len"] == 128), None)
            lines.append(
                f"| {label} | {short['tokens_per_s'] if short else float('nan'):.1f} | {rows[0]['tokens_per_s']:.1f} |"
            )
    lines += [
        "",
        "Peak RSS (fresh process, VmHWM, generating at the longest input):",
        "",
        "| variant | peak MB | above bare process MB |",
        "|---|---|---|",
    ]
    for label, r in out["peak_rss"].items():
        lines.append(f"| {label} | {r['peak_mb']} | {r['model_mb']} |")
    ttft = [c["ttft_ratio"] for c in out["comparison"] if c["batch"] == 1]
    thr = [c["throughput_ratio"] for c in out["comparison"] if c["batch"] == 1]
    lines += [
        "",
        f"Paper: {out['paper_claim']}.",
        f"Here (batch 1, fp32 and int8): encoder-decoder TTFT is {min(ttft):.2f}-{max(ttft):.2f}x the decoder-only's "
        f"({_pct(min(ttft))} to {_pct(max(ttft))}), steady-state throughput {min(thr):.2f}-{max(thr):.2f}x.",
        "",
    ]
    return "\n".join(lines)


def _pct(ratio: float) -> str:
    return f"{abs(1 - ratio) * 100:.0f}% {'lower' if ratio < 1 else 'higher'}"


def plot(out: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), dpi=120)
    colors = {out["decoder_only"]: "tab:red", out["encoder_decoder"]: "tab:blue"}
    for label, rows in out["latency"].items():
        name, prec = label.rsplit(" ", 1)
        b1 = [r for r in rows if r["batch"] == 1]
        style = dict(
            color=colors[name], linestyle="-" if prec == "fp32" else "--", marker="o" if prec == "fp32" else "s"
        )
        axes[0].plot([r["input_len"] for r in b1], [r["ttft_p50_ms"] for r in b1], label=label, **style)
        axes[1].plot([r["input_len"] for r in b1], [r["tokens_per_s"] for r in b1], label=label, **style)
    for ax, ylabel in zip(
        axes, ("time to first token, p50 (ms, measured)", "steady-state tokens/s, batch 1 (measured)")
    ):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("input length (tokens), batch 1")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
    axes[0].set_yscale("log")
    axes[0].legend(fontsize=8)
    m = out["models"]
    fig.suptitle(
        f"{out['decoder_only']} ({m[out['decoder_only']]['parameters'] / 1e6:.0f} M) vs {out['encoder_decoder']} "
        f"({m[out['encoder_decoder']]['parameters'] / 1e6:.0f} M) on {out['host']['cpu_model']}, ORT CPU EP",
        fontsize=10,
    )
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


if __name__ == "__main__":
    main()
