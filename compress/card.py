"""The model card: README.md in every artefact folder, in the Hugging Face model-card format (YAML metadata, then
Markdown), written from the report only, so every number in it is a number the run measured, with its label.

A user who pushes the folder to the Hub gets a correct card: ``library_name`` / ``pipeline_tag`` pick the Hub's
loader and widget, ``base_model`` (+ ``base_model_relation``) links the original, and license, language and datasets
are carried over from the source model's own card. The metadata is rendered by ``huggingface_hub.ModelCardData``.

The loading snippets are code the tests run (``tests/test_consumers.py`` executes every Python snippet of a card
with ``folder`` set, and the transformers.js one in Node): ``python_snippets`` and ``js_snippet`` return them.
"""

from __future__ import annotations

import json
from pathlib import Path

from compress.core.kinds import ENCODER_GRAPH
from compress.core.models import hub_id

FOLDER = "path/to/this/folder"  # the first line of every snippet; after a Hub push, the repo id works where noted
EXAMPLES = ["A man is playing a guitar.", "Someone is playing an instrument."]
PIPELINE_TAG = {
    "sentence-embedding": "sentence-similarity",
    "feature-extraction": "feature-extraction",
    "text-classification": "text-classification",
    "text-generation": "text-generation",
    "text2text-generation": "text2text-generation",
}
CARRIED = ("license", "language", "datasets")  # from the source model's card


def source_card(path: Path) -> dict:
    """license / language / datasets from the source model's README.md front matter ({} when it has none)."""
    readme = Path(path) / "README.md"
    if not readme.is_file():
        return {}
    from huggingface_hub import ModelCard

    try:
        data = ModelCard.load(readme).data.to_dict()
    except Exception:  # a README without valid YAML metadata: nothing to carry over
        return {}
    return {k: data[k] for k in CARRIED if data.get(k)}


def metadata(report: dict, library: str, tags: list[str]) -> str:
    """The YAML front matter (between ``---`` lines)."""
    from huggingface_hub import ModelCardData

    model = report["model"]
    base = base_model(report)
    stages = [s["name"] for s in report.get("stages", [])]
    relation = "quantized" if any(s.startswith("quant.") for s in stages) else "finetune" if stages else None
    carried = model["source_card"] if "source_card" in model else source_card(Path(model.get("path", "")))
    data = ModelCardData(
        library_name=library,
        pipeline_tag=PIPELINE_TAG.get(report["task"]),
        tags=tags,
        base_model=base,
        base_model_relation=relation if base else None,
        **carried,
    )
    return f"---\n{data.to_yaml()}\n---\n"


def base_model(report: dict) -> str | None:
    """The source model's Hub id, as the report recorded it or from what the user named."""
    model = report["model"]
    if "base_model" in model:
        return model["base_model"]
    return hub_id(str(model.get("name", "")), Path(model.get("path", "")))


def _table(head: list[str], rows: list[list]) -> list[str]:
    return [
        "| " + " | ".join(head) + " |",
        "|" + "---|" * len(head),
        *("| " + " | ".join(str(c) for c in r) + " |" for r in rows),
    ]


def _host(report: dict) -> str:
    h = report["host"]
    flags = ", ".join(k for k, v in h.get("isa", {}).items() if v) or "no SIMD flags read"
    return f"{h['cpu_model']}, {h['physical_cores']} cores ({flags}), ONNX Runtime {h.get('onnxruntime', '')}"


# ---- encoders ---------------------------------------------------------------------------------------------------


