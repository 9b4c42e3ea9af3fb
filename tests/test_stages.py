"""ONNX stages on a tiny exported BERT: the graph really changes and the outputs stay close."""

from collections import Counter
from pathlib import Path

import onnx
import pytest

from compress.core.data import calibration_and_heldout, shipped_sentences
from compress.core.models import load_model
from compress.recipe import load_recipe, parse_recipe
from compress.steps import apply_onnx_stages, onnx_context
from export.onnx_export import export_onnx
from export.verify import compare
from runtimes.encode import ort_outputs
from runtimes.ort import cpu_session


@pytest.fixture(scope="module")
def exported(tiny_dirs, tmp_path_factory):
    lm = load_model(str(tiny_dirs["st"]))
    path = export_onnx(lm, tmp_path_factory.mktemp("exp") / "art")
    cal, held = calibration_and_heldout(shipped_sentences())
    return lm, path, onnx_context([], lm, cal[:24]), held[:40]


def _ops(path: Path) -> Counter:
    return Counter(n.op_type for n in onnx.load(str(path)).graph.node)


@pytest.mark.parametrize(
    "recipe, expect_ops, min_cos",
    [
        ("dynamic-int8", {"MatMulInteger", "DynamicQuantizeLinear"}, 0.97),
        ("static-int8", {"QuantizeLinear", "DequantizeLinear"}, 0.95),
        ("fused", {"Attention"}, 0.9999),
        ("fused-dynamic-int8", {"QAttention"}, 0.97),
    ],
)
def test_recipe_changes_graph_and_keeps_outputs(exported, tmp_path, monkeypatch, recipe, expect_ops, min_cos):
    lm, path, ctx, held = exported
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    work = tmp_path / "work"
    work.mkdir()
    out, reports = apply_onnx_stages(list(load_recipe(recipe).stages), path, work, ctx)
    assert list(cwd.iterdir()) == []  # ORT's shape-inference droppings stay out of the user's folder
    assert expect_ops <= set(_ops(out)), _ops(out)
    assert [r["name"] for r in reports] == [s.name for s in load_recipe(recipe).stages]
    ref = ort_outputs(cpu_session(path, 1), lm.tokenizer, held, lm.task)
    got = ort_outputs(cpu_session(out, 1), lm.tokenizer, held, lm.task)
    assert compare(ref, got, min_cos).passed
    if recipe != "fused":
        assert reports[-1]["metrics"]["bytes"] < reports[-1]["metrics"]["bytes_before"]


def test_static_quant_uses_the_calibration_count(exported, tmp_path):
    from compress.stages.quant import StaticQuant, apply_static

    lm, path, ctx, _ = exported
    m = apply_static(StaticQuant(samples=5), path, tmp_path / "q.onnx", ctx)
    assert m["calibration_samples"] == 5
    assert not list(tmp_path.glob("*.pre.onnx")) and not list(tmp_path.glob("augmented_model*"))


# ---- quant.hybrid: batch-independent int8 ------------------------------------------------------------------------


def test_hybrid_is_batch_independent_and_keeps_outputs(exported, tmp_path):
    """Fixed calibrated scales everywhere but the FFN down-projection (found by its GELU), per-token scales there: a
    text's output is the same alone and inside padded batches, unlike plain dynamic int8's."""
    from runtimes.consistency import batch_consistency

    lm, path, ctx, held = exported
    out, reports = apply_onnx_stages(list(load_recipe("hybrid-int8").stages), path, tmp_path, ctx)
    m = reports[-1]["metrics"]
    assert (m["fixed_scale_inputs"], m["per_token_inputs"]) == (6, 2)  # 2 layers: QKV, attention out, FFN up | down
    assert all(n.endswith("output/dense/MatMul") for n in m["per_token_matmuls"]) and len(m["per_token_matmuls"]) == 2
    ops = _ops(out)
    assert ops["MatMulIntegerToFloat"] == 12 and "DynamicQuantizeLinear" not in ops and "MatMulInteger" not in ops
    assert m["bytes"] < m["bytes_before"] and m["calibration_samples"] == 24
    c = batch_consistency(out, lm.tokenizer, held, lm.task, lm.max_length, batch=8)
    assert c["batch_independent"] and c["alone_vs_batch"]["min"] >= 0.9999
    assert c["optimization_levels"]["min"] > 0.99  # ORT's fusions move int8 outputs a little, never the row scales
    ref = ort_outputs(cpu_session(path, 1), lm.tokenizer, held, lm.task)
    assert compare(ref, ort_outputs(cpu_session(out, 1), lm.tokenizer, held, lm.task), 0.97).passed
    (tmp_path / "asym").mkdir()
    asym_recipe = parse_recipe({"stages": [{"type": "quant.hybrid", "symmetric": False}]}, "a", "a")
    asym, _ = apply_onnx_stages(list(asym_recipe.stages), path, tmp_path / "asym", ctx)
    assert batch_consistency(asym, lm.tokenizer, held, lm.task, lm.max_length, batch=8)["batch_independent"]


def test_hybrid_per_token_patterns_and_refusals(exported, tmp_path):
    from compress.core.errors import CompressError
    from compress.stages.hybrid import HybridQuant

    lm, path, ctx, _ = exported
    recipe = parse_recipe(
        {"stages": [{"type": "quant.hybrid", "per_token": ["*attention/output/dense/MatMul"]}]}, "p", "p"
    )
    _, reports = apply_onnx_stages(list(recipe.stages), path, tmp_path, ctx)
    chosen = reports[0]["metrics"]["per_token_matmuls"]
    assert len(chosen) == 2 and all(n.endswith("attention/output/dense/MatMul") for n in chosen)
    for bad in ({"samples": 0}, {"reduce_range": "maybe"}):
        with pytest.raises(CompressError, match="quant.hybrid"):
            parse_recipe({"stages": [{"type": "quant.hybrid", **bad}]}, "b", "b")
    assert HybridQuant().per_token == ("auto",)


def test_hybrid_on_a_fused_graph_fixes_the_qattention_scales(exported, tmp_path):
    """graph.optimize first: the attention input feeds one QAttention per layer, which reads the calibrated constant
    scale and zero point; the FFN down-projection (after BiasGelu now) keeps per-token scales. Batch-independent."""
    from runtimes.consistency import batch_consistency

    lm, path, ctx, held = exported
    out, reports = apply_onnx_stages(list(load_recipe("fused-hybrid-int8").stages), path, tmp_path, ctx)
    m = reports[-1]["metrics"]
    assert (m["fixed_scale_inputs"], m["per_token_inputs"]) == (6, 2)
    g = onnx.load(str(out)).graph
    inits = {t.name for t in g.initializer}
    attention = [n for n in g.node if n.op_type == "QAttention"]
    assert len(attention) == 2 and all(n.input[3] in inits and n.input[6] in inits for n in attention)
    assert "DynamicQuantizeLinear" not in _ops(out)
    c = batch_consistency(out, lm.tokenizer, held, lm.task, lm.max_length, batch=8)
    assert c["batch_independent"] and c["alone_vs_batch"]["min"] >= 0.9999
    ref = ort_outputs(cpu_session(path, 1), lm.tokenizer, held, lm.task)
    assert compare(ref, ort_outputs(cpu_session(out, 1), lm.tokenizer, held, lm.task), 0.97).passed
