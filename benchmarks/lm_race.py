"""A few built LM folders raced in one interleaved decode loop: paired per-round ratios to the first.

The LM benchmark (``lm.py``) times every variant it builds (fp32, the builder's models, RTN, llama.cpp, the recipes) in
one loop; this times only the folders given, so more rounds fit in a few minutes. Same decoders as ``lm.py``
(``OrtDecoder``: a plain ORT loop; ``GenaiRunner``: onnxruntime-genai's og.Generator), same prompt length and new
tokens, same locked loop (``_timing.interleaved``).

    python benchmarks/lm_race.py --rounds 80 --og builder=DIR fast=DIR ...   # the first folder is the reference
"""

from __future__ import annotations

import argparse
import functools
import json
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from _timing import interleaved
from lm import NEW, PROMPT, GenaiRunner, OrtDecoder


def main() -> None:
    from runtimes.profiler import settle

    ap = argparse.ArgumentParser()
    ap.add_argument(
        "folders", nargs="+", help="LABEL=FOLDER (model.onnx + genai_config.json); the first is the reference"
    )
    ap.add_argument("--rounds", type=int, default=80)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--og", action="store_true", help="onnxruntime-genai's og.Generator instead of the plain ORT loop")
    a = ap.parse_args()
    specs = [f.split("=", 1) for f in a.folders]
    bad = [f for f in a.folders if "=" not in f or not (Path(f.split("=", 1)[1]) / "model.onnx").is_file()]
    if bad:
        sys.exit(f"lm_race: {bad[0]} is not LABEL=FOLDER with a model.onnx in it")
    scratch = Path(tempfile.mkdtemp(prefix="lm-race-"))
    runners = {}
    for label, folder in specs:
        config = json.loads((Path(folder) / "genai_config.json").read_text())["model"]["decoder"]
        kv, hd = config["num_key_value_heads"], config["head_size"]
        runners[label] = (GenaiRunner(Path(folder), a.threads, scratch) if a.og
                          else OrtDecoder(Path(folder) / "model.onnx", a.threads, kv, hd))  # fmt: skip
    prompt = list(range(1000, 1000 + PROMPT))
    for r in runners.values():
        r.generate(prompt, 4)  # warm-up
    fns = {label: functools.partial(r.generate, prompt, NEW) for label, r in runners.items()}
    samples, load0, load1 = interleaved(fns, a.rounds, settle)
    ref = specs[0][0]
    print(f"{'og.Generator' if a.og else 'plain ORT loop'}, {a.rounds} rounds, {a.threads} threads, load {load0:.2f} -> "
          f"{load1:.2f}; decode = {NEW - 1} steps after a {PROMPT}-token prompt; ratios paired per round vs {ref}")  # fmt: skip
    print("| folder | TTFT ms | decode tok/s | vs " + ref + " (median, q25-q75) |\n|---|---|---|---|")
    for label, s in samples.items():
        ratios = [b[1] / x[1] for x, b in zip(s, samples[ref])]
        q = statistics.quantiles(ratios, n=4)
        print(f"| {label} | {statistics.median(x[0] for x in s) * 1e3:.1f} | "
              f"{(NEW - 1) / statistics.median(x[1] for x in s):.2f} | "
              f"{statistics.median(ratios):.3f} ({q[0]:.3f}-{q[2]:.3f}) |")  # fmt: skip


if __name__ == "__main__":
    main()
