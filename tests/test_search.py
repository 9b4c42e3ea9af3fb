"""Depth pruning, Taylor importance, recovery with a task loss, the roofline's host calibration and `compress search`,
on tiny seeded models (plumbing and invariants; the MiniLM numbers come from benchmarks/search.py)."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from compress.cli import main
from compress.core.data import PairSet, calibration_and_heldout, shipped_sentences
from compress.core.errors import CompressError
from compress.core.models import load_model, torch_outputs
from compress.recipe import load_recipe, parse_recipe
from compress.search import (
    BATCH_CONSISTENT,
    QUANT_STAGES,
    drop_se,
    feasible,
    margin_z,
    next_params,
    pareto,
    recipe_toml,
    split_eval,
    trial_stages,
)
from compress.stages.distil import cosent
from compress.stages.layers import block_influence
from compress.stages.recover import hidden_map
from compress.steps import apply_torch_stages
from runtimes.calibration import Calibration

CAL, HELD = calibration_and_heldout(shipped_sentences())


@pytest.fixture(scope="module")
def st(tiny_dirs):
    return load_model(str(tiny_dirs["st"]))


def pairs(n: int = 64) -> PairSet:
    rng = np.random.default_rng(0)
    first = [CAL[i % len(CAL)] for i in range(n)]
    second = [CAL[(i * 7 + 3) % len(CAL)] if i % 2 else CAL[i % len(CAL)] for i in range(n)]
    return PairSet(first, second, [5.0 if i % 2 == 0 else float(rng.uniform(0, 2)) for i in range(n)])


def test_cosent_matches_its_definition():
    a, b = torch.randn(4, 8), torch.randn(4, 8)
    gold = torch.tensor([3.0, 1.0, 2.0, 0.0])
    cos = torch.nn.functional.cosine_similarity(a, b) * 20
    terms = [cos[j] - cos[i] for i in range(4) for j in range(4) if gold[i] > gold[j]]
    expected = torch.log(1 + torch.exp(torch.stack(terms)).sum())
    assert torch.allclose(cosent(a, b, gold), expected, atol=1e-5)


def test_block_influence_and_explicit_blocks(st):
    bi = block_influence(st, CAL[:16], 8)
    assert bi.shape == (2,) and np.all(bi > 0) and np.all(bi < 2)
    recipe = parse_recipe({"stages": [{"type": "prune.layers", "keep": 1}]}, "x", "x.toml")
    lm, reports = apply_torch_stages(list(recipe.stages), copy.deepcopy(st), CAL)
    m = reports[0]["metrics"]
    assert m["kept"] == [int(np.argmax(bi))] and m["blocks_after"] == 1 and lm.config.num_hidden_layers == 1
    assert lm.kept_blocks == tuple(m["kept"]) and m["parameters_after"] < m["parameters_before"]
    explicit = parse_recipe({"stages": [{"type": "prune.layers", "blocks": ["1"]}]}, "x", "x.toml")
    lm2, r2 = apply_torch_stages(list(explicit.stages), copy.deepcopy(st), CAL)
    assert r2[0]["metrics"]["kept"] == [1] and lm2.kept_blocks == (1,)
    with pytest.raises(CompressError, match="does not exist"):
        apply_torch_stages(list(parse_recipe({"stages": [{"type": "prune.layers", "blocks": ["7"]}]}, "x", "x").stages),
                           copy.deepcopy(st), CAL)  # fmt: skip
    with pytest.raises(CompressError, match="removes nothing"):
        apply_torch_stages(list(parse_recipe({"stages": [{"type": "prune.layers", "keep": 2}]}, "x", "x").stages),
                           copy.deepcopy(st), CAL)  # fmt: skip


def test_taylor_importance_and_one_shot_channels(st):
    stages = [{"type": "prune.layers", "keep": 1, "importance": "taylor", "samples": 16},
              {"type": "prune.gradual", "granularity": "channel", "final_sparsity": 0.5, "end_step": 0,
               "total_steps": 0, "importance": "taylor", "samples": 16}]  # fmt: skip
    lm, reports = apply_torch_stages(list(parse_recipe({"stages": stages}, "x", "x").stages), copy.deepcopy(st), CAL)
    scores = reports[0]["metrics"]["scores"]
    assert len(scores) == 2 and all(s >= 0 for s in scores) and scores[0] != scores[1]
    layer = lm.model[0].auto_model.encoder.layer[0]
    assert layer.intermediate.dense.out_features == 32 and reports[1]["metrics"]["steps"] == 0  # 64 -> 32, no training
    with pytest.raises(CompressError, match="taylor for channel / head"):
        parse_recipe({"stages": [{"type": "prune.gradual", "importance": "taylor"}]}, "x", "x")


def test_hidden_map_segment_end():
    assert hidden_map((0, 4, 5), 3, 6) == [4, 5, 6]  # block j answers for the teacher blocks up to the next kept one
    assert hidden_map((), 2, 2) == [1, 2]


def _task_loss(lm, data: PairSet) -> float:
    """CoSENT over every training pair at once, with the model's own outputs (a fixed yardstick)."""
    a = torch.from_numpy(torch_outputs(lm, data.first))
    b = torch.from_numpy(torch_outputs(lm, data.second))
    return float(cosent(a, b, torch.tensor(data.scores)))


