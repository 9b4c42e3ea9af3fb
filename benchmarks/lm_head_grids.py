"""smollm2's int4 LM head: block size x symmetric / asymmetric, by GPTQ (perplexity, KL, and the head's own speed).

    python benchmarks/lm_head_grids.py --ppl-text ../shared/data/stsb/sts-train.csv       # ~5 min on 2 shared cores

The 49152 x 576 head is about a fifth of a decode step's weights; ``quant.int4``'s ``lm_head_block_size`` and
``lm_head_grid`` choose its blocks and zero points. Body exact (the dequantized GGUF), embeddings float; the head
alone by GPTQ (``compress.stages.gptq``, Hessians from 64 x 256 tokens of the LM benchmark's calibration text through
the float model, damp 0.01). Perplexity on the LM benchmark's chunks (``compress.core.lm_eval``, torch fp32), KL /
top-1 against the float model on 4 x 256 held-out shipped-sentence tokens, and the head's MatMulNBits (GPTQ's own
tables, accuracy_level 4, one token, 2 threads) timed in one interleaved loop (every grid each round, start rotated,
median; under the benchmarks' lock). Writes benchmarks/results/lm_head_grids.{json,md}.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from _results import save
from _timing import interleaved

GRIDS = ((32, False), (32, True), (64, False), (64, True), (128, False), (128, True))


def head_session(grid, k: int, n: int, block: int):
    """One MatMulNBits holding ``grid`` (what export.genai_graph writes for the head)."""
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    inits = [numpy_helper.from_array(grid.packed, "B"), numpy_helper.from_array(grid.scales.reshape(-1), "S")]
    if grid.zero_points is not None:
        inits.append(numpy_helper.from_array(grid.zero_points.reshape(-1), "Z"))
    node = helper.make_node("MatMulNBits", ["x"] + [i.name for i in inits], ["y"], domain="com.microsoft", K=k, N=n,
                            bits=4, block_size=block, accuracy_level=4)  # fmt: skip
    graph = helper.make_graph([node], "head", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 1, k])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 1, n])], inits)  # fmt: skip
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)]
    )
    so = ort.SessionOptions()
    so.intra_op_num_threads = 2
    return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])


def main() -> None:
    import torch
    from lm import calib_text
    from lm_offset_types import _hessians
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from compress.core.data import calibration_and_heldout, shipped_sentences
    from compress.core.lm_eval import (
        next_token_fidelity,
        perplexity,
        reference_logprobs,
        sentences_of,
        token_chunks,
    )
    from compress.core.smollm2 import smollm2_path
    from compress.stages.gptq import gptq

    ap = argparse.ArgumentParser()
    ap.add_argument("--ppl-text", type=Path, required=True)
    ap.add_argument("--rounds", type=int, default=30)
    a = ap.parse_args()
    t0, load_start = time.perf_counter(), os.getloadavg()[0]
    torch.set_num_threads(2)
    path = smollm2_path()
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    chunks = token_chunks(tok, sentences_of(a.ppl_text), 15, 256)
    _, heldout = calibration_and_heldout(shipped_sentences())
    fid = token_chunks(tok, heldout, 4, 256, seed=1)

    def logits(ids: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return model(torch.as_tensor(ids)[None]).logits[0].float().numpy()

    reference = reference_logprobs(logits, fid)
    with tempfile.TemporaryDirectory() as tmp:
        hessian = _hessians(model, tok, calib_text(a.ppl_text, Path(tmp) / "calib.txt"))["lm_head"]
    head = model.lm_head
    head.weight = torch.nn.Parameter(head.weight.detach().clone())  # untied from the embedding table
    w = head.weight.detach().clone()
    n, k = w.shape
    rows, sessions = [{"head": "float", "ppl": round(perplexity(logits, chunks)["ppl"], 3)}], {}
    for block, symmetric in GRIDS:
        label = f"int4 b{block} {'symmetric' if symmetric else 'asymmetric'}"
        grid = gptq(w.numpy(), hessian, block, symmetric)
        with torch.no_grad():
            head.weight.copy_(torch.from_numpy(grid.weight))
        fidelity = next_token_fidelity(reference, logits, fid)
        rows.append({"head": label, "block": block, "symmetric": symmetric,
                     "ppl": round(perplexity(logits, chunks)["ppl"], 3), "kl": round(fidelity["kl"], 4),
                     "top1": round(fidelity["top1"], 3), "mb": round((grid.packed.nbytes + grid.scales.nbytes +
                     (0 if grid.zero_points is None else grid.zero_points.nbytes)) / 1e6, 2)})  # fmt: skip
        sessions[label] = head_session(grid, k, n, block)
        print(rows[-1], file=sys.stderr, flush=True)
    x = np.random.default_rng(0).standard_normal((1, 1, k)).astype(np.float32)
    labels = list(sessions)

    def head_us(sess):
        def run() -> float:
            sess.run(None, {"x": x})
            t = time.perf_counter()
            for _ in range(20):
                sess.run(None, {"x": x})
            return (time.perf_counter() - t) / 20 * 1e6

        return run

    times, load_timing, load_end = interleaved({label: head_us(sessions[label]) for label in labels}, a.rounds)
    base = statistics.median(times[labels[0]])
    for row in rows[1:]:
        row["head_us"] = round(statistics.median(times[row["head"]]), 1)
        row["head_vs_b32_asymmetric"] = round(row["head_us"] / base, 3)
    out = {"command": "python benchmarks/lm_head_grids.py " + " ".join(sys.argv[1:]), "rows": rows,
           "ppl_chunks": f"{chunks.shape[0]} x {chunks.shape[1]} tokens of {a.ppl_text}", "rounds": a.rounds,
           "load_avg_1min": {"start": round(load_start, 2), "timing_start": round(load_timing, 2),
                             "timing_end": round(load_end, 2)},
           "minutes": round((time.perf_counter() - t0) / 60, 1)}  # fmt: skip
    save("lm_head_grids", out, table)


def table(out: dict) -> str:
    la = out["load_avg_1min"]
    lines = ["# smollm2: the int4 LM head's grid (GPTQ, body exact)", "",
             f"Command: `{out['command']}` ({out['minutes']} min). Perplexity on {out['ppl_chunks']}, torch fp32; KL / "
             "top-1 vs the float model on 4 x 256 held-out shipped-sentence tokens; head time: its MatMulNBits alone "
             f"(1 token, accuracy_level 4, 2 threads), median of {out['rounds']} interleaved rounds of 20 runs; load "
             f"average {la['start']} at the start, {la['timing_start']} -> {la['timing_end']} over the timing.", "",
             "| head | perplexity | KL | top-1 | MB | head µs | vs b32 asymmetric |", "|---|---|---|---|---|---|---|"]  # fmt: skip
    for r in out["rows"]:
        lines.append(f"| {r['head']} | {r['ppl']:.2f} | {r.get('kl', 0):.4f} | {r.get('top1', 1):.3f} | "
                     f"{r.get('mb', 'n/a')} | {r.get('head_us', 'n/a')} | {r.get('head_vs_b32_asymmetric', 'n/a')} |")  # fmt: skip
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