def python_snippets(report: dict) -> dict[str, str]:
    """{consumer: Python code} for an encoder artefact; each leaves its result in ``embeddings`` or ``logits``."""
    io, task = report["interface"], report["task"]
    names = [i["name"] for i in io["inputs"]]
    pooling = io.get("pooling", {})
    feeds = ['"input_ids": np.array([e.ids for e in enc], dtype=np.int64)']
    feeds += ['"attention_mask": np.array([e.attention_mask for e in enc], dtype=np.int64)'] * (
        "attention_mask" in names
    )
    feeds += ['"token_type_ids": np.array([e.type_ids for e in enc], dtype=np.int64)'] * ("token_type_ids" in names)
    head = f'folder = "{FOLDER}"\ntexts = {json.dumps(EXAMPLES)}\n'
    mean = (
        "mask = {m}[..., None].astype(np.float32)\n"
        "embeddings = (hidden * mask).sum(1) / mask.sum(1)  # mean over real tokens (the model's pooling)\n"
    )
    plain = (
        "import numpy as np\nimport onnxruntime as ort\nfrom tokenizers import Tokenizer\n\n" + head + "tokenizer = "
        'Tokenizer.from_file(f"{folder}/tokenizer.json")  # truncation at '
        f"{io['max_length']} tokens, padding to the longest text\n"
        f'session = ort.InferenceSession(f"{{folder}}/{ENCODER_GRAPH}", providers=["CPUExecutionProvider"])\n'
        "enc = tokenizer.encode_batch(texts)\n"
        "feeds = {" + ", ".join(feeds) + "}\n"
    )
    out: dict[str, str] = {}
    if task == "sentence-embedding":
        norm = ", L2-normalised" if pooling.get("normalize") else ""
        out["onnxruntime"] = plain + f'[embeddings] = session.run(["sentence_embedding"], feeds)  # (n, dim){norm}\n'
        out["optimum"] = (
            "from optimum.onnxruntime import ORTModelForCustomTasks\nfrom transformers import AutoTokenizer\n\n"
            + head
            + "model = ORTModelForCustomTasks.from_pretrained(folder)  # every graph output; finds onnx/model.onnx\n"
            "tokenizer = AutoTokenizer.from_pretrained(folder)\n"
            'embeddings = model(**tokenizer(texts, padding=True, truncation=True, return_tensors="np")).sentence_embedding\n'
        )
        out["sentence-transformers"] = (
            "from sentence_transformers import SentenceTransformer\n\n" + head + "model = SentenceTransformer(folder, "
            'backend="onnx", device="cpu")  # modules.json: Transformer (ONNX), Pooling, Normalize\n'
            "embeddings = model.encode(texts)\n"
        )
    elif task == "feature-extraction":
        out["onnxruntime"] = (
            plain + '[hidden] = session.run(["last_hidden_state"], feeds)\n' + mean.format(m='feeds["attention_mask"]')
        )
        out["optimum"] = (
            "import numpy as np\nfrom optimum.onnxruntime import ORTModelForFeatureExtraction\n"
            "from transformers import AutoTokenizer\n\n" + head + "model = ORTModelForFeatureExtraction.from_pretrained"
            '(folder)\ntokenizer = AutoTokenizer.from_pretrained(folder)\nenc = tokenizer(texts, padding=True, truncation=True, return_tensors="np")\n'
            "hidden = model(**enc).last_hidden_state\n" + mean.format(m='enc["attention_mask"]')
        )
    else:
        out["onnxruntime"] = plain + '[logits] = session.run(["logits"], feeds)\n'
        out["optimum"] = (
            "from optimum.onnxruntime import ORTModelForSequenceClassification\nfrom transformers import AutoTokenizer\n\n"
            + head
            + "model = ORTModelForSequenceClassification.from_pretrained(folder)\n"
            "tokenizer = AutoTokenizer.from_pretrained(folder)\n"
            'logits = model(**tokenizer(texts, padding=True, truncation=True, return_tensors="np")).logits\n'
        )
    if report.get("mobile", {}).get("ort"):  # the same call on the ORT-format file, as ORT Mobile loads it
        out["ort-mobile"] = out["onnxruntime"].replace(ENCODER_GRAPH, report["mobile"]["ort"]["path"])
    return out