def test_recover_with_a_task_loss_trains_toward_the_labels(st):
    data = pairs()
    stages = [{"type": "prune.layers", "keep": 1},
              {"type": "recover", "steps": 24, "batch_size": 16, "learning_rate": 2e-3, "teacher_steps": 2}]  # fmt: skip
    pruned, _ = apply_torch_stages(list(parse_recipe({"stages": stages[:1]}, "x", "x").stages), copy.deepcopy(st), CAL)
    lm, reports = apply_torch_stages(list(parse_recipe({"stages": stages}, "x", "x").stages), copy.deepcopy(st), CAL,
                                     labelled=data)  # fmt: skip
    m = reports[1]["metrics"]
    assert m["labelled"] and m["steps"] == 24 and m["hidden_map"] == [2]
    assert set(m["losses"]) == {"task", "embedding", "hidden"}
    assert _task_loss(lm, data) < _task_loss(pruned, data)  # the same pruned start, trained toward the labels


def test_a_task_loss_without_train_pairs_is_refused_up_front(tiny_dirs, tmp_path):
    recipe = tmp_path / "r.toml"
    recipe.write_text('[[stages]]\ntype = "prune.layers"\nkeep = 1\n\n[[stages]]\ntype = "recover"\n')
    res = CliRunner().invoke(main, ["run", str(tiny_dirs["st"]), "--recipe", str(recipe), "--out", str(tmp_path / "o")])
    assert res.exit_code == 2 and "--train stsb:PATH" in res.stderr and res.stderr.count("\n") == 1
    assert not (tmp_path / "o").exists()


def test_calibration_interpolates_and_changes_the_roofline(tmp_path):
    cal = Calibration({"fp32": [(1, 0.05), (128, 0.4), (4096, 0.8)], "int8": [(1, 0.02), (4096, 0.6)]})
    assert cal.efficiency("fp32", 128) == pytest.approx(0.4) and cal.efficiency("fp32", 10**6) == pytest.approx(0.8)
    assert 0.05 < cal.efficiency("fp32", 16) < 0.4 and cal.shape_factor("int8", 4096) == pytest.approx(1.0)
    assert Calibration.from_dict(json.loads(json.dumps(cal.as_dict()))) == cal


def test_search_space_recipes_and_frontier():
    stages = trial_stages({"blocks": 3, "ffn_keep": 0.5, "heads_keep": 1.0, "precision": "int8-static"}, 6, 100,
                          labelled=True, teacher="tuned")  # fmt: skip
    assert [s["type"] for s in stages] == ["prune.layers", "prune.gradual", "recover", "quant.static"]
    text = recipe_toml("w", "d", stages)
    recipe = parse_recipe(__import__("tomllib").loads(text), "w", "w.toml")
    assert [s.name for s in recipe.stages] == [s["type"] for s in stages]
    probe = trial_stages({"blocks": 6, "ffn_keep": 1.0, "heads_keep": 1.0, "precision": "int8-dynamic"}, 6, 100,
                         labelled=False, teacher="tuned", train=False)  # fmt: skip
    assert [s["type"] for s in probe] == ["quant.dynamic"]
    hybrid = trial_stages({"blocks": 6, "ffn_keep": 1.0, "heads_keep": 1.0, "precision": "int8-hybrid"}, 6, 100,
                          labelled=False, teacher="tuned", train=False)  # fmt: skip
    assert hybrid == [{"type": "quant.hybrid"}] and "int8-hybrid" in BATCH_CONSISTENT
    fused = trial_stages({"blocks": 3, "ffn_keep": 1.0, "heads_keep": 1.0, "precision": "int8-fused-hybrid"}, 6, 100,
                         labelled=True, teacher="tuned")  # fmt: skip
    assert [s["type"] for s in fused] == ["prune.layers", "recover", "graph.optimize", "quant.hybrid"]
    assert "int8-fused-hybrid" in BATCH_CONSISTENT
    rows = [{"trial": 0, "drop": 0.1, "p50_ms": 10, "mb": 5}, {"trial": 1, "drop": 0.2, "p50_ms": 12, "mb": 6},
            {"trial": 2, "drop": 0.5, "p50_ms": 5, "mb": 5}]  # fmt: skip
    assert [r["trial"] for r in pareto(rows)] == [2, 0]


