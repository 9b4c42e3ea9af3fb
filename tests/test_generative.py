"""Generative models: optimum export with past, greedy-token parity, TTFT/tokens-per-second profiler, CLI."""

import json

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from onnx import numpy_helper

from compress.cli import main
from compress.core.errors import CompressError
from compress.core.kinds import artifact_kind
from export.generative import check_generation, compare_tokens, export_generative, greedy, load_ort
from runtimes.generative import GenPoint, GenProfileConfig, OrtGenerator, measure_generation

PROMPTS = ["The coffee machine in the office", "She forgot her umbrella and", "Fresh bread from the corner"]
FAST = ["--runs", "2", "--shapes", "1x16", "--new-tokens", "4"]


@pytest.fixture(scope="module")
def gen_models(tmp_path_factory):
    """gpt2-tiny and t5-tiny model folders (random init, BPE tokenizer) and their float ONNX exports."""
    import torch

    from compress import random_lm
    from compress.cli import _quiet_libraries
    from export.generative import load_torch

    _quiet_libraries()
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("gen")
    out = {}
    for name, kind in (("gpt2-tiny", "text-generation"), ("t5-tiny", "text2text-generation")):
        random_lm.save(name, root / name)
        model, tok = load_torch(root / name, kind)
        export_generative(model, tok, kind, root / f"{name}-onnx")
        out[name] = (root / name, root / f"{name}-onnx", kind, model, tok)
    return out


@pytest.mark.parametrize("name", ["gpt2-tiny", "t5-tiny"])
def test_float_export_generates_torchs_tokens(gen_models, name):
    _, onnx_dir, kind, model, tok = gen_models[name]
    assert artifact_kind(onnx_dir) == kind
    files = {p.name for p in onnx_dir.iterdir()}
    assert {"config.json", "generation_config.json", "tokenizer.json"} <= files
    assert "decoder_model_merged.onnx" not in files
    parity, got = check_generation(model, tok, onnx_dir, kind, PROMPTS, new_tokens=12)
    assert parity.passed and parity.identical == len(PROMPTS) and parity.token_agreement == 1.0
    assert len(set(got.ravel().tolist())) > 3  # not one repeated token: the check can tell models apart
    # the hand-driven decode loop the profiler times produces the same tokens as torch
    gen = OrtGenerator(onnx_dir, threads=1)
    ids = tok(PROMPTS[:1], return_tensors="np")["input_ids"]
    tokens, ttft, steps = gen.generate(ids, 12)
    assert np.array_equal(tokens, greedy(model, tok, PROMPTS[:1], 12))
    assert ttft > 0 and len(steps) == 11


def test_parity_fails_on_a_corrupted_export(gen_models, tmp_path):
    import shutil

    _, onnx_dir, kind, model, tok = gen_models["gpt2-tiny"]
    bad = tmp_path / "bad"
    shutil.copytree(onnx_dir, bad)
    m = onnx.load(str(bad / "model.onnx"))
    init = max(m.graph.initializer, key=lambda t: int(np.prod(t.dims)))  # the token embedding / LM head
    w = numpy_helper.to_array(init)
    init.CopyFrom(
        numpy_helper.from_array(w + np.random.default_rng(0).normal(0, w.std(), w.shape).astype(w.dtype), init.name)
    )
    onnx.save(m, str(bad / "model.onnx"))
    parity, _ = check_generation(model, tok, bad, kind, PROMPTS, new_tokens=12)
    assert not parity.passed and parity.identical < len(PROMPTS)


def test_compare_tokens_allows_only_torch_ties():
    ref = np.array([[1, 2, 3], [4, 5, 6]])
    cand = np.array([[1, 2, 3], [4, 9, 6]])
    scores = np.zeros((2, 3, 10))
    scores[1, 1, 5], scores[1, 1, 9] = 1.0, 0.2  # torch clearly preferred 5
    p = compare_tokens(ref, cand, scores)
    assert not p.passed and p.first_divergence == [None, 1] and p.ties == 0
    scores[1, 1, 9] = 1.0 - 1e-6  # a tie: float rounding may pick either
    assert compare_tokens(ref, cand, scores).passed
    assert compare_tokens(ref, cand, None, gated=False).passed


def test_measure_generation_interleaved_and_labelled(gen_models):
    cfg = GenProfileConfig(points=(GenPoint(1, 8), GenPoint(2, 16)), runs=2, warmup=0, new_tokens=3, threads=1)
    res = measure_generation({"gpt2": gen_models["gpt2-tiny"][1], "t5": gen_models["t5-tiny"][1]}, cfg)
    for rows in res.values():
        assert [(r.batch, r.input_len) for r in rows] == [(1, 8), (2, 16)]
        for r in rows:
            assert r.source == "measured" and "onnxruntime" in r.tool and r.device and r.caveats
            assert (
                r.ttft_p50_ms > 0
                and r.tokens_per_s > 0
                and r.tokens_per_s_batch == pytest.approx(r.batch * r.tokens_per_s, rel=1e-3)
            )
    with pytest.raises(CompressError):
        GenProfileConfig(new_tokens=1)


def _invoke(args):
    return CliRunner().invoke(main, args, catch_exceptions=False)