def js_snippet(report: dict, folder_name: str = "this-folder", parent: str = "path/to/parent/") -> str:
    """transformers.js (Node or browser) for an embedding artefact; result in ``embeddings`` (a Tensor)."""
    pooling = report["interface"].get("pooling", {})
    mode = "cls" if pooling.get("mode") == "cls_token" else "mean"
    normalize = "true" if pooling.get("normalize") else "false"
    return (
        'import { env, pipeline } from "@huggingface/transformers";\n\n'
        "env.allowRemoteModels = false;  // a local folder; drop these two lines to load the pushed Hub repo by id\n"
        f'env.localModelPath = "{parent}";  // the folder that holds this one\n'
        f'const extractor = await pipeline("feature-extraction", "{folder_name}");  // loads onnx/model.onnx\n'
        f'const embeddings = await extractor({json.dumps(EXAMPLES)}, {{ pooling: "{mode}", normalize: {normalize} }});\n'
    )


def encoder_card(report: dict, files: list[str]) -> str:
    model, task, io = report["model"], report["task"], report["interface"]
    st = task == "sentence-embedding"
    library = "sentence-transformers" if st else "onnx"
    tags = ["onnx", "edge-compress", "optimum"] + (["sentence-transformers"] if st else [])
    if task != "text-classification":
        tags.append("transformers.js")
    stages = [s["name"] for s in report["stages"]]
    if any(s.startswith("quant.") for s in stages):
        tags.append("int8" if not any("int4" in s for s in stages) else "int4")
    lines = [metadata(report, library, sorted(set(tags))), ""]
    recipe = report["recipe"]
    base = base_model(report)
    origin = f"[{base}](https://huggingface.co/{base})" if base else f"`{model['name']}`"
    lines += [
        f"# {Path(str(base or model['name'])).name} · {recipe['name']} · ONNX",
        "",
        f"{origin} ({model.get('architecture', '')}, task {task}) compressed with "
        f"edge-compress recipe `{recipe['name']}` ({recipe['description']}) and exported to ONNX "
        f"for the `{report['target']['name']}` target. One folder that ONNX Runtime, Optimum, "
        + ("sentence-transformers, " if st else "")
        + "transformers.js and (with `onnx/model.ort`) ORT Mobile load unchanged.",
        "",
        "## Files",
        "",
    ]
    lines += _table(["file", "what"], [[f"`{f}`", describe_file(f)] for f in files])
    lines += ["", "## Inputs and outputs", ""]
    lines += _table(
        ["", "name", "type", "shape"],
        [["input", i["name"], i["type"], " x ".join(map(str, i["shape"]))] for i in io["inputs"]]
        + [["output", o["name"], o["type"], " x ".join(map(str, o["shape"]))] for o in io["outputs"]],
    )
    pooling = io.get("pooling", {})
    if st:
        lines += [
            "",
            f"`sentence_embedding` is the sentence vector: {pooling.get('mode', 'mean_tokens')} pooling over the "
            f"attention mask{', then L2 normalisation' if pooling.get('normalize') else ''}, inside the graph. "
            f"`last_hidden_state` holds the token vectors. Texts are truncated at {io['max_length']} tokens.",
        ]
    elif task == "feature-extraction":
        lines += [
            "",
            "The sentence vector is the mean of `last_hidden_state` over the attention mask (not normalised).",
        ]
    lines += ["", "## How it was made", ""]
    lines += _table(
        ["stage", "parameters"],
        [[s["name"], ", ".join(f"{k}={v}" for k, v in s["params"].items()) or "defaults"] for s in report["stages"]]
        or [["(none)", "the float export"]],
    )
    p = report["parity"]["original_export"]
    lines += [
        "",
        f"Exported with optimum; the float export matched torch (min cosine {p['cosine_min']:.6f} on "
        f"{p['samples']} held-out sentences, gate >= {p['threshold']}) before any ONNX stage ran.",
        "",
        "## Accuracy (measured with ONNX Runtime on this host)",
        "",
    ]
    rows = [[e["name"], e["metric"], e["original"], e["compressed"]] for e in report["eval"]]
    a = report["parity"]["artifact"]
    rows.append(
        ["parity", "cosine to torch, held-out sentences (min / mean)", "1.0", f"{a['cosine_min']} / {a['cosine_mean']}"]
    )
    lines += _table(["eval", "metric", "original fp32", "this model"], rows)
    lines += ["", "## Batch independence (measured)", "", consistency_sentence(report["consistency"])]
    lines += ["", f"## Latency (measured on {_host(report)})", ""]
    roof = report.get("roofline", {}).get("compressed", [])
    lat_rows = []
    for i, (c, b) in enumerate(zip(report["latency"], report["baseline_latency"])):
        est = roof[i] if i < len(roof) else {}
        lat_rows.append(
            [
                f"{c['batch']}x{c['seq']}",
                f"{b['p50_ms']:.2f}",
                f"{c['p50_ms']:.2f}",
                f"{c['p50_ms'] / b['p50_ms']:.2f}",
                c["threads"],
                f"{est['p50_ms']:.2f}" if "p50_ms" in est else "n/a",
            ]
        )
    lines += _table(
        [
            "batch x seq",
            "fp32 p50 ms [measured]",
            "this model p50 ms [measured]",
            "ratio",
            "threads",
            "roofline ms [analytic]",
        ],
        lat_rows,
    )
    load = report.get("load_average")
    lines += [
        "",
        "Measured: ONNX Runtime CPU execution provider, original and compressed interleaved round by round on the "
        "same host"
        + (f" (1-minute load average {load['before'][0]:.1f} before, {load['after'][0]:.1f} after)" if load else "")
        + "; ratios hold across hosts better than milliseconds. Analytic: a roofline estimate, not a "
        "measurement. Re-measure on the deployment device: `compress profile FOLDER --target cpu`.",
    ]
    mobile = report.get("mobile", {})
    if mobile.get("coverage"):
        lines += ["", "## ORT Mobile (NNAPI / Core ML coverage from ORT's mobile usability checker)", ""]
        lines += mobile_table(mobile["coverage"])
    lines += ["", "## Use it", ""]
    titles = {
        "onnxruntime": "ONNX Runtime + tokenizers (no torch, no transformers)",
        "optimum": "Optimum (also with the Hub repo id once pushed)",
        "sentence-transformers": "sentence-transformers (also with the Hub repo id once pushed)",
        "ort-mobile": "ORT format (ORT Mobile; on a desktop the same call checks it)",
    }
    for consumer, code in python_snippets(report).items():
        lines += [f"### {titles[consumer]}", "", "```python", code.rstrip(), "```", ""]
    if task != "text-classification":
        lines += ["### transformers.js (Node: `npm install @huggingface/transformers`; or the browser)", "", "```js"]
        lines += [js_snippet(report).rstrip(), "```", ""]
    lines += [
        "## Limitations",
        "",
        "- Numbers come from one run on the host named above; int8 speed depends on the CPU's instruction set "
        "(VNNI / AMX vs AVX2) and on load.",
        "- ONNX Runtime's graph optimisation level changes int8 outputs in the last bits (the consistency line above); "
        "other runtimes (onnxruntime-web in a browser, ORT Mobile kernels) were not measured.",
        "",
        f"Made by edge-compress {report['versions'].get('edge-compress', '')}; full report: `report.md`, "
        "`report.json`.",
        "",
    ]
    return "\n".join(lines)


