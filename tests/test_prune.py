"""prune.gradual on a tiny seeded model: schedule, sparsity reached, structured removal, export parity."""

import copy

import pytest
import torch

from compress.core.data import calibration_and_heldout, shipped_sentences
from compress.core.errors import CompressError
from compress.core.models import linear_layers, load_model
from compress.recipe import parse_recipe
from compress.stages.prune import GradualPrune, cubic_sparsity
from compress.steps import apply_torch_stages
from export.onnx_export import export_onnx
from export.verify import verify_against_torch


def test_cubic_schedule():
    cfg = GradualPrune(final_sparsity=0.8, initial_sparsity=0.0, begin_step=10, end_step=110, total_steps=200)
    assert cubic_sparsity(0, cfg) == 0.0 and cubic_sparsity(10, cfg) == 0.0
    assert cubic_sparsity(110, cfg) == pytest.approx(0.8) and cubic_sparsity(180, cfg) == pytest.approx(0.8)
    assert cubic_sparsity(60, cfg) == pytest.approx(0.8 * (1 - 0.5**3))  # fast early, slow late
    vals = [cubic_sparsity(t, cfg) for t in range(10, 111, 10)]
    assert all(b >= a for a, b in zip(vals, vals[1:]))


@pytest.mark.parametrize(
    "params, pattern",
    [
        ({"final_sparsity": 1.0}, "final_sparsity=1.0"),
        ({"final_sparsity": 0.5, "initial_sparsity": 0.7}, "initial_sparsity"),
        ({"granularity": "block"}, "granularity='block'"),
        ({"end_step": 500, "total_steps": 400}, "end_step <= total_steps"),
    ],
)
def test_bad_values(params, pattern):
    with pytest.raises(CompressError, match=pattern):
        parse_recipe({"stages": [{"type": "prune.gradual", **params}]}, "x", "x.toml")


@pytest.fixture(scope="module")
def tiny(tiny_dirs):
    return load_model(str(tiny_dirs["st"]))


def _run(tiny, **params):
    cal, held = calibration_and_heldout(shipped_sentences())
    recipe = parse_recipe(
        {
            "stages": [
                {"type": "prune.gradual", "end_step": 12, "total_steps": 16, "frequency": 4, "batch_size": 8, **params}
            ]
        },
        "x",
        "x.toml",
    )
    lm, reports = apply_torch_stages(list(recipe.stages), copy.deepcopy(tiny), cal)
    return lm, reports[0]["metrics"], held


def test_unstructured_reaches_sparsity_per_layer_and_exports(tiny, tmp_path):
    lm, m, held = _run(tiny, final_sparsity=0.5)
    for name, mod in linear_layers(lm, ("*encoder*",)).items():
        assert abs(float((mod.weight == 0).float().mean()) - 0.5) < 0.01, name
    assert all(abs(r["sparsity"] - 0.5) < 0.01 for r in m["per_layer"])
    assert m["trajectory"][-1]["sparsity"] == pytest.approx(0.5) and "size win only" in m["expected_speedup"]
    path = export_onnx(lm, tmp_path / "art")
    assert verify_against_torch(lm, path, held[:10]).passed


def test_same_seed_same_weights(tiny):
    a, _, _ = _run(tiny, final_sparsity=0.5, seed=3)
    b, _, _ = _run(tiny, final_sparsity=0.5, seed=3)
    for (n, p), (_, q) in zip(a.model.named_parameters(), b.model.named_parameters()):
        assert torch.equal(p, q), n


def test_channel_pruning_removes_neurons_physically(tiny, tmp_path):
    lm, m, held = _run(tiny, granularity="channel", final_sparsity=0.5)
    for layer in lm.model[0].auto_model.encoder.layer:
        assert layer.intermediate.dense.out_features == 32 and layer.output.dense.in_features == 32
    assert lm.config.intermediate_size == 32 and set(m["removed_units"].values()) == {32}
    path = export_onnx(lm, tmp_path / "art")
    assert verify_against_torch(lm, path, held[:10]).passed
    orig = export_onnx(tiny, tmp_path / "orig")
    assert path.stat().st_size < orig.stat().st_size


def test_head_pruning_uses_transformers_prune_heads(tiny, tmp_path):
    lm, m, held = _run(tiny, granularity="head", final_sparsity=0.25)
    for layer in lm.model[0].auto_model.encoder.layer:
        assert layer.attention.self.num_attention_heads == 3
        assert layer.attention.self.query.out_features == 24
    path = export_onnx(lm, tmp_path / "art")
    assert verify_against_torch(lm, path, held[:10]).passed
