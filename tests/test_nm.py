"""prune.nm trained with progressive gradient flow (MDGF / SDGF), SR-STE and one-shot + recovery, on a tiny model."""

import copy
import math

import pytest
import torch

from compress.core.data import calibration_and_heldout, shipped_sentences
from compress.core.errors import CompressError
from compress.core.models import linear_layers, load_model
from compress.recipe import load_recipe, parse_recipe
from compress.stages.nm import NMPrune, attach, decay_factor, nm_mask, phases, satisfies_nm, sdgf_frame, sdgf_frames
from compress.steps import apply_torch_stages
from export.onnx_export import export_onnx
from export.verify import verify_against_torch


def test_mask_decay_formula():
    assert decay_factor(0, 100, "exponential") == 1.0
    assert decay_factor(100, 100, "exponential") == pytest.approx(math.exp(-5))  # k = 5 / T_decay
    assert decay_factor(30, 100, "exponential", rate=0.1) == pytest.approx(math.exp(-3))
    assert decay_factor(0, 100, "linear") == 1.0 and decay_factor(25, 100, "linear") == pytest.approx(0.75)
    assert decay_factor(100, 100, "linear") == 0.0 and decay_factor(10, 100, "linear", rate=0.2) == 0.0


def test_phases_are_fractions_of_the_steps():
    assert phases(NMPrune(method="mdgf", steps=200, dense_fraction=0.1, finetune_fraction=0.2)) == (20, 140, 40)
    assert phases(NMPrune(method="sdgf", steps=10, dense_fraction=0.0, finetune_fraction=1.0)) == (0, 0, 10)
    assert phases(NMPrune(method="oneshot", steps=50)) == (0, 0, 50)


def test_sdgf_schedule_sequence():
    assert sdgf_frames(2, 4, "stepwise") == [(3, 4), (2, 4)]
    assert sdgf_frames(1, 8, "stepwise") == [(7, 8), (4, 8), (2, 8), (1, 8)]
    assert sdgf_frames(2, 4, "geometric") == [(16, 32), (8, 16), (4, 8), (2, 4)]
    assert [sdgf_frame(t, 8, sdgf_frames(2, 4, "geometric")) for t in range(8)] == [
        (16, 32),
        (16, 32),
        (8, 16),
        (8, 16),
        (4, 8),
        (4, 8),
        (2, 4),
        (2, 4),
    ]


def _grad(state, w, x):
    lin = torch.nn.Linear(8, 4, bias=False)
    with torch.no_grad():
        lin.weight.copy_(w)
    hook = attach(lin, state)
    lin(x).pow(2).sum().backward()
    hook.remove()
    return lin.weight.detach(), lin.parametrizations.weight.original.grad


def test_mdgf_forward_straight_through_and_masked_gradient():
    torch.manual_seed(0)
    w, x = torch.randn(4, 8), torch.randn(3, 8)
    mask = nm_mask(w, 2, 4)
    f = mask.float() + 0.3 * (1 - mask.float())  # m + a_t (1 - m), a_t = 0.3
    w_eff = w * f
    g_eff = 2 * (x @ w_eff.T).T @ x  # dL/dW_eff of sum((x W_eff^T)^2)
    val, g = _grad({"factor": f, "exact": False, "mask": mask, "lam": 0.0}, w, x)
    assert torch.allclose(val, w_eff) and torch.allclose(g, g_eff, atol=1e-5)  # straight-through
    _, g = _grad({"factor": f, "exact": True, "mask": mask, "lam": 0.0}, w, x)
    assert torch.allclose(g, g_eff * f, atol=1e-5)  # masked reading


def test_srste_gradient_term():
    torch.manual_seed(1)
    w, x = torch.randn(4, 8), torch.randn(3, 8)
    mask = nm_mask(w, 2, 4)
    w_eff = w * mask
    g_eff = 2 * (x @ w_eff.T).T @ x
    _, g = _grad({"factor": mask.float(), "exact": False, "mask": mask, "lam": 2e-4}, w, x)
    assert torch.allclose(g, g_eff + 2e-4 * (~mask) * w, atol=1e-6)
    assert not torch.allclose(g, g_eff, atol=1e-6)


