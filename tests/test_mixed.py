"""quant.mixed: the deployed grids, the Hutchinson trace, the bisection, the budget flags, and a real run."""

import copy
import json
import math
from collections import Counter

import numpy as np
import onnx
import pytest
import torch
from click.testing import CliRunner

from compress.cli import main
from compress.core.data import shipped_sentences
from compress.core.errors import CompressError
from compress.core.models import linear_layers, load_model
from compress.recipe import apply_overrides, load_recipe, parse_recipe
from compress.stages.mixed import _batches, _outputs, bisect, hessian_traces, int8_weight, parse_drop, weight_bytes


@pytest.fixture(scope="module")
def tiny(tiny_dirs):
    return load_model(str(tiny_dirs["st"]))


def test_int8_grid_is_orts_per_channel_symmetric():
    """Our torch simulation equals what ORT's quantizer stores for each output channel."""
    from onnxruntime.quantization.quant_utils import quantize_data

    w = torch.randn(6, 40) * torch.linspace(0.1, 3, 6)[:, None]
    ours = int8_weight(w)
    for row, got in zip(w.numpy(), ours.numpy()):
        zp, scale, q = quantize_data(row, onnx.TensorProto.INT8, symmetric=True)
        np.testing.assert_allclose(got, (q.astype(np.float32) - zp) * scale, rtol=1e-5, atol=1e-7)


def test_weight_bytes():
    assert weight_bytes(384, 1536, "float", 32) == 4 * 384 * 1536
    assert weight_bytes(384, 1536, "int8-dynamic", 32) == 384 * 1536 + 5 * 1536
    # 12 blocks of 32: 16 bytes of nibbles + 4 bytes of scale each, 6 bytes of packed zero points per column
    assert weight_bytes(384, 1536, "int4-weights", 32) == 1536 * (12 * 16 + 12 * 4 + 6)


def test_bisection_finds_the_largest_feasible_k_in_log_probes():
    for n in (1, 7, 72):
        for limit in range(n + 1):
            calls = []

            def probe(k):
                calls.append(k)
                drop = 0.1 * k  # monotone in k
                return {"drop": drop, "feasible": drop <= 0.1 * limit + 1e-9}

            assert bisect(n, probe, (0.0, 0.1 * limit + 1e-9)) == limit
            assert len(calls) <= math.ceil(math.log2(n + 1)) + 1


def test_bisection_stops_inside_the_tolerance_band():
    calls = []

    def probe(k):
        calls.append(k)
        return {"drop": 0.01 * k, "feasible": 0.01 * k <= 0.5}

    k = bisect(72, probe, (0.3, 0.5))
    assert 0.3 <= 0.01 * k <= 0.5 and len(calls) == 2  # 72 (too much), then 36: inside the band


def test_hutchinson_trace_matches_the_exact_trace(tiny):
    """The estimate agrees with the exact trace of one layer's Hessian block (sum of e_i^T H e_i), is
    reproducible with a fixed seed, and changes with the seed."""
    lm = copy.deepcopy(tiny)
    name = "0.model.encoder.layer.1.attention.self.query"
    layers = {name: dict(lm.model.named_modules())[name]}
    batches = _batches(lm, shipped_sentences()[:8], size=8)
    with torch.inference_mode():
        refs = [_outputs(lm, b).clone() for b in batches]
    est = hessian_traces(lm, layers, batches, refs, samples=300, seed=0)[name]
    again = hessian_traces(lm, layers, batches, refs, samples=300, seed=0)[name]
    other = hessian_traces(lm, layers, batches, refs, samples=300, seed=1)[name]
    assert est == again and est != other

    from torch.nn.attention import SDPBackend, sdpa_kernel

    from compress.stages.distil import distil_loss

    w = layers[name].weight
    w.requires_grad_(True)
    with sdpa_kernel(SDPBackend.MATH):
        g = torch.autograd.grad(distil_loss(_outputs(lm, batches[0]), refs[0], lm.task), w, create_graph=True)[0]
        flat = g.reshape(-1)
        exact = sum(
            float(torch.autograd.grad(flat[i], w, retain_graph=True)[0].reshape(-1)[i]) for i in range(flat.numel())
        )
    assert exact > 0
    assert abs(est["trace"] - exact) <= max(4 * est["stderr"], 0.05 * exact), (est, exact)


def with_budget(recipe, max_drop, min_drop):
    overrides = {k: v for k, v in (("max_drop", max_drop), ("min_drop", min_drop)) if v is not None}
    return apply_overrides(recipe, overrides, {k: "--" + k.replace("_", "-") for k in overrides})


def test_budget_flags():
    assert parse_drop("0.3", "--max-drop") == (0.3, False)
    assert parse_drop("0.5%", "--max-drop") == (0.5, True)
    with pytest.raises(CompressError, match="not a number"):
        parse_drop("abc", "--max-drop")
    with pytest.raises(CompressError, match=">= 0"):
        parse_drop("-1", "--max-drop")
    recipe = with_budget(load_recipe("mixed"), "0.2", "0.1")
    cfg = recipe.stages[0].config
    assert (cfg.max_drop, cfg.min_drop, cfg.relative) == (0.2, 0.1, False)
    with pytest.raises(CompressError, match="min_drop <= max_drop"):
        with_budget(load_recipe("mixed"), "0.1", "0.2")
    with pytest.raises(CompressError, match="does not have"):
        with_budget(load_recipe("cpu-default"), "0.3", None)


