"""prune.delta on causal LMs: a tiny Llama (SmolLM2's architecture at width 64, tied LM head) fitted to the shipped
sentences is the base, and the same model trained 20 more steps (AdamW, lr 3e-4: mean |delta| about 2e-3) is the
fine-tune. `compress run --base` through the generative flow (delta file, perplexity gate), `compress apply-delta`
rebuilding the causal LM exactly, a mismatched base refused, and the methods / q searches on a decoder."""

import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from compress.cli import main
from compress.core.data import calibration_and_heldout, shipped_sentences
from compress.core.errors import CompressError
from compress.core.lm_eval import CHUNKS, packed_texts, perplexity, token_chunks
from compress.core.models import causal_logits, forward_only, lm_hidden_states, load_model
from compress.recipe import parse_recipe
from compress.stages.delta import keep_count
from compress.stages.delta_io import delta_tensors, load_delta
from compress.steps import apply_torch_stages

FAST = ["--runs", "1", "--shapes", "1x16", "--new-tokens", "4"]
CALIBRATION, HELDOUT = calibration_and_heldout(shipped_sentences())
LM = "text-generation"


@pytest.fixture(scope="module")
def lm_pair(tmp_path_factory):
    """(base, fine-tuned) tiny Llama folders; the fine-tune is real training (every weight moves, AdamW)."""
    from compress import random_lm
    from compress.cli import _quiet_libraries

    _quiet_libraries()
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("delta-lm")
    random_lm.save("llama-tiny", root / "base", train_steps=120)
    ft = load_model(str(root / "base"), LM)
    random_lm.train(ft.model, ft.tokenizer, 30, seed=1, lr=3e-4)
    ft.model.save_pretrained(root / "ft")
    ft.tokenizer.save_pretrained(root / "ft")
    return root / "base", root / "ft"


def _invoke(args):
    return CliRunner().invoke(main, args, catch_exceptions=False)


def _prune(ft, base, stage: dict, artifact_dir=None):
    """The stage alone on the fine-tuned causal LM, with the generative flow's calibration (packed contexts)."""
    recipe = parse_recipe({"stages": [{"type": "prune.delta", **stage}]}, "t", "t.toml")
    lm = load_model(str(ft), LM)
    texts = packed_texts(lm.tokenizer, CALIBRATION, lm.max_length)
    lm, reports = apply_torch_stages(list(recipe.stages), lm, texts, artifact_dir=artifact_dir, base_model=str(base))
    return lm, reports[0]["metrics"]


def _deltas(ft, base) -> dict:
    b = delta_tensors(load_model(str(base), LM).model)
    return {n: t.float() - b[n].float() for n, t in delta_tensors(load_model(str(ft), LM).model).items()}


def _ppl(lm) -> float:
    """Torch perplexity on the chunks the generative flow scores (held-out shipped sentences)."""
    return perplexity(causal_logits(lm), token_chunks(lm.tokenizer, HELDOUT, CHUNKS, lm.max_length))["ppl"]