FILES = {
    ENCODER_GRAPH: "the model (inputs and outputs below)",
    "config.json": 'the model config; `"transformers.js_config": {"dtype": "fp32"}` only selects the file name '
    "`onnx/model.onnx` in transformers.js (it is not the numeric precision: the weights are what the recipe made them)",
    "tokenizer.json": "the tokenizer (truncation and padding set for this model)",
    "tokenizer_config.json": "tokenizer settings (transformers, transformers.js, onnxruntime-genai read it)",
    "special_tokens_map.json": "special tokens",
    "modules.json": "sentence-transformers pipeline: Transformer (the ONNX graph), Pooling, Normalize",
    "sentence_bert_config.json": "sentence-transformers: max_seq_length, lowercasing",
    "config_sentence_transformers.json": "sentence-transformers: versions, similarity function",
    "report.json": "every measurement of the run",
    "report.md": "the report as tables",
    "README.md": "this card",
    "plot.png": "accuracy vs latency, original and compressed",
    "onnx/model.ort": "the same graph in ORT format for ORT Mobile",
    "onnx/model.required_operators.config": "the operators an ORT Mobile reduced build needs for this model",
    "generation_config.json": "eos / pad tokens for generate()",
    "genai_config.json": "onnxruntime-genai's configuration, generated from config.json and the graph",
    "delta.safetensors": "the kept fine-tuning delta (prune.delta): `compress apply-delta BASE delta.safetensors "
    "--out DIR` rebuilds the pruned model from its base",
}