@pytest.mark.parametrize(
    "stage, match",
    [
        ({"candidates": ["int2"]}, "candidates"),
        ({"ordering": "random"}, "ordering"),
        ({"candidates": ["int8-dynamic", "int8-qdq"]}, "one int8"),
        ({"max_drop": -1}, "min_drop <= max_drop"),
    ],
)
def test_bad_parameters_are_refused(stage, match):
    with pytest.raises(CompressError, match=match):
        parse_recipe({"stages": [{"type": "quant.mixed", **stage}]}, "x", "x.toml")


def test_cli_refuses_max_drop_without_mixed(tiny_dirs, tmp_path):
    res = CliRunner().invoke(main, ["run", str(tiny_dirs["st"]), "--max-drop", "0.3", "--out", str(tmp_path / "o")])
    assert res.exit_code == 2 and "--recipe mixed" in res.output and len(res.output.strip().splitlines()) == 1
    assert not (tmp_path / "o").exists()


def _run_mixed(tiny_dirs, tmp_path, *extra):
    out = tmp_path / "run"
    res = CliRunner().invoke(
        main,
        [
            "run",
            str(tiny_dirs["st"]),
            "--recipe",
            "mixed",
            "--out",
            str(out),
            "--runs",
            "3",
            "--shapes",
            "1x16",
            *extra,
        ],
        catch_exceptions=False,
    )
    assert res.exit_code == 0, res.output
    rep = json.loads((out / "report.json").read_text())
    return out, rep, next(s for s in rep["stages"] if s["name"] == "quant.mixed")["metrics"]


def test_mixed_run_on_tiny_model(tiny_dirs, tmp_path):
    """A generous budget takes every move: 12 Linears in MatMulNBits and the word embeddings in
    GatherBlockQuantized, in one ORT-loadable model; the report explains every layer and shows the search;
    a zero budget keeps what does not lose."""
    out, rep, m = _run_mixed(tiny_dirs, tmp_path, "--max-drop", "100")
    assert m["moves_applied"] == m["moves_total"] == 26 and m["evaluations"] == 2
    assert m["layers"] == {"float": 0, "int8-dynamic": 0, "int4-weights": 13}
    ops = Counter(n.op_type for n in onnx.load(str(out / "onnx" / "model.onnx")).graph.node)
    assert ops["MatMulNBits"] == 12 and ops["GatherBlockQuantized"] == 1
    assert len(m["per_layer"]) == 13 and all(r["trace"] != 0 and "omega_int4-weights" in r for r in m["per_layer"])
    assert (out / "mixed_search.png").is_file() and "## Mixed precision" in (out / "report.md").read_text()

    out2, _, m0 = _run_mixed(tiny_dirs, tmp_path / "zero", "--max-drop", "0")
    assert m0["within_budget"] and m0["evaluations"] <= math.ceil(math.log2(27)) + 2


def test_mixed_search_mixes_precisions(tiny_dirs, tmp_path):
    """A budget between 'all int8' and 'all int4' yields one model holding float-free int8 and int4 layers."""
    lm = load_model(str(tiny_dirs["st"]))
    assert len(linear_layers(lm, ("*encoder*",))) == 12
    _, _, full = _run_mixed(tiny_dirs, tmp_path / "a", "--max-drop", "100")
    all_int8 = next(r for r in full["trajectory"] if r["k"] == 26)  # sanity: the 'everything' probe
    budget = max(all_int8["drop"] / 2, 1e-4)
    out, _, m = _run_mixed(tiny_dirs, tmp_path / "b", "--max-drop", f"{budget:.6f}")
    assert m["chosen_drop"] is None or m["chosen_drop"] <= budget
    ops = Counter(n.op_type for n in onnx.load(str(out / "onnx" / "model.onnx")).graph.node)
    assert sum(m["layers"].values()) == 13
    assert ops["MatMulNBits"] + ops["GatherBlockQuantized"] == m["layers"]["int4-weights"]


def test_latency_aware_times_the_feasible_probes_and_the_all_int8_boundary(tiny_dirs, tmp_path):
    recipe = tmp_path / "r.toml"
    recipe.write_text('[[stages]]\ntype = "quant.mixed"\nlatency_aware = true\nlatency_runs = 3\nmax_drop = 100\n')
    out = tmp_path / "run"
    res = CliRunner().invoke(
        main,
        ["run", str(tiny_dirs["st"]), "--recipe", str(recipe), "--out", str(out), "--runs", "3", "--shapes", "1x16"],
        catch_exceptions=False,
    )
    assert res.exit_code == 0, res.output
    m = json.loads((out / "report.json").read_text())["stages"][0]["metrics"]
    timed = {t["k"]: t["p50_ms"] for t in m["latency_timed"]}
    assert set(timed) == {13, 26} and all(v > 0 for v in timed.values())  # all int8 (boundary) and all int4
    assert m["moves_applied"] == min(timed, key=lambda k: (timed[k], -k))
    assert m["evaluations"] == 3
