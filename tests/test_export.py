"""Export of tiny seeded models through optimum (and the torch.onnx fallback), verified against torch."""

from pathlib import Path

import numpy as np
import onnx

from compress.core.models import load_model
from export.onnx_export import TOKEN_OUTPUT, _export_with_torch, export_onnx
from export.verify import compare, verify_against_torch
from runtimes.encode import ort_outputs
from runtimes.ort import cpu_session

TEXTS = ["A short one.", "A somewhat longer sentence with more tokens in it, to vary the length.", "Third."]


def _io(path: Path):
    m = onnx.load(str(path), load_external_data=False)
    dims = lambda v: [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]
    return {i.name: dims(i) for i in m.graph.input}, {o.name: dims(o) for o in m.graph.output}


def test_sentence_transformers_export_outputs_and_parity(tiny_dirs, tmp_path):
    lm = load_model(str(tiny_dirs["st"]))
    assert lm.task == "sentence-embedding"
    path = export_onnx(lm, tmp_path / "art")
    inputs, outputs = _io(path)
    assert {"input_ids", "attention_mask"} <= set(inputs)
    assert set(outputs) == {"sentence_embedding", TOKEN_OUTPUT}
    assert all(isinstance(d, str) for d in inputs["input_ids"])  # dynamic batch and sequence axes
    for f in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        assert (tmp_path / "art" / f).is_file()
    p = verify_against_torch(lm, path, TEXTS)
    assert p.passed and p.cosine_min > 0.9999
    # The embedding is the pipeline's own: unit norm after its Normalize module.
    emb = ort_outputs(cpu_session(path, 1), lm.tokenizer, TEXTS, lm.task)
    assert np.allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-4)


def test_folder_loads_unchanged_in_optimum(tiny_dirs, tmp_path):
    from optimum.onnxruntime import ORTModelForFeatureExtraction
    from transformers import AutoTokenizer

    lm = load_model(str(tiny_dirs["st"]))
    export_onnx(lm, tmp_path / "art")
    model = ORTModelForFeatureExtraction.from_pretrained(tmp_path / "art")
    tok = AutoTokenizer.from_pretrained(tmp_path / "art")
    enc = tok(TEXTS, padding=True, return_tensors="np")
    out = model(**enc)
    assert out.last_hidden_state.shape == (3, enc["input_ids"].shape[1], 32)


def test_classifier_export_and_parity(tiny_dirs, tmp_path):
    lm = load_model(str(tiny_dirs["classifier"]))
    assert lm.task == "text-classification"
    path = export_onnx(lm, tmp_path / "art")
    _, outputs = _io(path)
    assert "logits" in outputs
    assert verify_against_torch(lm, path, TEXTS).passed


def test_torch_onnx_fallback_matches(tiny_dirs, tmp_path):
    lm = load_model(str(tiny_dirs["encoder"]))
    assert lm.task == "feature-extraction"
    (tmp_path / "art").mkdir()
    _export_with_torch(lm, tmp_path / "art", 17)
    p = verify_against_torch(lm, tmp_path / "art" / "model.onnx", TEXTS)
    assert p.passed, p


def test_parity_gate_fails_on_different_outputs():
    rng = np.random.default_rng(0)
    a = rng.standard_normal((5, 8))
    assert compare(a, a + 1e-6, 0.999).passed
    assert not compare(a, rng.standard_normal((5, 8)), 0.999).passed
    assert compare(a, -a, None).passed  # recorded, not gated