def test_delta_90_on_a_causal_lm_writes_the_delta_and_apply_delta_rebuilds_it_exactly(lm_pair, tmp_path):
    base, ft = lm_pair
    out = tmp_path / "run"
    res = _invoke(["run", str(ft), "--base", str(base), "--recipe", "delta-90", "--out", str(out), *FAST])
    assert res.exit_code == 0, res.output
    report = json.loads((out / "report.json").read_text())
    assert report["flow"] == "generative" and "delta.safetensors" in report["files"]
    kept, meta = load_delta(out / "delta.safetensors")
    assert meta["task"] == LM and meta["method"] == "dare" and meta["p"] == 0.9 and meta["model_type"] == "llama"

    # about 1 - p of the changed entries are kept, in every decoder Linear; the tied LM head is the embedding table,
    # stored once under its name
    full = _deltas(ft, base)
    changed = sum(int(d.count_nonzero()) for d in full.values())
    stored = sum(len(i) for i, _, _ in kept.values())
    assert abs(stored / changed - 0.1) < 0.01, stored / changed
    assert "lm_head.weight" not in meta["shapes"] and "model.embed_tokens.weight" in kept
    linears = [n for n in full if ".layers." in n and n.endswith("_proj.weight")]
    assert len(linears) == 14 and all(n in kept for n in linears)

    # perplexity recorded and inside the gate; the pruned model keeps most of what fine-tuning gained over the base
    ppl = next(e for e in report["eval"] if e["name"].startswith("ppl"))
    assert report["ppl_gate"]["applied"] and ppl["rise_percent"] <= report["ppl_gate"]["max_rise_percent"]
    base_ppl = _ppl(load_model(str(base), LM))
    assert ppl["original"] < 0.95 * base_ppl  # the fine-tune gained (on held-out text)
    assert ppl["compressed"] - ppl["original"] < 0.5 * (base_ppl - ppl["original"]), (base_ppl, ppl)
    assert report["parity"]["compressed_float_export"]["passed"]

    # the pruned model is the stage's, deterministically (same file byte for byte), and apply-delta rebuilds it
    pruned, m = _prune(ft, base, {"method": "dare", "p": 0.9, "seed": 0}, artifact_dir=tmp_path / "direct")
    assert (tmp_path / "direct" / "delta.safetensors").read_bytes() == (out / "delta.safetensors").read_bytes()
    assert m["kept_fraction"] == pytest.approx(0.1, abs=0.01) and m["tensors_kept_whole"] == 0
    rebuilt = tmp_path / "rebuilt"
    res = _invoke(["apply-delta", str(base), str(out / "delta.safetensors"), "--out", str(rebuilt)])
    assert res.exit_code == 0, res.output
    assert json.loads((rebuilt / "config.json").read_text())["architectures"] == ["LlamaForCausalLM"]
    assert (rebuilt / "tokenizer.json").is_file() and (rebuilt / "generation_config.json").is_file()
    again = load_model(str(rebuilt), LM)
    got, want = delta_tensors(again.model), delta_tensors(pruned.model)
    assert got.keys() == want.keys() and all(torch.equal(got[n], want[n]) for n in want)
    assert again.model.lm_head.weight.data_ptr() == again.model.model.embed_tokens.weight.data_ptr()  # still tied
    tuned = delta_tensors(load_model(str(ft), LM).model)
    assert not all(torch.equal(got[n], tuned[n]) for n in got)  # pruned, not the fine-tune itself
    texts = HELDOUT[:4]
    assert np.array_equal(lm_hidden_states(again, texts), lm_hidden_states(pruned, texts))

    # the fine-tuned model is not the base the delta was made against
    res = _invoke(["apply-delta", str(ft), str(out / "delta.safetensors"), "--out", str(tmp_path / "x")])
    errors = [line for line in res.output.splitlines() if line.startswith("error:")]
    assert res.exit_code == 2 and len(errors) == 1 and "differ from the base" in errors[0], res.output


def test_a_mismatched_base_is_refused_in_one_line(lm_pair, tmp_path):
    from compress import random_lm

    _, ft = lm_pair
    gpt2 = tmp_path / "gpt2-tiny"
    random_lm.save("gpt2-tiny", gpt2)
    out = tmp_path / "bad"
    res = _invoke(["run", str(ft), "--base", str(gpt2), "--recipe", "delta-90", "--out", str(out), *FAST])
    errors = [line for line in res.output.splitlines() if line.startswith("error:")]
    assert res.exit_code == 2 and len(errors) == 1, res.output
    assert (
        "base and fine-tuned models differ" in errors[0] and "pass the base this model was fine-tuned from" in errors[0]
    )
    assert not out.exists()


def test_darex_q_on_a_causal_lm_searches_q_on_hidden_states_and_on_perplexity(lm_pair, tmp_path):
    base, ft = lm_pair
    p = 0.99
    lm, m = _prune(ft, base, {"method": "darex-q", "p": p, "samples": 8})
    search = m["q_search"]
    assert 1 - p <= m["q"] <= 1 and 10 <= search["tries"] <= 30 and "hidden state" in search["loss"]
    assert search["best_loss"] == min(loss for _, loss in search["grid"])
    assert m["kept_fraction"] == pytest.approx(1 - p, abs=0.005)
    # the loss is what it says: mean |h| difference to the fine-tuned model on the calibration contexts at the pick
    texts = packed_texts(lm.tokenizer, CALIBRATION, lm.max_length)[:8]
    ref = lm_hidden_states(load_model(str(ft), LM), texts)
    err = float(np.abs(lm_hidden_states(lm, texts) - ref).mean())
    assert err == pytest.approx(min(search["best_loss"], search["dare_loss"]), rel=1e-3)

    text = tmp_path / "heldout.txt"  # q_search = "grid" on a causal LM: the lowest perplexity on a text file
    text.write_text("\n".join(HELDOUT[:60]) + "\n")
    lm, m = _prune(ft, base, {"method": "darex-q", "p": 0.9, "q_search": "grid", "eval_file": str(text)})
    assert m["q_search"]["mode"] == "grid" and "perplexity" in m["q_search"]["loss"]
    assert all(ppl > 1 for _, ppl in m["q_search"]["grid"]) and 0.1 - 1e-9 <= m["q"] <= 1


