"""int4 RTN, one-shot N:M, and EoRA / SVD compensation: the math, the export, and the CLI on a tiny model."""

import copy
import json
from collections import Counter

import numpy as np
import onnx
import pytest
import torch
from click.testing import CliRunner

from compress.cli import main
from compress.core.data import calibration_and_heldout, shipped_sentences
from compress.core.errors import CompressError
from compress.core.models import load_model, torch_outputs
from compress.recipe import parse_recipe
from compress.stages.int4 import ort_int4_roundtrip
from compress.stages.lowrank import LowRank, factors
from compress.stages.nm import nm_mask, satisfies_nm
from compress.steps import apply_torch_stages, pack_int4_layers
from export.onnx_export import export_onnx
from export.verify import compare
from runtimes.encode import ort_outputs
from runtimes.ort import cpu_session


def _problem(seed=0, d_out=48, d_in=64, n=500, decay=0.9):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, d_in)) * decay ** np.arange(d_in)  # anisotropic activations
    dw = rng.standard_normal((d_out, d_in)) * 0.01
    return dw, x, x.T @ x / n


def _err(m, x):
    return np.linalg.norm(m @ x.T)


@pytest.mark.parametrize("rank", [1, 4, 16])
def test_eora_beats_svd_in_the_activation_norm(rank):
    dw, x, cov = _problem()
    a_e, b_e, _ = factors(dw, cov, LowRank(rank=rank))
    a_s, b_s, _ = factors(dw, None, LowRank(rank=rank))
    assert _err(dw - b_e @ a_e, x) < _err(dw - b_s @ a_s, x) < _err(dw, x)


def test_eora_is_the_exact_minimiser():
    dw, x, cov = _problem(d_out=20, d_in=24, decay=0.95)
    a, b, info = factors(dw, cov, LowRank(rank=24))
    assert _err(dw - b @ a, x) < 1e-6 * _err(dw, x) and info["clamped_eigenvalues"] == 0
    # Against the closed form: the best rank-r approximation of ΔW X (Eckart-Young).
    r = 5
    a, b, _ = factors(dw, cov, LowRank(rank=r))
    s = np.linalg.svd(dw @ x.T, compute_uv=False)
    assert abs(_err(dw - b @ a, x) - np.sqrt((s[r:] ** 2).sum())) < 1e-6 * _err(dw, x)


def test_degenerate_covariance_is_clamped_not_crashed():
    dw, x, _ = _problem()
    x[:, 10:] = 0  # rank-deficient activations
    a, b, info = factors(dw, x.T @ x / len(x), LowRank(rank=8))
    assert info["clamped_eigenvalues"] >= 54 and np.isfinite(a).all() and np.isfinite(b).all()


def test_rank_by_explained_error():
    dw, _, cov = _problem()
    _, _, low = factors(dw, cov, LowRank(rank=64, explained=0.5))
    _, _, high = factors(dw, cov, LowRank(rank=64, explained=0.95))
    assert 1 <= low["rank"] < high["rank"] <= 64


def test_int4_roundtrip_is_on_ort_grid():
    w = np.random.default_rng(0).standard_normal((64, 48)).astype(np.float32)
    for sym in (False, True):
        q = ort_int4_roundtrip(w, 32, sym)
        assert 0.02 < np.linalg.norm(w - q) / np.linalg.norm(w) < 0.2
        assert np.abs(ort_int4_roundtrip(q, 32, sym) - q).max() < 1e-6  # re-quantization is lossless
        assert len(np.unique(q[:32, 0])) <= 16  # 16 levels per block


def test_nm_mask_pattern():
    w = torch.randn(8, 16)
    m = nm_mask(w, 2, 4)
    assert m.float().mean() == 0.5 and satisfies_nm(w * m, 2, 4) and not satisfies_nm(w, 2, 4)
    kept = (w * m).abs().reshape(8, 4, 4)
    dropped = (w * ~m).abs().reshape(8, 4, 4)
    assert (kept.max(-1).values >= dropped.max(-1).values).all()


@pytest.mark.parametrize(
    "stage, pattern",
    [
        ({"type": "prune.nm", "n": 4, "m": 2}, "1 <= n < m"),
        ({"type": "prune.nm", "n": 2, "m": 4, "method": "magnitude"}, "not available"),
        ({"type": "lowrank.eora", "rank": 0}, "rank=0"),
        ({"type": "lowrank.eora", "explained": 1.0}, "explained"),
        ({"type": "quant.int4", "block_size": 24}, "block_size"),
    ],
)
def test_impossible_values_are_refused(stage, pattern):
    with pytest.raises(CompressError, match=pattern):
        parse_recipe({"stages": [stage]}, "x", "x.toml")


