"""Delta pruning of a causal LM: SmolLM2-135M (the embedded ``smollm2``) fine-tuned briefly on STS-B train sentences,
then its delta pruned by ``compress run FT --base smollm2 --recipe delta-90``; perplexity of base, fine-tuned and
pruned models, the delta's size, and the time of each step.

    python benchmarks/delta_lm.py                                   # smollm2, 80 steps; writes results/delta-lm.*
    python benchmarks/delta_lm.py --recipe delta-99-darex --name delta-lm-99
    python benchmarks/delta_lm.py --base runs/llama-tiny --steps 3 --ppl-chunks 2 --name check --results /tmp/r \
        --run-args "--runs 1 --shapes 1x16 --new-tokens 4"        # a quick check of the script on a tiny Llama
    python benchmarks/delta_lm.py --base BASE --model FINE_TUNED    # prune an existing fine-tune of BASE instead

1. Fine-tune (unless --model): the base (``load_model(BASE, "text-generation")``) on STS-B train sentences
   (../shared/data/stsb/sts-train.csv, sentences 1 and 2 of every row, shuffled with seed 0, newline-joined, cut into
   --seq-token chunks: ``compress.core.lm_eval.token_chunks``), next-token loss, AdamW lr --lr (1e-5), no weight
   decay (entries without a gradient keep Δ = 0), batch --batch (4), --steps (80) steps, torch threads from
   ``compress.stages.distil.training_threads`` (one thread when the host is loaded). Skipped cleanly (exit 0, a line
   saying why) when the STS-B train file is absent.
2. ``compress run FT --base BASE --recipe R --eval ppl:DEV`` in a subprocess (the command a user runs), DEV =
   sts-dev.csv (held out of the fine-tune; the shipped held-out sentences when absent): the run's own perplexity
   gate applies, and its report gives the ONNX perplexity of the fine-tuned and pruned models.
3. ``compress apply-delta BASE delta.safetensors`` (subprocess) rebuilds the pruned model; the same stage run in
   this process (same seed) must give the same delta file byte for byte and the rebuilt weights exactly.
4. Torch perplexity of base, fine-tuned and rebuilt pruned model on the same chunks of DEV (lm_eval: --ppl-chunks
   x 256 tokens). Writes RESULTS/NAME.{json,md}; refuses to overwrite them without --force.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# ../shared beside the checkout (a worktree sits one level deeper: look upwards), as tests/conftest.py does
STSB = next((p / "shared" / "data" / "stsb" for p in REPO.parents if (p / "shared").is_dir()), REPO.parent / "shared")
RESULTS = Path(__file__).parent / "results"


def cli(*args: str) -> tuple[float, str]:
    """Run ``python -m compress.cli ARGS`` (this checkout first on the path); (seconds, output). Fails loudly."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep))
    t0 = time.perf_counter()
    res = subprocess.run([sys.executable, "-m", "compress.cli", *args], capture_output=True, text=True, env=env)
    if res.returncode != 0:
        sys.exit(f"compress {' '.join(args)} failed ({res.returncode}):\n{res.stdout[-3000:]}{res.stderr[-3000:]}")
    return time.perf_counter() - t0, res.stdout