def describe_file(name: str) -> str:
    if name in FILES:
        return FILES[name]
    if name.endswith("/config.json") and "Pooling" in name:
        return "sentence-transformers pooling (mode, dimension)"
    if name.startswith(("vocab", "merges")):
        return "tokenizer vocabulary"
    if name.endswith((".png", ".md")):
        return "a report figure or table"
    return ""


def consistency_sentence(c: dict) -> str:
    """One line on whether an output depends on the batch it was computed in (and on ORT's optimisation level)."""
    a, lv = c["alone_vs_batch"], c["optimization_levels"]
    n = f"over {c['texts']} held-out sentences"
    if c["batch_independent"]:
        head = (
            f"Batch-independent: {n}, the same text alone and inside a padded {c['batch']}-text batch gives min cosine "
            f"{a['min']:.6f}."
        )
    else:
        head = (
            f"BATCH-DEPENDENT: {n}, the same text alone and inside a padded {c['batch']}-text batch gives min cosine "
            f"{a['min']:.6f} (< {c['threshold']}; mean {a['mean']:.6f}): vectors embedded in batches and vectors "
            "embedded alone are not interchangeable; embed one text per call, or use a batch-independent recipe "
            "(quant.hybrid: recipe cpu-default or hybrid-int8)."
        )
    return (
        f"{head} ORT optimisation DISABLE_ALL vs ENABLE_ALL (each text alone): min cosine {lv['min']:.6f} "
        f"(mean {lv['mean']:.6f})."
    )


def mobile_table(coverage: dict) -> list[str]:
    rows = []
    for key, v in coverage.items():
        ep, shapes = key.split(":")
        rows.append(
            [
                ep,
                "as exported (dynamic)" if shapes == "dynamic" else "if input shapes were fixed",
                f"{v['supported_nodes']}/{v['nodes']} ({v['coverage_pct']}%)",
                v["partitions"],
                v["suitability"],
                ", ".join(v["unsupported_ops"]),
            ]
        )
    return _table(["EP", "shapes", "nodes the EP takes", "partitions", "checker's verdict", "ops it lacks"], rows)


# ---- generative -------------------------------------------------------------------------------------------------