@pytest.fixture(scope="module")
def tiny(tiny_dirs):
    return load_model(str(tiny_dirs["st"]))


def test_lowrank_needs_a_compressing_stage_first(tiny):
    with pytest.raises(CompressError, match="earlier compressing stage"):  # refused when the recipe is read
        parse_recipe({"stages": [{"type": "lowrank.eora"}]}, "x", "x.toml")
    with pytest.raises(CompressError, match="earlier compressing stage"):
        parse_recipe({"stages": [{"type": "lowrank.svd"}, {"type": "quant.int4"}]}, "x", "x.toml")
    recipe = parse_recipe({"stages": [{"type": "prune.gradual"}, {"type": "lowrank.eora"}]}, "x", "x.toml")
    stages = [recipe.stages[1]]  # applied alone, the stage still says what is missing
    with pytest.raises(CompressError, match="after a compressing stage"):
        apply_torch_stages(stages, copy.deepcopy(tiny), shipped_sentences()[:8])


@pytest.mark.parametrize("method", ["eora", "svd"])
def test_int4_plus_lowrank_exports_matmulnbits_and_thin_float_matmuls(tiny, tmp_path, method):
    cal, held = calibration_and_heldout(shipped_sentences())
    recipe = parse_recipe(
        {
            "stages": [
                {"type": "quant.int4", "block_size": 32},
                {"type": f"lowrank.{method}", "rank": 4, "calibration_samples": 16},
            ]
        },
        "x",
        "x.toml",
    )
    lm, reports = apply_torch_stages(list(recipe.stages), copy.deepcopy(tiny), cal)
    lr = reports[1]["metrics"]
    assert lr["layers"] == 12 and lr["mean_error_after"] < lr["mean_error_before"]
    assert all(r["rank"] == 4 and r["added_params"] > 0 for r in lr["per_layer"])
    path = export_onnx(lm, tmp_path / "art")
    assert compare(
        torch_outputs(lm, held[:20]), ort_outputs(cpu_session(path, 1), lm.tokenizer, held[:20], lm.task), 0.999
    ).passed
    packed, report = pack_int4_layers(lm, path, tmp_path)
    ops = Counter(n.op_type for n in onnx.load(str(packed)).graph.node)
    assert ops["MatMulNBits"] == 12 and ops["MatMul"] >= 24  # 2 low-rank MatMuls per layer stay float
    assert report["metrics"]["packed_matmuls"] == 12
    got = ort_outputs(cpu_session(packed, 1), lm.tokenizer, held[:20], lm.task)
    assert compare(torch_outputs(lm, held[:20]), got, 0.99).passed


def test_cli_int4_eora_on_tiny_model(tiny_dirs, tmp_path):
    out = tmp_path / "run"
    res = CliRunner().invoke(
        main,
        ["run", str(tiny_dirs["st"]), "--recipe", "int4-eora", "--out", str(out), "--runs", "3", "--shapes", "1x16"],
        catch_exceptions=False,
    )
    assert res.exit_code == 0, res.output
    rep = json.loads((out / "report.json").read_text())
    assert [s["name"] for s in rep["stages"]] == ["quant.int4", "lowrank.eora", "export.int4_pack"]
    assert rep["parity"]["compressed_float_export"]["passed"]
    assert Counter(n.op_type for n in onnx.load(str(out / "onnx" / "model.onnx")).graph.node)["MatMulNBits"] == 12


def test_int4_eora_then_int8_lowrank_factors(tiny_dirs, tmp_path):
    """quant.int4 -> lowrank.eora -> quant.dynamic: int4 weights packed, the thin A/B MatMuls in int8."""
    recipe = tmp_path / "r.toml"
    recipe.write_text(
        '[[stages]]\ntype = "quant.int4"\n[[stages]]\ntype = "lowrank.eora"\nrank = 4\n'
        'calibration_samples = 16\n[[stages]]\ntype = "quant.dynamic"\nop_types = ["MatMul"]\n'
    )
    out = tmp_path / "run"
    res = CliRunner().invoke(
        main,
        ["run", str(tiny_dirs["st"]), "--recipe", str(recipe), "--out", str(out), "--runs", "3", "--shapes", "1x16"],
        catch_exceptions=False,
    )
    assert res.exit_code == 0, res.output
    ops = Counter(n.op_type for n in onnx.load(str(out / "onnx" / "model.onnx")).graph.node)
    assert ops["MatMulNBits"] == 12 and ops["MatMulInteger"] >= 24
    rep = json.loads((out / "report.json").read_text())
    assert next(e for e in rep["eval"] if e["name"] == "fidelity")["compressed"] > 0.95