def test_run_int8_causal_lm_still_generates(gen_models, tmp_path):
    from compress.core.onnx_ops import quantized_counts

    src = gen_models["gpt2-tiny"][0]
    out = tmp_path / "g8"
    res = _invoke(["run", str(src), "--recipe", "dynamic-int8", "--out", str(out)] + FAST)
    assert res.exit_code == 0, res.output
    assert "TTFT" in res.output and "tokens/s" in res.output
    report = json.loads((out / "report.json").read_text())
    assert report["kind"] == "generative" and report["task"] == "text-generation"
    assert report["parity"]["original_export"]["passed"] and report["parity"]["original_export"]["identical"] == 8
    for c, b in zip(report["latency"], report["baseline_latency"]):
        assert c["ttft_p50_ms"] > 0 and b["ttft_p50_ms"] > 0 and c["tokens_per_s"] > 0 and b["tokens_per_s"] > 0
        assert c["source"] == b["source"] == "measured" and c["runs"] == b["runs"] == 2  # --runs 2
    assert report["peak_rss"]["compressed"]["model_mb"] > 0
    # every weight MatMul is int8, the tied LM head included (export materialises Transpose(wte)); a causal LM
    # gets 8-bit MatMulNBits (per-block activation quantization), not per-tensor MatMulInteger
    graph = onnx.load(str(out / "model.onnx")).graph
    inits = {t.name for t in graph.initializer}
    assert not [n.name for n in graph.node if n.op_type == "MatMul" and n.input[1] in inits]
    assert not [n.name for n in graph.node if n.op_type == "Transpose" and n.input[0] in inits]
    assert quantized_counts(out / "model.onnx").get("MatMulNBits", 0) > 0
    assert report["eval"][0]["name"] == "ppl" and report["eval"][0]["original"] > 1
    assert report["artifact"]["model.onnx"] < report["baseline_artifact"]["model.onnx"]
    # what an app does: load the folder with optimum and generate
    tok = gen_models["gpt2-tiny"][4]
    ids = greedy(load_ort(out, "text-generation"), tok, PROMPTS[:2], 6)
    assert ids.shape == (2, 6) and (ids < len(tok)).all()
    assert "TTFT p50 ms" in (out / "report.md").read_text() and (out / "plot.png").stat().st_size > 0


def test_run_int8_seq2seq_quantizes_every_file_and_profile_prints_labels(gen_models, tmp_path):
    from compress.core.onnx_ops import quantized_counts

    out = tmp_path / "t8"
    res = _invoke(["run", str(gen_models["t5-tiny"][0]), "--recipe", "dynamic-int8", "--out", str(out)] + FAST)
    assert res.exit_code == 0, res.output
    report = json.loads((out / "report.json").read_text())
    files = ("encoder_model.onnx", "decoder_model.onnx", "decoder_with_past_model.onnx")
    assert sorted(s["file"] for s in report["stages"]) == sorted(files)
    for f in files:
        assert quantized_counts(out / f).get("MatMulInteger", 0) > 0, f
    res = _invoke(
        ["profile", str(out), "--baseline", str(gen_models["t5-tiny"][1]), "--json", str(tmp_path / "p.json")] + FAST
    )
    assert res.exit_code == 0, res.output
    for word in ("TTFT p50 ms", "tok/s", "measured (onnxruntime", "peak RSS artifact", "peak RSS baseline"):
        assert word in res.output, word
    data = json.loads((tmp_path / "p.json").read_text())
    assert data["kind"] == "text2text-generation" and set(data["latency"]) == {"artifact", "baseline"}


def test_profile_gpt2_folder(gen_models):
    res = _invoke(["profile", str(gen_models["gpt2-tiny"][1])] + FAST)
    assert res.exit_code == 0, res.output
    assert "TTFT p50 ms" in res.output and "tok/s" in res.output and "prefill" in res.output


@pytest.mark.parametrize(
    "args, needle",
    [
        (["--recipe", "static-int8"], "quant.static is not built for causal-lm models"),
        (["--recipe", "fused"], "graph.optimize is not built for causal-lm models"),
        (["--eval", "stsb:x.csv"], "does not apply to a generative model"),
        (["--shapes", "1x300"], "exceeds the model's 256 positions"),
    ],
)
def test_generative_refusals_one_line_nothing_written(gen_models, tmp_path, args, needle):
    out = tmp_path / "out"
    res = _invoke(["run", str(gen_models["gpt2-tiny"][0]), "--out", str(out)] + FAST + args)
    assert res.exit_code == 2
    errors = [line for line in res.output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and needle in errors[0], res.output
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_the_default_recipe_of_a_generative_model_is_dynamic_int8(gen_models, tmp_path):
    """cpu-default's quant.hybrid is built for encoders: for generative models the default means plain dynamic int8
    (a llama / mistral / qwen2 decoder gets lm-int8-genai where onnxruntime-genai is installed: test_lm.py)."""
    from compress.pipeline import RunConfig, prepare

    for name in ("gpt2-tiny", "t5-tiny"):
        run, flow = prepare(RunConfig(model=str(gen_models[name][0]), out=tmp_path / name))
        assert flow.name == "generative" and run.recipe.name == "dynamic-int8"
        assert [s.name for s in run.recipe.stages] == ["quant.dynamic"]


def test_a_generative_run_times_ten_generations_unless_told(gen_models, tmp_path):
    """Every timed run of a generative model is a whole generation: without --runs, 10 per shape and model (the
    encoders' 50 made `compress run smollm2 --target cpu` take 20 minutes)."""
    from compress.steps import GEN_RUNS

    out = tmp_path / "fp"
    res = _invoke(["run", str(gen_models["gpt2-tiny"][0]), "--recipe", "fp32", "--out", str(out), "--shapes", "1x16",
                   "--new-tokens", "4"])  # fmt: skip
    assert res.exit_code == 0, res.output
    report = json.loads((out / "report.json").read_text())
    assert GEN_RUNS == 10 and {r["runs"] for r in report["latency"] + report["baseline_latency"]} == {GEN_RUNS}
