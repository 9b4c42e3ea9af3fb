"""Which of smollm2's projections need their exact Q4_1 offsets (perplexity, torch, ~3 min).

    python benchmarks/lm_offset_types.py --ppl-text ../shared/data/stsb/sts-train.csv

Every decoder Linear on the source grid with the nearest integer zero point (``grids.source_grid_weight``: what
MatMulNBits holds without offsets), then the exact GGUF weights (= grid + offsets) restored for some projection types;
LM head and embeddings float. Perplexity on the LM benchmark's chunks (``compress.core.lm_eval``: 15 x 256 tokens, an
empty cache each). Each offset kept costs decode time in the genai graph (a block-sum MatMul and a Concat per distinct
input, ~5% more K: ``export/genai_graph.py``), so a recipe keeps only those that pay (``lm-int4-eora-genai``).
Writes benchmarks/results/lm_offset_types.{json,md}.
"""

from __future__ import annotations

import argparse
import sys
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
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from compress.core.lm_eval import perplexity, sentences_of, token_chunks
    from compress.core.smollm2 import smollm2_path
    from compress.stages.grids import source_grid_weight

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
    full = next(r["ppl"] for r in rows if len(r["offsets_kept"]) == len(TYPES))
    for r in rows:
        r["vs_all_offsets_percent"] = round((r["ppl"] / full - 1) * 100, 2)
    out = {"command": "python benchmarks/lm_offset_types.py " + " ".join(sys.argv[1:]), "rows": rows,
           "ppl_chunks": f"{chunks.shape[0]} x {chunks.shape[1]} tokens of {a.ppl_text}",
           "minutes": round((time.perf_counter() - t0) / 60, 1)}  # fmt: skip
    save("lm_offset_types", out, table)


def table(out: dict) -> str:
    lines = ["# smollm2: which projections need their exact Q4_1 offsets", "",
             f"Command: `{out['command']}` ({out['minutes']} min). Perplexity on {out['ppl_chunks']}, torch fp32; "
             "source grid with the nearest integer zero point everywhere, exact weights restored for the listed "
             "projections; head and embeddings float.", "",
             "| offsets kept for | perplexity | vs all offsets |", "|---|---|---|"]  # fmt: skip
    for r in out["rows"]:
        lines.append(f"| {', '.join(r['offsets_kept'])} | {r['ppl']:.2f} | {r['vs_all_offsets_percent']:+.2f}% |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