def fine_tune(lm, sentences: list[str], steps: int, batch: int, seq: int, lr: float, seed: int) -> dict:
    """Next-token loss on chunks of the sentences, in place; returns what was done."""
    import torch

    from compress.core.lm_eval import token_chunks
    from compress.stages.distil import training_threads

    chunks = torch.from_numpy(token_chunks(lm.tokenizer, sentences, steps * batch, seq, seed=seed))
    steps = min(steps, len(chunks) // batch)
    torch.manual_seed(seed)
    opt = torch.optim.AdamW(lm.model.parameters(), lr=lr, weight_decay=0.0)
    losses = []
    lm.model.train()
    t0 = time.perf_counter()
    with training_threads() as threads:
        for step in range(steps):
            ids = chunks[step * batch : (step + 1) * batch]
            loss = lm.model(input_ids=ids, labels=ids, use_cache=False).loss
            loss.backward()
            opt.step()
            opt.zero_grad()
            losses.append(loss.item())
            if (step + 1) % 10 == 0 or step + 1 == steps:
                print(f"  train step {step + 1}/{steps}  loss {sum(losses[-10:]) / len(losses[-10:]):.4f}  "
                      f"{time.perf_counter() - t0:.0f}s", flush=True)  # fmt: skip
    lm.model.eval()
    return {
        "steps": steps,
        "batch": batch,
        "seq": seq,
        "lr": lr,
        "threads": threads,
        "weight_decay": 0.0,
        "tokens": steps * batch * seq,
        "first_loss": round(losses[0], 4) if losses else None,
        "final_loss": round(sum(losses[-10:]) / max(len(losses[-10:]), 1), 4) if losses else None,
        "seconds": round(time.perf_counter() - t0, 1),
    }


def markdown(res: dict) -> str:
    t, p, d, gate = res["train"], res["ppl"], res["delta"], res["run"]["ppl_onnx"]
    fine = (
        f"{t['steps']} steps of {t['batch']} x {t['seq']} tokens of STS-B train sentences, AdamW lr {t['lr']}, "
        f"no weight decay, {t['threads']} thread(s), {t['seconds']:.0f} s, loss {t['first_loss']} -> {t['final_loss']}"
        if "steps" in t
        else f"given: {t['given']}"
    )
    q = f"{res['run']['q']:.4g}" if res["run"]["q"] is not None else "- (no rescale)"
    kept = f"{d['kept_fraction'] * 100:.2f} % of the changed entries kept" if d["kept_fraction"] is not None else ""
    lines = [
        f"# Delta pruning of a causal LM: `{res['base']}` fine-tuned, `{res['recipe']}`",
        "",
        f"Command: `{res['command']}`  ",
        f"Host: {res['host']}; torch {res['versions']['torch']}; {res['seconds_total']:.0f} s in all.",
        "",
        f"Fine-tune: {fine}.",
        f"Delta: mean |Δ| {d['mean_abs_delta']:.3g}, max |Δ| {d['max_abs_delta']:.3g}, "
        f"{d['changed_fraction'] * 100:.1f} % of the entries changed; {kept}; `delta.safetensors` "
        f"{d['delta_bytes'] / 1e6:.2f} MB = {d['delta_size_pct']:.2f} % of the fp32 model.",
        "",
        f"Perplexity (torch, {p['chunks']} of {p['text']}; lower is better):",
        "",
        "| model | perplexity | vs fine-tuned |",
        "|---|---|---|",
        f"| base (`{res['base']}`) | {p['base']:.3f} | {100 * (p['base'] / p['finetuned'] - 1):+.2f} % |",
        f"| fine-tuned | {p['finetuned']:.3f} | - |",
        f"| pruned ({res['recipe']}, rebuilt by apply-delta) | {p['pruned']:.3f} | "
        f"{100 * (p['pruned'] / p['finetuned'] - 1):+.2f} % |",
        "",
        f"`compress run` ({res['run']['seconds']:.0f} s, stage {res['run']['stage_seconds']} s): ONNX perplexity "
        f"{gate['compressed']} vs {gate['original']} fine-tuned ({gate['rise_percent']:+.2f} %, gate "
        f"+{res['run']['max_ppl_rise']:g} %), q = {q}.",
        f"`compress apply-delta`: {res['apply_delta']['seconds']:.0f} s; same delta file from the stage in-process: "
        f"{res['apply_delta']['same_file']}; rebuilt weights identical: {res['apply_delta']['identical']} "
        f"(max abs diff {res['apply_delta']['max_abs_diff']}).",
    ]
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--base", default="smollm2", help="the base model: smollm2 or a causal LM folder")
    ap.add_argument("--model", type=Path, help="an existing fine-tune of --base to prune (skips the fine-tune)")
    ap.add_argument("--recipe", default="delta-90")
    ap.add_argument("--steps", type=int, default=80)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--lr", type=float, default=1e-5)
    ap.add_argument("--run-args", default="", help="more compress run options, e.g. '--runs 3 --shapes 1x64'")
    ap.add_argument("--ppl-chunks", type=int, default=15, help="perplexity chunks of 256 tokens (lm_eval's default)")
    ap.add_argument("--stsb", type=Path, default=STSB, help="folder holding sts-train.csv (and sts-dev.csv)")
    ap.add_argument("--work", type=Path, default=REPO / "runs" / "delta-lm", help="fine-tuned model, run, rebuild")
    ap.add_argument("--name", default="delta-lm", help="results go to RESULTS/NAME.{json,md}")
    ap.add_argument("--results", type=Path, default=RESULTS)
    ap.add_argument("--force", action="store_true", help="overwrite existing results and work folders")
    args = ap.parse_args()
    out_json, out_md = args.results / f"{args.name}.json", args.results / f"{args.name}.md"
    if not args.force and (out_json.exists() or out_md.exists()):
        sys.exit(f"{out_json} exists: pass --force to overwrite it or another --name")
    train_path, dev_path = args.stsb / "sts-train.csv", args.stsb / "sts-dev.csv"
    if args.model is None and not train_path.is_file():
        print(f"skipped: STS-B train sentences not found at {train_path} (pass --stsb FOLDER or --model FINE_TUNED)")
        return

    from compress.cli import _quiet_libraries

    _quiet_libraries()
    import torch

    from compress.core.data import calibration_and_heldout, shipped_sentences
    from compress.core.lm_eval import packed_texts, perplexity, sentences_of, token_chunks
    from compress.core.models import causal_logits, load_model
    from compress.recipe import load_recipe
    from compress.stages.delta_io import delta_tensors
    from compress.steps import apply_torch_stages
    from runtimes.host import host_info

    t_start = time.perf_counter()
    lm_task = "text-generation"
    calibration, heldout = calibration_and_heldout(shipped_sentences())
    ppl_text = dev_path if dev_path.is_file() else None
    ppl_sentences = sentences_of(ppl_text) if ppl_text else heldout
    args.work.mkdir(parents=True, exist_ok=True)

    base = load_model(args.base, lm_task)
    chunks = token_chunks(base.tokenizer, ppl_sentences, args.ppl_chunks, base.max_length)
    ppl = lambda lm: round(perplexity(causal_logits(lm), chunks)["ppl"], 4)
    print(f"perplexity on {chunks.shape[0]} x {chunks.shape[1]} tokens of {ppl_text or 'held-out shipped sentences'}")
    base_ppl = ppl(base)
    print(f"base {args.base}: perplexity {base_ppl}", flush=True)
    if args.model is None:
        ft_dir = args.work / "ft"
        print(f"fine-tuning {args.base} on {train_path} ...", flush=True)
        train = fine_tune(base, sentences_of(train_path), args.steps, args.batch, args.seq, args.lr, seed=0)
        base.model.save_pretrained(ft_dir)
        base.tokenizer.save_pretrained(ft_dir)
    else:
        ft_dir, train = args.model, {"given": str(args.model)}
    del base
    ft = load_model(str(ft_dir), lm_task)
    ft_ppl = ppl(ft)
    print(f"fine-tuned: perplexity {ft_ppl}", flush=True)

    out = args.work / "run"
    run_args = ["run", str(ft_dir), "--base", args.base, "--recipe", args.recipe, "--out", str(out), "--force"]
    run_args += (["--eval", f"ppl:{ppl_text}"] if ppl_text else []) + args.run_args.split()
    print("compress " + " ".join(run_args), flush=True)
    run_seconds, run_output = cli(*run_args)
    print(run_output, flush=True)
    report = json.loads((out / "report.json").read_text())
    stage = next(s for s in report["stages"] if s["name"] == "prune.delta")
    m = stage["metrics"]

    rebuilt = args.work / "rebuilt"
    apply_seconds, _ = cli("apply-delta", args.base, str(out / "delta.safetensors"), "--out", str(rebuilt), "--force")
    # the same stage in this process: the same file byte for byte, and the weights apply-delta rebuilt
    direct = args.work / "direct"
    direct.mkdir(exist_ok=True)
    texts = packed_texts(ft.tokenizer, calibration, ft.max_length)
    pruned, _ = apply_torch_stages(
        list(load_recipe(args.recipe).stages), ft, texts, artifact_dir=direct, base_model=args.base
    )
    again = load_model(str(rebuilt), lm_task)
    a, b = delta_tensors(again.model), delta_tensors(pruned.model)
    diff = max(float((a[n].float() - b[n].float()).abs().max()) for n in b) if a.keys() == b.keys() else None
    pruned_ppl = ppl(again)
    print(f"pruned (rebuilt): perplexity {pruned_ppl}", flush=True)

    ppl_eval = next(e for e in report["eval"] if e["name"].startswith("ppl"))
    res = {
        "command": "python " + shlex.join(["benchmarks/delta_lm.py"] + sys.argv[1:]),
        "host": host_info().summary(),
        "versions": {"torch": torch.__version__, "python": platform.python_version()},
        "base": args.base,
        "recipe": args.recipe,
        "train": train,
        "ppl": {
            "text": str(ppl_text or "held-out shipped sentences"),
            "chunks": f"{chunks.shape[0]} x {chunks.shape[1]} tokens",
            "base": base_ppl,
            "finetuned": ft_ppl,
            "pruned": pruned_ppl,
        },
        "delta": {
            k: m[k]
            for k in (
                "method",
                "p",
                "q",
                "mean_abs_delta",
                "max_abs_delta",
                "changed_fraction",
                "kept_fraction",
                "delta_bytes",
                "model_fp32_bytes",
                "delta_size_pct",
            )  # fmt: skip
        },
        "run": {
            "seconds": round(run_seconds, 1),
            "stage_seconds": stage["seconds"],
            "q": m["q"],
            "q_search": m["q_search"],
            "ppl_onnx": {k: ppl_eval[k] for k in ("original", "compressed", "rise_percent", "text", "chunks")},
            "max_ppl_rise": report["ppl_gate"]["max_rise_percent"],
        },
        "apply_delta": {
            "seconds": round(apply_seconds, 1),
            "same_file": (direct / "delta.safetensors").read_bytes() == (out / "delta.safetensors").read_bytes(),
            "identical": diff == 0.0,
            "max_abs_diff": diff,
        },
        "seconds_total": round(time.perf_counter() - t_start, 1),
    }
    args.results.mkdir(parents=True, exist_ok=True)
    out_json.write_text(json.dumps(res, indent=2) + "\n")
    md = markdown(res)
    out_md.write_text(md)
    print("\n" + md)
    print(f"wrote {out_json} and {out_md}")


if __name__ == "__main__":
    main()
