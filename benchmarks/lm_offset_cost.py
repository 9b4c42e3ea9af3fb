"""What the exact Q4_1 offsets cost in decode speed in onnxruntime-genai's graph (~3 min).

    python benchmarks/lm_offset_cost.py --genai /work/scratch/bench-lm/lm-int4-eora-genai \\
        --builder /work/scratch/bench-lm/genai-int4

Three variants in one interleaved plain-ORT loop (benchmarks/lm.py's OrtDecoder: 32-token prompt, 64 greedy tokens,
medians, 0.1 s pause before each generation, under /tmp/edge-bench.lock): the builder's own int4 model, a
``compress run --recipe lm-int4-eora-genai`` artefact (offsets as extra K rows), and the same artefact with the K rows
and the block-mean nodes stripped (the rounded zero point only: what the offsets cost, at the perplexity of
no offsets). Writes benchmarks/results/lm_offset_cost.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import time
from pathlib import Path

import numpy as np
from _results import save
from _timing import interleaved
from lm import NEW, PROMPT, OrtDecoder, log


def strip_offsets(src: Path, dst: Path) -> Path:
    """``src``'s graph with every MatMulNBits that reads [x, block means of x] put back on x (K and its tables cut to
    the original blocks), the block-mean nodes and their initializers swept (``compress.core.onnx_ops.sweep``)."""
    import onnx
    from onnx import numpy_helper

    from compress.core.onnx_ops import sweep

    model = onnx.load(str(src / "model.onnx"))
    g = model.graph
    inits = {t.name: t for t in g.initializer}
    producer = {o: n for n in g.node for o in n.output}
    for n in g.node:
        if n.op_type != "MatMulNBits" or "with_block_means" not in n.input[0]:
            continue
        concat = producer[n.input[0]]
        attrs = {a.name: a for a in n.attribute}
        bs, n_out = attrs["block_size"].i, attrs["N"].i
        k_orig = attrs["K"].i * bs // (bs + 1)  # K = k + k / block
        blocks = k_orig // bs
        attrs["K"].i = k_orig
        n.input[0] = concat.input[0]
        cut = {1: lambda t: t[:, :blocks], 2: lambda t: t.reshape(n_out, -1)[:, :blocks].reshape(-1),
               3: lambda t: t.reshape(n_out, -1)[:, : blocks // 2].reshape(-1)}  # fmt: skip
        for i, f in cut.items():
            if i < len(n.input) and n.input[i]:
                inits[n.input[i]].CopyFrom(numpy_helper.from_array(np.ascontiguousarray(
                    f(numpy_helper.to_array(inits[n.input[i]]))), n.input[i]))  # fmt: skip
    sweep(g)
    shutil.rmtree(dst, ignore_errors=True)
    shutil.copytree(src, dst)
    onnx.save(model, str(dst / "model.onnx"))
    return dst


def main() -> None:
    import onnx

    from runtimes.host import host_info
    from runtimes.profiler import settle

    ap = argparse.ArgumentParser()
    ap.add_argument("--genai", type=Path, required=True, help="a compress run --recipe lm-int4-eora-genai folder")
    ap.add_argument("--builder", type=Path, required=True, help="onnxruntime-genai's builder int4 folder")
    ap.add_argument("--work", type=Path, default=Path("/tmp/edge-lm-offset-cost"))
    ap.add_argument("--runs", type=int, default=10)
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    t0 = time.perf_counter()
    stripped = strip_offsets(a.genai, a.work / "stripped")
    config = json.loads((a.genai / "config.json").read_text())
    kv, hd = config["num_key_value_heads"], config["hidden_size"] // config["num_attention_heads"]
    paths = {"onnxruntime-genai builder int4": a.builder / "model.onnx",
             "lm-int4-eora-genai (offsets as K rows)": a.genai / "model.onnx",
             "lm-int4-eora-genai, offsets stripped": stripped / "model.onnx"}  # fmt: skip
    nodes = {k: len(onnx.load(str(p), load_external_data=False).graph.node) for k, p in paths.items()}
    dec = {k: OrtDecoder(p, a.threads, kv, hd) for k, p in paths.items()}
    prompt = list(range(100, 100 + PROMPT))
    for d in dec.values():
        d.generate(prompt, 4)
    names = list(dec)

    def decode(name: str):
        return lambda: (NEW - 1) / dec[name].generate(prompt, NEW)[1]

    samples, load, load_end = interleaved({n: decode(n) for n in names}, a.runs, settle, log)
    base = statistics.median(samples[names[0]])
    rows = [{"variant": k, "nodes": nodes[k], "decode_tok_s": round(statistics.median(v), 2),
             "vs_builder": round(statistics.median(v) / base, 3)} for k, v in samples.items()]  # fmt: skip
    out = {"command": "python benchmarks/lm_offset_cost.py " + " ".join(sys.argv[1:]), "rows": rows,
           "host": host_info().as_dict(), "load_avg_1min": [round(load, 2), round(load_end, 2)], "rounds": a.runs,
           "minutes": round((time.perf_counter() - t0) / 60, 1)}  # fmt: skip
    save("lm_offset_cost", out, table)


def table(out: dict) -> str:
    lines = ["# smollm2: what the exact offsets cost in onnxruntime-genai's graph", "",
             f"Command: `{out['command']}` ({out['minutes']} min, {out['rounds']} interleaved rounds, load "
             f"{out['load_avg_1min'][0]} -> {out['load_avg_1min'][1]}; {out['host']['cpu_model']}). Plain ORT decode "
             "loop, 64 greedy tokens after a 32-token prompt, median tokens/s of the 63 steps after the first.", "",
             "| variant | graph nodes | decode tok/s | vs builder int4 |", "|---|---|---|---|"]  # fmt: skip
    for r in out["rows"]:
        lines.append(f"| {r['variant']} | {r['nodes']} | {r['decode_tok_s']} | {r['vs_builder']:.3f} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    main()
