"""The command line on bad input: one line, non-zero exit, nothing written; and the listing commands."""

import json

import pytest
from click.testing import CliRunner

from compress.cli import main

FAST = ["--runs", "3", "--shapes", "1x16"]


def _run(args):
    return CliRunner().invoke(main, args, catch_exceptions=False)


def _one_line_error(res, *needles):
    assert res.exit_code == 2, res.output
    lines = [line for line in res.output.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, res.output
    for n in needles:
        assert n in lines[0], lines[0]


@pytest.mark.parametrize(
    "args, needles",
    [
        (["run", "./no-such-model"], ["not found", "minilm"]),
        (["run", "minilm", "--recipe", "nope"], ["unknown recipe", "cpu-default"]),
        (["run", "minilm", "--target", "tpu"], ["unknown target", "cpu"]),
        (["run", "minilm", "--eval", "bleu"], ["unknown eval"]),
        (["run", "minilm", "--eval", "stsb:/no/such.csv"], ["not found"]),
        (["run", "minilm", "--data", "/no/such.txt"], ["not found", "--data"]),
    ],
)
def test_bad_input_one_line_nothing_written(tmp_path, args, needles):
    out = tmp_path / "out"
    res = _run(args + ["--out", str(out)] + FAST)
    _one_line_error(res, *needles)
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_corrupt_model_folder(tmp_path):
    bad = tmp_path / "model"
    bad.mkdir()
    (bad / "config.json").write_text("{not json")
    res = _run(["run", str(bad), "--out", str(tmp_path / "out")] + FAST)
    _one_line_error(res, "not valid JSON")
    (bad / "config.json").write_text(json.dumps({"model_type": "bert", "architectures": ["BertModel"]}))
    (bad / "model.safetensors").write_bytes(b"garbage")
    res = _run(["run", str(bad), "--out", str(tmp_path / "out")] + FAST)
    _one_line_error(res, "could not load the model")
    assert not (tmp_path / "out").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]


def test_existing_output_is_not_overwritten_without_force(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    res = _run(["run", "minilm", "--out", str(out)] + FAST)
    _one_line_error(res, "already exists", "--force")
    assert (out / "keep.txt").read_text() == "mine"


def test_bad_latency_options_are_refused():
    res = CliRunner().invoke(main, ["run", "minilm", "--shapes", "1x"])
    assert res.exit_code != 0 and "BATCHxSEQ" in res.output
    res = CliRunner().invoke(main, ["run", "minilm", "--runs", "0"])
    assert res.exit_code != 0


def test_recipes_lists_recipes_and_stage_parameters():
    res = _run(["recipes"])
    assert res.exit_code == 0
    for word in ("cpu-default", "static-int8", "quant.static", "calibration_method", "graph.optimize"):
        assert word in res.output


def test_profile_bad_artifact(tmp_path):
    res = _run(["profile", str(tmp_path / "missing")])
    _one_line_error(res, "not found")
    (tmp_path / "x.onnx").write_bytes(b"not onnx")
    res = _run(["profile", str(tmp_path / "x.onnx")])
    _one_line_error(res, "not a valid ONNX model")


def test_profile_an_exported_tiny_model(tiny_dirs, tmp_path):
    from compress.core.models import load_model
    from export.onnx_export import export_onnx

    export_onnx(load_model(str(tiny_dirs["st"])), tmp_path / "art")
    res = _run(
        [
            "profile",
            str(tmp_path / "art"),
            "--baseline",
            str(tmp_path / "art" / "model.onnx"),
            "--runs",
            "5",
            "--shapes",
            "1x16,2x32",
            "--json",
            str(tmp_path / "p.json"),
        ]
    )
    assert res.exit_code == 0, res.output
    assert "measured" in res.output and "top ops" in res.output
    data = json.loads((tmp_path / "p.json").read_text())
    assert set(data["latency"]) == {"artifact", "baseline"}
    assert [(r["batch"], r["seq"]) for r in data["latency"]["artifact"]] == [(1, 16), (2, 32)]


def test_targets_lists_every_profile_with_what_this_host_can_do():
    from profiles import available_profiles

    res = _run(["targets"])
    assert res.exit_code == 0
    for name in available_profiles():
        assert name in res.output
    assert "measured" in res.output and "estimate only" in res.output


def test_gpu_target_without_cuda_is_one_clear_line(tmp_path):
    import onnxruntime as ort

    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("this host has CUDA")
    res = _run(["run", "minilm", "--target", "gpu", "--out", str(tmp_path / "o")] + FAST)
    _one_line_error(res, "gpu", "--estimate")
    assert not (tmp_path / "o").exists()


def test_profile_estimate_is_labelled_analytic(tiny_dirs, tmp_path):
    from compress.core.models import load_model
    from export.onnx_export import export_onnx

    export_onnx(load_model(str(tiny_dirs["st"])), tmp_path / "art")
    res = _run(
        [
            "profile",
            str(tmp_path / "art"),
            "--target",
            "npu-qnn-htp",
            "--estimate",
            "--shapes",
            "1x16,4x16",
            "--json",
            str(tmp_path / "e.json"),
        ]
    )
    assert res.exit_code == 0, res.output
    assert res.output.count("[analytic") == 2 and "caveats" in res.output
    data = json.loads((tmp_path / "e.json").read_text())
    rows = data["estimates"]
    assert all(r["source"] == "analytic" and r["p50_ms"] > 0 for r in rows)
    assert rows[1]["macs"] == 4 * rows[0]["macs"]
    # a phone-class target: NNAPI / Core ML partition coverage from ORT's mobile usability checker
    assert "ORT Mobile on a phone" in res.output and "nnapi:fixed" in res.output
    cov = data["mobile_coverage"]
    assert set(cov) >= {"nnapi:dynamic", "nnapi:fixed", "coreml_mlprogram:dynamic", "coreml_neuralnetwork:fixed"}
    assert all(0 <= v["supported_nodes"] <= v["nodes"] for v in cov.values())
    assert cov["nnapi:fixed"]["supported_nodes"] >= cov["nnapi:dynamic"]["supported_nodes"]


def test_classifier_run_with_accuracy_eval(tiny_dirs, tmp_path):
    data = tmp_path / "labels.tsv"
    data.write_text("text\tlabel\n" + "".join(f"sentence number {i} is here\t{i % 3}\n" for i in range(30)))
    out = tmp_path / "run"
    res = _run(
        [
            "run",
            str(tiny_dirs["classifier"]),
            "--recipe",
            "dynamic-int8",
            "--out",
            str(out),
            "--eval",
            f"accuracy:{data}",
            "--eval",
            "fidelity",
        ]
        + FAST
    )
    assert res.exit_code == 0, res.output
    rep = json.loads((out / "report.json").read_text())
    assert rep["task"] == "text-classification"
    acc = next(e for e in rep["eval"] if e["name"].startswith("accuracy"))
    assert 0 <= acc["original"] <= 100 and 0 <= acc["compressed"] <= 100 and acc["metric"] == "accuracy %"
    res = _run(["run", str(tiny_dirs["classifier"]), "--eval", f"stsb:{data}", "--out", str(tmp_path / "x")] + FAST)
    _one_line_error(res, "stsb needs an embedding model")


def test_delta_recipe_without_base_fails_before_any_work(tmp_path):
    res = _run(["run", "minilm", "--recipe", "delta-90", "--out", str(tmp_path / "o")] + FAST)
    _one_line_error(res, "--base")
    assert list(tmp_path.iterdir()) == []