@pytest.mark.parametrize(
    "params, pattern",
    [
        ({"n": 5, "m": 4}, "1 <= n < m"),
        ({"method": "magnitude"}, "method 'magnitude' is not available"),
        ({"method": "mdgf", "steps": 10, "decay": "cubic"}, "decay 'cubic'"),
        ({"method": "sdgf", "steps": 10, "schedule": "random"}, "schedule 'random'"),
        ({"method": "mdgf", "steps": 10, "dense_fraction": 1.5}, "must each be in \\[0, 1\\]"),
        ({"method": "mdgf", "steps": 10, "dense_fraction": 0.6, "finetune_fraction": 0.5}, "sum to <= 1"),
        ({"method": "srste"}, "set steps >= 1"),
    ],
)
def test_bad_values(params, pattern):
    with pytest.raises(CompressError, match=pattern):
        parse_recipe({"stages": [{"type": "prune.nm", **params}]}, "x", "x.toml")


def test_shipped_recipes_parse():
    assert load_recipe("nm-2-4").stages[0].config.method == "mdgf"
    assert load_recipe("nm-2-4-oneshot").stages[0].config.steps == 0


@pytest.fixture(scope="module")
def tiny(tiny_dirs):
    return load_model(str(tiny_dirs["st"]))


def _run(tiny, progress=lambda m: None, **params):
    cal, held = calibration_and_heldout(shipped_sentences())
    recipe = parse_recipe({"stages": [{"type": "prune.nm", "batch_size": 8, **params}]}, "x", "x.toml")
    lm, reports = apply_torch_stages(list(recipe.stages), copy.deepcopy(tiny), cal, progress=progress)
    return lm, reports[0]["metrics"], held


@pytest.mark.parametrize(
    "params",
    [
        {"method": "oneshot", "steps": 8},
        {"method": "mdgf", "steps": 12, "decay": "linear"},
        {"method": "mdgf", "steps": 12, "masked_gradient": True},
        {"method": "sdgf", "steps": 12, "schedule": "geometric"},
        {"method": "srste", "steps": 12, "finetune_fraction": 0.0},
    ],
)
def test_pattern_exact_after_training(tiny, params):
    lm, m, _ = _run(tiny, **params)
    layers = linear_layers(lm, ("*encoder*",))
    assert m["layers"] == len(layers) == 12 and m["all_patterns_ok"]
    for name, mod in layers.items():
        assert not torch.nn.utils.parametrize.is_parametrized(mod), name
        assert satisfies_nm(mod.weight, 2, 4) and float((mod.weight == 0).float().mean()) == pytest.approx(
            0.5, abs=0.01
        )
    assert all(r["pattern_ok"] and r["pattern"] == "2:4" for r in m["per_layer"])
    assert "size win only" in m["expected_speedup"] and m["trajectory"][-1]["sparsity"] == 0.5
    if params["method"] == "oneshot":  # recovery keeps the magnitude mask
        assert all(r["mask_changed_vs_oneshot"] == 0.0 for r in m["per_layer"])


def test_mdgf_phases_progress_and_export(tiny, tmp_path):
    lines = []
    lm, m, held = _run(tiny, progress=lines.append, method="mdgf", steps=8, dense_fraction=0.25, finetune_fraction=0.25)
    assert m["phases"] == {"dense": 2, "decay": 4, "finetune": 2}
    traj = m["trajectory"]  # one entry per step at 8 steps
    assert [t["phase"] for t in traj] == ["dense"] * 2 + ["decay"] * 4 + ["finetune"] * 2
    assert [t["a_t"] for t in traj[2:6]] == [round(math.exp(-5 * t / 4), 4) for t in range(4)]  # t from decay start
    assert any("a_t 1.000" in line and "step 3/8" in line for line in lines)
    assert any(r["mask_changed_vs_oneshot"] > 0 for r in m["per_layer"])  # masks follow the dense weights
    path = export_onnx(lm, tmp_path / "art")
    assert verify_against_torch(lm, path, held[:10]).passed


def test_same_seed_same_weights(tiny):
    a, _, _ = _run(tiny, method="sdgf", steps=8, seed=3)
    b, _, _ = _run(tiny, method="sdgf", steps=8, seed=3)
    c, _, _ = _run(tiny, method="sdgf", steps=8, seed=4)
    pairs = list(zip(a.model.named_parameters(), b.model.named_parameters(), c.model.named_parameters()))
    assert all(torch.equal(p, q) for (_, p), (_, q), _ in pairs)
    assert not all(torch.equal(p, r) for (_, p), _, (_, r) in pairs)