def test_the_confidence_margin_grows_with_noise_and_decides_feasibility():
    rng = np.random.default_rng(0)
    gold = rng.uniform(0, 5, 600)
    base = gold / 5 + rng.normal(0, 0.15, 600)
    assert drop_se(base, base.copy(), gold) == 0  # the same model: the paired bootstrap cancels everything
    small, large = (
        drop_se(base, base + rng.normal(0, 0.02, 600), gold),
        drop_se(base, base + rng.normal(0, 0.2, 600), gold),
    )
    assert 0 < small < large

    class Trial:
        def __init__(self, attrs):
            self.user_attrs = attrs

    near = {"drop": 0.4, "drop_se": 0.5, "batch_consistent": True}
    assert not feasible(Trial(near), 0.5, True, margin_z(0.6))  # inside on the split, not with its margin
    assert feasible(Trial(near), 0.5, True, margin_z(0.5))  # 0.5: no margin
    assert feasible(Trial({"drop": 0.4, "batch_consistent": True}), 0.5, True, 1.0)  # a journal from before the margin


def test_the_bisection_compares_probes_with_probes():
    """A trained trial's re-timed p50 (longer, at another moment) is not on the probes' scale: what is still worth
    training is decided by its probe's p50."""

    class Trial:
        def __init__(self, params, attrs):
            self.params, self.user_attrs = params, attrs

    def params(blocks, ffn):
        return {"blocks": blocks, "ffn_keep": ffn, "heads_keep": 1.0, "precision": "int8-hybrid"}

    probes = [{"params": params(3, 0.5), "p50_ms": 4.0}, {"params": params(3, 1.0), "p50_ms": 8.0},
              {"params": params(4, 0.5), "p50_ms": 9.0}]  # fmt: skip
    won = Trial(params(4, 0.5), {"drop": 0.1, "drop_se": 0.0, "batch_consistent": True, "p50_ms": 7.5,
                                 "probe_p50_ms": 9.0})  # fmt: skip
    assert next_params(probes, [won], 0.5, True) == params(3, 1.0)  # 8.0 < 9.0 probed, although the re-timing said 7.5
    won.user_attrs.pop("probe_p50_ms")  # a journal from before: the re-timed p50 is all there is
    assert next_params(probes, [won], 0.5, True) == params(3, 0.5)


def test_split_eval_alternates_rows(stsb_small, tmp_path):
    from compress.core.evaluate import EvalSpec

    sel, held = split_eval(EvalSpec("stsb", stsb_small), None, tmp_path)
    rows = [r for r in stsb_small.read_text().splitlines() if r.strip()]
    assert sel.read_text().splitlines() == rows[0::2] and held.read_text().splitlines() == rows[1::2]


def test_search_end_to_end_resumes_and_its_recipe_reproduces(tiny_dirs, stsb_small, tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    train = tmp_path / "train.csv"
    train.write_text(stsb_small.read_text())
    out, journal = tmp_path / "s", tmp_path / "study.journal"
    args = ["search", str(tiny_dirs["st"]), "--eval", f"stsb:{stsb_small}", "--train", f"stsb:{train}",
            "--steps", "2", "--runs", "3", "--shapes", "1x16", "--out", str(out), "--storage", f"journal:{journal}",
            "--max-drop", "100", "--teacher", "original", "--allow-batch-dependent"]  # fmt: skip
    res = CliRunner().invoke(main, [*args, "--trials", "2"], catch_exceptions=False)
    assert res.exit_code == 0, res.output
    report = json.loads((out / "report.json").read_text())
    trained = [r for r in report["trials"] if "drop" in r]
    assert len(trained) == 2 and report["winner"] is not None and len(report["architectures"]) >= 4
    assert {"heldout_drop", "selection_drop", "ratio_int8"} <= set(report["winner"])
    assert all(r["drop_se"] >= 0 for r in trained)
    # each trained structure's precision was re-timed on the trained model; the fastest is what was scored and kept
    for r in trained:
        ratios = r["precision_ratios_int8"]
        assert r["precision"] in ratios and ratios[r["precision"]] == min(ratios.values()) == r["ratio_int8"]
    win = next(r for r in trained if r["trial"] == report["winner"]["trial"])
    assert report["winner"]["params"]["precision"] == win["precision"]
    assert load_recipe(str(out / "winner.toml")).stages[-1].name == QUANT_STAGES[win["precision"]][-1]["type"]
    assert (out / "frontier.png").is_file() and (out / "winner" / "onnx" / "model.onnx").is_file()
    assert (out / "winner" / "modules.json").is_file()  # the consumer layout (sentence-transformers files too)
    res = CliRunner().invoke(main, [*args, "--trials", "1", "--force"], catch_exceptions=False)  # resumes the study
    assert res.exit_code == 0, res.output
    assert sum("drop" in r for r in json.loads((out / "report.json").read_text())["trials"]) == 3
    recipe = load_recipe(str(out / "winner.toml"))
    assert recipe.stages[-1].name in ("quant.hybrid", "quant.static", "quant.dynamic")
    res = CliRunner().invoke(main, ["search", str(tiny_dirs["st"]), "--eval", f"stsb:{stsb_small}", "--budget", "soon"])
    assert res.exit_code == 2 and "--budget" in res.stderr
    res = CliRunner().invoke(main, [*args, "--confidence", "1.5", "--force"])
    assert res.exit_code != 0 and "--confidence" in res.output
