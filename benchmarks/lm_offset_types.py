"""Which of smollm2's projections need their exact Q4_1 offsets, and what GPTQ buys instead (perplexity, torch, ~8 min).

    python benchmarks/lm_offset_types.py --ppl-text ../shared/data/stsb/sts-train.csv

Every decoder Linear on the source grid with the nearest integer zero point (``grids.source_grid_weight``: what
MatMulNBits holds without offsets), then the exact GGUF weights (= grid + offsets) restored for some projection types;
LM head and embeddings float. Perplexity on the LM benchmark's chunks (``compress.core.lm_eval``: 15 x 256 tokens, an
empty cache each). Each offset kept costs decode time in the genai graph (a block-sum MatMul and a Concat per distinct
input, ~3% more K: ``export/genai_graph.py``), so a recipe keeps only those that pay (``lm-int4-eora-genai``).

Then what GPTQ (``compress.stages.gptq``; Hessians from one pass of 64 windows of 256 tokens of the LM benchmark's
calibration text through the float model, damp 0.01) does without offsets: the whole body on its own asymmetric int4
grid, or only the codes chosen on the source grid (its scales and integer zero points fixed); and the LM head alone
(body exact) by round-to-nearest vs GPTQ. Writes benchmarks/results/lm_offset_types.{json,md}.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from _results import save

TYPES = {"qkv": ("q_proj", "k_proj", "v_proj"), "o": ("o_proj",), "gate/up": ("gate_proj", "up_proj"),
         "down": ("down_proj",)}  # fmt: skip
KEPT = ((), tuple(TYPES), ("qkv", "gate/up", "down"), ("qkv", "o", "gate/up"), ("o", "gate/up", "down"),
        ("qkv", "o", "down"), ("qkv", "gate/up"))  # fmt: skip


def main() -> None:
    import torch
    from lm import calib_text
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from compress.core.lm_eval import perplexity, sentences_of, token_chunks
    from compress.core.smollm2 import smollm2_path
    from compress.stages.gptq import gptq
    from compress.stages.grids import int4_weight, source_grid, source_grid_weight

    ap = argparse.ArgumentParser()
    ap.add_argument("--ppl-text", type=Path, required=True)
    a = ap.parse_args()
    t0 = time.perf_counter()
    torch.set_num_threads(2)
    path = smollm2_path()
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    chunks = token_chunks(tok, sentences_of(a.ppl_text), 15, 256)
    mods = {n: m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and ".layers." in n}
    exact = {n: m.weight.detach().clone() for n, m in mods.items()}
    grid = {n: source_grid_weight(w, 32) for n, w in exact.items()}

    def logits(ids: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return model(torch.as_tensor(ids)[None]).logits[0].float().numpy()

    rows = []
    for kept in KEPT:
        projs = {p for t in kept for p in TYPES[t]}
        with torch.no_grad():
            for n, m in mods.items():
                m.weight.copy_(exact[n] if n.rsplit(".", 1)[1] in projs else grid[n])
        ppl = perplexity(logits, chunks)["ppl"]
        rows.append({"offsets_kept": list(kept) or ["none"], "ppl": round(ppl, 3)})
        print(rows[-1], file=sys.stderr, flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        hessians = _hessians(model, tok, calib_text(a.ppl_text, Path(tmp) / "calib.txt"))
    torch_grid = lambda arr: torch.from_numpy(np.asarray(arr)).float()
    for label, fit in (
        ("none; GPTQ of the body on its own int4 grid", lambda n, w: gptq(w.numpy(), hessians[n], 32).weight),
        ("none; GPTQ choosing only the codes on the source grid",
         lambda n, w: gptq(w.numpy(), hessians[n], 32, grid=source_grid(w, 32)[::2]).weight),
    ):  # fmt: skip
        with torch.no_grad():
            for n, m in mods.items():
                m.weight.copy_(torch_grid(fit(n, exact[n])))
        rows.append({"offsets_kept": [label], "ppl": round(perplexity(logits, chunks)["ppl"], 3)})
        print(rows[-1], file=sys.stderr, flush=True)
    head = model.lm_head
    head.weight = torch.nn.Parameter(head.weight.detach().clone())  # untied from the embedding table
    w_head = head.weight.detach().clone()
    with torch.no_grad():
        for n, m in mods.items():
            m.weight.copy_(exact[n])
        for label, wq in (
            ("all; LM head int4 round-to-nearest (asymmetric b32)", int4_weight(w_head, 32, False)),
            ("all; LM head int4 GPTQ", torch_grid(gptq(w_head.numpy(), hessians["lm_head"], 32).weight)),
        ):
            head.weight.copy_(wq)
            rows.append({"offsets_kept": [label], "ppl": round(perplexity(logits, chunks)["ppl"], 3)})
            print(rows[-1], file=sys.stderr, flush=True)
    full = next(r["ppl"] for r in rows if len(r["offsets_kept"]) == len(TYPES))
    for r in rows:
        r["vs_all_offsets_percent"] = round((r["ppl"] / full - 1) * 100, 2)
    out = {"command": "python benchmarks/lm_offset_types.py " + " ".join(sys.argv[1:]), "rows": rows,
           "ppl_chunks": f"{chunks.shape[0]} x {chunks.shape[1]} tokens of {a.ppl_text}",
           "minutes": round((time.perf_counter() - t0) / 60, 1)}  # fmt: skip
    save("lm_offset_types", out, table)


def _hessians(model, tok, calib: Path) -> dict:
    """E[x xᵀ] of every Linear's input over 64 packed 256-token windows of ``calib`` (float model, one pass)."""
    import torch

    from compress.core.lm_eval import packed_texts

    sums: dict = {}
    count = [0]

    def hook(name):
        def on_forward(_m, inputs, _out) -> None:
            x = inputs[0].detach().reshape(-1, inputs[0].shape[-1]).double()
            sums[name] = sums.get(name, 0) + x.T @ x

        return on_forward

    linears = {n: m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    handles = [m.register_forward_hook(hook(n)) for n, m in linears.items()]
    with torch.no_grad():
        for text in packed_texts(tok, calib.read_text().splitlines(), 256)[:64]:
            ids = tok(text, return_tensors="pt").input_ids[:, :256]
            count[0] += ids.shape[1]
            model(ids)
    for h in handles:
        h.remove()
    return {n: (v / count[0]).numpy() for n, v in sums.items()}


def table(out: dict) -> str:
    lines = ["# smollm2: which projections need their exact Q4_1 offsets", "",
             f"Command: `{out['command']}` ({out['minutes']} min). Perplexity on {out['ppl_chunks']}, torch fp32; "
             "source grid with the nearest integer zero point everywhere, exact weights restored for the listed "
             "projections; head and embeddings float (except the two head rows).", "",
             "| offsets kept for | perplexity | vs all offsets |", "|---|---|---|"]  # fmt: skip
    for r in out["rows"]:
        lines.append(f"| {', '.join(r['offsets_kept'])} | {r['ppl']:.2f} | {r['vs_all_offsets_percent']:+.2f}% |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