def generative_card(report: dict, files: list[str]) -> str:
    model, task = report["model"], report["task"]
    decoder = task == "text-generation"
    tags = ["onnx", "edge-compress", "optimum"] + (["onnxruntime-genai"] if "genai_config.json" in files else [])
    lines = [metadata(report, "onnx", tags), ""]
    base = base_model(report)
    origin = f"[{base}](https://huggingface.co/{base})" if base else f"`{model['name']}`"
    recipe = report["recipe"]
    genai_graph = recipe.get("export") == "genai"
    exporter = ("onnxruntime-genai's model builder's graph (GroupQueryAttention, fused norms, packed QKV) holding the "
                "recipe's tables" if genai_graph else "optimum (with past key/values)")  # fmt: skip
    lines += [
        f"# {Path(str(base or model['name'])).name} · {recipe['name']} · ONNX",
        "",
        f"{origin} ({model.get('architecture', '')}, {model.get('parameters', 0) / 1e6:.2f} M parameters, task {task}) "
        f"exported as {exporter} and compressed with edge-compress recipe `{recipe['name']}` "
        f"({recipe['description']}).",
        "",
        "## Files",
        "",
    ]
    gen_files = {
        "model.onnx": "decoder with past key/values (optimum's names: past_key_values.N.key/value -> present.N.key/value)",
        "encoder_model.onnx": "the encoder",
        "decoder_model.onnx": "the decoder's first step",
        "decoder_with_past_model.onnx": "the decoder's later steps, with past key/values",
        "config.json": "the model config (Optimum reads it)",
        "tokenizer.json": "the tokenizer",
        "plot.png": "first-token latency and tokens/s, original and compressed",
    }
    lines += _table(["file", "what"], [[f"`{f}`", gen_files.get(f) or describe_file(f)] for f in files])
    p = report["parity"]["artifact"]
    lines += [
        "",
        "## Accuracy (measured)",
        "",
        f"Greedy generation by this folder (Optimum) vs the torch original: {p['identical']}/{p['prompts']} prompts "
        f"identical over {p['new_tokens']} tokens (token agreement {p['token_agreement']:.3f}).",
        "",
        f"## Latency (measured on {_host(report)})",
        "",
    ]
    rows = [
        [
            f"{c['batch']}x{c['input_len']}",
            f"{b['ttft_p50_ms']:.2f}",
            f"{c['ttft_p50_ms']:.2f}",
            f"{b['tokens_per_s']:.1f}",
            f"{c['tokens_per_s']:.1f}",
        ]
        for c, b in zip(report["latency"], report["baseline_latency"])
    ]
    lines += _table(["batch x input", "fp32 TTFT p50 ms", "this TTFT p50 ms", "fp32 tokens/s", "this tokens/s"], rows)
    lines += ["", "## Use it", "", "### Optimum", "", "```python"]
    cls = "ORTModelForCausalLM" if decoder else "ORTModelForSeq2SeqLM"
    lines += [
        f"from optimum.onnxruntime import {cls}",
        "from transformers import AutoTokenizer",
        "",
        f'folder = "{FOLDER}"',
        f"model = {cls}.from_pretrained(folder)",
        "tokenizer = AutoTokenizer.from_pretrained(folder)",
        'ids = model.generate(**tokenizer(["The weather today is"], return_tensors="pt"), max_new_tokens=16)',
        "```",
        "",
    ]
    if genai_graph:
        lines += [
            "This graph reads the attention mask as sequence lengths (GroupQueryAttention): give Optimum one prompt "
            "at a time (a left-padded batch gets wrong positions); onnxruntime-genai below is its native runtime.",
            "",
        ]
    if "genai_config.json" in files:
        lines += ["### onnxruntime-genai", "", "```python", genai_snippet().rstrip(), "```", ""]
    lines += [f"Made by edge-compress {report['versions'].get('edge-compress', '')}; full report: `report.md`.", ""]
    return "\n".join(lines)


def genai_snippet() -> str:
    return (
        "import onnxruntime_genai as og\n\n"
        f'folder = "{FOLDER}"\n'
        "model = og.Model(folder)  # reads genai_config.json\n"
        "tokenizer = og.Tokenizer(model)\n"
        "params = og.GeneratorParams(model)\n"
        'prompt = tokenizer.encode("The weather today is")\n'
        "params.set_search_options(do_sample=False, max_length=len(prompt) + 16)\n"
        "generator = og.Generator(model, params)\n"
        "generator.append_tokens(prompt)\n"
        "while not generator.is_done():\n"
        "    generator.generate_next_token()\n"
        "tokens = list(generator.get_sequence(0))[len(prompt):]\n"
        "print(tokenizer.decode(tokens))\n"
    )