def test_importance_on_a_decoder_uses_linear_inputs_and_magnitude_elsewhere(lm_pair, tmp_path):
    base, ft = lm_pair
    p = 0.75
    _prune(ft, base, {"method": "importance", "p": p}, artifact_dir=tmp_path / "imp")
    _prune(ft, base, {"method": "magnitude", "p": p}, artifact_dir=tmp_path / "mag")
    imp, _ = load_delta(tmp_path / "imp" / "delta.safetensors")
    mag, _ = load_delta(tmp_path / "mag" / "delta.safetensors")
    full = _deltas(ft, base)
    assert all(len(imp[n][0]) == keep_count(int(full[n].count_nonzero()), p) for n in full)
    linears = [n for n in imp if n.endswith("_proj.weight")]
    assert len(linears) == 14 and all(not torch.equal(imp[n][0], mag[n][0]) for n in linears)
    others = [n for n in imp if n not in linears]  # norms and the (tied) embedding table: no Linear input
    assert "model.embed_tokens.weight" in others and all(torch.equal(imp[n][0], mag[n][0]) for n in others)


def test_gpt2_blocks_by_pattern_and_conv1d_importance(tmp_path):
    """GPT-2's blocks are transformer.h.N (Conv1D weights stored (in, out)); '*h.*' selects only them."""
    from compress import random_lm

    random_lm.save("gpt2-tiny", tmp_path / "base")
    ft = load_model(str(tmp_path / "base"), LM)
    random_lm.train(ft.model, ft.tokenizer, 3, seed=1, lr=3e-4)
    ft.model.save_pretrained(tmp_path / "ft")
    ft.tokenizer.save_pretrained(tmp_path / "ft")
    _, m = _prune(tmp_path / "ft", tmp_path / "base", {"method": "importance", "p": 0.5, "layers": ["*h.*"]},
                  artifact_dir=tmp_path / "d")  # fmt: skip
    kept, meta = load_delta(tmp_path / "d" / "delta.safetensors")
    pruned = {r["param"] for r in m["per_layer"]}
    assert pruned and all(n.startswith("transformer.h.") for n in pruned) and "lm_head.weight" not in meta["shapes"]
    assert m["tensors_kept_whole"] == 4  # wte (tied LM head), wpe, ln_f weight and bias
    # Conv1D computes x @ W with W (in 32, out 128): the score weighs W's rows by the input norms ||x_j||
    c_fc = "transformer.h.0.mlp.c_fc"
    lm = load_model(str(tmp_path / "ft"), LM)
    sums = []
    hook = dict(lm.model.named_modules())[c_fc].register_forward_hook(
        lambda _m, inputs, _o: sums.append(inputs[0].detach().reshape(-1, 32).pow(2).sum(0))
    )
    forward_only(lm, packed_texts(lm.tokenizer, CALIBRATION, lm.max_length)[:50], batch_size=4)
    hook.remove()
    d = _deltas(tmp_path / "ft", tmp_path / "base")[c_fc + ".weight"]
    score = d.abs() * torch.stack(sums).sum(0).sqrt()[:, None]
    top = score.reshape(-1).topk(keep_count(32 * 128, 0.5)).indices
    assert meta["shapes"][c_fc + ".weight"] == [32, 128]
    assert set(kept[c_fc + ".weight"][0].tolist()) == set(top.tolist())
    with pytest.raises(CompressError, match=r"no floating-point parameter matches .*'\*h\.\*' \(GPT-2\)"):
        _prune(tmp_path / "ft", tmp_path / "base", {"layers": ["*encoder*"]})
