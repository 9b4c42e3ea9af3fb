"""NPU back-ends: parsing QNN/Vela outputs from fixtures, labels, the one-line error without the extra, and the
real back-ends on a tiny model where their extra is installed (they skip in the base install)."""

import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from compress.cli import main
from compress.core.errors import CompressError

FIXTURES = Path(__file__).parent / "fixtures"


def _run(args):
    return CliRunner().invoke(main, args, catch_exceptions=False)


# --- QNN: ORT's partitioning log, fixes, the mask-fill rewrite ---------------------------------------------


def test_qnn_partition_log_names_the_fallback_node_and_why():
    from runtimes.qnn import EP_NAME, blockers, parse_partition_log

    p = parse_partition_log((FIXTURES / "qnn_partition_fallback.log").read_text())
    assert p.cpu_nodes == [("Acosh", "odd0")]  # the PASSED Relu nodes are not blockers
    assert p.partitions == {EP_NAME: 2, "CPUExecutionProvider": 1}
    assert "not supported by QNN EP" in p.reasons["odd0"] and "relu0" not in p.reasons
    assert p.npu_nodes == {"relu0": "Relu", "relu1": "Relu"}
    (b,) = blockers(p)
    assert b["op_type"] == "Acosh" and b["node"] == "odd0" and "Acosh" in b["fix"]


def test_qnn_backend_rejection_is_named_with_its_fix():
    """A dynamic-int8 (CPU recipe) MiniLM: the uint8 embedding table's Gather is refused by the HTP backend."""
    from runtimes.qnn import blockers, parse_partition_log

    p = parse_partition_log((FIXTURES / "qnn_partition_dynamic_int8.log").read_text())
    assert [op for op, _ in p.cpu_nodes] == ["Gather", "DequantizeLinear"]
    gather = blockers(p)[0]
    assert gather["reason"] == ("Failed to add node. (QNN HTP backend validation failed for Gather (error 3110))")
    assert "--target npu-qnn-htp" in gather["fix"]


def test_qnn_log_with_everything_on_the_npu_has_no_blockers():
    from runtimes.qnn import EP_NAME, blockers, parse_partition_log

    log = (
        "2026-11-25 06:18:09.369 [V:onnxruntime:, session_state.cc:1598 VerifyEachNodeIsAssignedToAnEp] Node placements\n"
        "2026-11-25 06:18:09.369 [V:onnxruntime:, session_state.cc:1601 VerifyEachNodeIsAssignedToAnEp]  "
        f"All nodes placed on [{EP_NAME}]. Number of nodes: 1\n"
        "2026-11-25 06:18:09.369 [V:onnxruntime:, session_state.cc:196 CreateGraphInfo] SaveMLValueNameIndexMapping\n"
    )
    p = parse_partition_log(log)
    assert p.partitions == {EP_NAME: 1} and p.cpu_nodes == [] and blockers(p) == []


@pytest.mark.parametrize(
    "reason, needle",
    [
        ("Operators of type `Foo` are not supported by QNN EP.", "no Foo kernel"),
        ("QNN EP: Dynamic shape is not supported yet", "static shape"),
        ("Unsupported data type float for HTP", "QDQ"),
        ("QNN EP is configured to not take DQ nodes that generate a graph output.", "offload_graph_io_quantization"),
    ],
)
def test_qnn_fix_names_what_to_do(reason, needle):
    from runtimes.qnn import fix_for

    assert needle in fix_for("Foo", reason)


def test_mask_fill_is_clamped_and_nothing_else():
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    from runtimes.qnn import MASK_FILL, clamp_mask_fill

    inits = [
        numpy_helper.from_array(np.array(np.finfo(np.float32).min, dtype=np.float32), "fill"),
        numpy_helper.from_array(np.array(-1.0, dtype=np.float32), "minus_one"),
        numpy_helper.from_array(np.full((3,), -3e38, dtype=np.float32), "weights"),
    ]  # not a scalar: kept
    const = helper.make_node("Constant", [], ["c"], value=numpy_helper.from_array(np.array(-3e38, dtype=np.float32)))
    add = helper.make_node("Add", ["x", "fill"], ["y"])
    g = helper.make_graph(
        [const, add],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])],
        inits,
    )
    model = helper.make_model(g)
    assert sorted(clamp_mask_fill(model)) == ["c", "fill"]
    vals = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    assert vals["fill"] == np.float32(MASK_FILL) and vals["minus_one"] == -1.0 and (vals["weights"] < -1e38).all()
    assert numpy_helper.to_array(model.graph.node[0].attribute[0].t) == np.float32(MASK_FILL)
    onnx.checker.check_model(model)


# --- Vela: summary CSV, per-layer CSV, CPU reasons, labels ----------------------------------------------


def test_vela_summary_csv():
    from runtimes.vela import parse_summary_csv

    s = parse_summary_csv(FIXTURES / "vela_summary_Ethos_U55_High_End_Embedded.csv")
    assert s["cycles_npu"] == 10378936 and s["cycles_total"] == 10475384
    assert s["inference_time"] == pytest.approx(0.020950768) and s["core_clock"] == 500e6
    assert s["accelerator_configuration"] == "Ethos_U55_256" and s["memory_mode"] == "Shared_Sram"


def test_vela_per_layer_csv_and_cpu_reasons():
    from runtimes.vela import parse_cpu_reasons, parse_per_layer_csv

    layers = parse_per_layer_csv(FIXTURES / "vela_per-layer.csv")
    assert len(layers) == 9
    assert [r["target"] for r in layers].count("NPU") == 5 and [r["target"] for r in layers].count("CPU") == 4
    fc = next(r for r in layers if r["op"] == "FullyConnected")
    assert fc["cycles"] == 153280 and fc["macs"] == 18874368
    reasons = parse_cpu_reasons((FIXTURES / "vela_stdout.txt").read_text())
    assert reasons["serving_default_output_0_output"] == "Unsupported opType"
    assert reasons["__main__.Wrap;15"].startswith("Operation has tensor with unsupported DataType Float32")


def test_vela_report_is_labelled_vendor_model_and_says_cpu_ops_are_not_counted():
    from runtimes.vela import VelaConfig, VelaResult, parse_cpu_reasons, parse_per_layer_csv, parse_summary_csv, report

    res = VelaResult(
        tool="ethos-u-vela 5.2.0",
        config=VelaConfig("ethos-u55-256", "Ethos_U55_High_End_Embedded", "Shared_Sram"),
        summary=parse_summary_csv(FIXTURES / "vela_summary_Ethos_U55_High_End_Embedded.csv"),
        layers=parse_per_layer_csv(FIXTURES / "vela_per-layer.csv"),
        cpu_reasons=parse_cpu_reasons((FIXTURES / "vela_stdout.txt").read_text()),
    )
    r = report(res, 1, 128)
    lat = r["latency"]
    assert lat["source"] == "vendor_model" and lat["tool"] == "ethos-u-vela 5.2.0"
    assert lat["p50_ms"] == pytest.approx(20.950768)
    assert lat["profile_configs"]["system_config"] == "Ethos_U55_High_End_Embedded"
    assert any("NOT in Vela's cycles" in c for c in lat["caveats"])
    assert r["operators"] == {"total": 9, "npu": 5, "cpu": 4}
    assert r["cycles_per_layer_sum"] == sum(row["cycles"] for row in r["layers"])
    div = next(b for b in r["cpu_blockers"] if b["op"] == "Div")
    assert div["reason"] == "Unsupported opType" and "Ethos-U has no Div" in div["fix"]


def test_vela_configs_come_from_the_profile():
    from profiles import load_profile, profile_from_dict
    from runtimes.vela import VelaConfig

    args = VelaConfig.from_profile(load_profile("npu-ethos-u55")).args()
    assert args[args.index("--accelerator-config") + 1] == "ethos-u55-256"
    assert args[args.index("--memory-mode") + 1] == "Shared_Sram" and "--system-config" in args
    bare = profile_from_dict(
        {
            "name": "u",
            "description": "d",
            "kind": "npu",
            "runtime": "vela",
            "execution_provider": "ethos-u-vela",
            "latency_source": "vendor_model",
            "precisions": ["int8"],
        }
    )
    with pytest.raises(CompressError, match="accelerator_config"):
        VelaConfig.from_profile(bare)


# --- without the extras ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "target, module, extra", [("npu-qnn-htp", "onnxruntime_qnn", "qnn"), ("npu-ethos-u55", "ethosu", "ethos")]
)
def test_missing_extra_is_one_line_naming_it(monkeypatch, tmp_path, target, module, extra):
    from compress.pipeline import target_status
    from profiles import load_profile

    monkeypatch.setitem(sys.modules, module, None)  # import and find_spec now fail as if not installed
    mode, why = target_status(load_profile(target))
    assert mode == "estimate only" and f"edge-compress[{extra}]" in why
    res = _run(["run", "minilm", "--target", target, "--out", str(tmp_path / "o")])
    assert res.exit_code == 2
    errors = [line for line in res.output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and f'pip install "edge-compress[{extra}]"' in errors[0]
    assert not (tmp_path / "o").exists()


def test_require_names_the_extra(monkeypatch):
    from runtimes.qnn import require_qnn
    from runtimes.vela import require_vela

    monkeypatch.setitem(sys.modules, "onnxruntime_qnn", None)
    monkeypatch.setitem(sys.modules, "ethosu", None)
    with pytest.raises(CompressError, match=r"edge-compress\[qnn\]"):
        require_qnn()
    with pytest.raises(CompressError, match=r"edge-compress\[ethos\]"):
        require_vela()


# --- the real back-ends on a tiny model (only where the extra is installed) ---------------------------------


def _has(module: str) -> bool:
    import importlib.util

    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


@pytest.mark.skipif(not _has("onnxruntime_qnn"), reason="needs the [qnn] extra (onnxruntime-qnn)")
def test_qnn_preflight_on_a_tiny_model(tiny_dirs, tmp_path):
    import json

    out = tmp_path / "qnn"
    res = _run(
        [
            "run",
            str(tiny_dirs["st"]),
            "--target",
            "npu-qnn-htp",
            "--recipe",
            "fp32",
            "--shapes",
            "1x16",
            "--out",
            str(out),
        ]
    )
    assert res.exit_code == 0, res.output
    rep = json.loads((out / "report.json").read_text())
    n = rep["npu"]
    assert n["fallback_nodes"] == 0 and n["compiled_wholly_on_npu"], n["blockers"]
    assert (out / "model_ctx.onnx").is_file() and n["epcontext"]["files"]
    assert n["latency"][0]["source"] == "analytic" and "simulator" in n["latency"][0]["caveats"][0]
    sim = n["simulator"]
    assert sim["samples"] > 0 and sim["agreement_with_cpu_emulation_mean"] > 0.9
    assert rep["eval"][0]["path"] == "qdq-cpu-emulation" and 0.5 < rep["eval"][0]["compressed"] <= 1.0
    assert "[analytic" in res.output
    prof = _run(["profile", str(out), "--target", "npu-qnn-htp", "--shapes", "1x16"])
    assert prof.exit_code == 0 and "compiles wholly onto the HTP simulator (0 fallback nodes)" in prof.output, (
        prof.output
    )


@pytest.mark.skipif(not (_has("ethosu.vela") and _has("litert_torch")), reason="needs the [ethos] extra")
def test_ethos_u55_on_a_tiny_model(tiny_dirs, tmp_path):
    import json

    out = tmp_path / "u55"
    res = _run(
        [
            "run",
            str(tiny_dirs["st"]),
            "--target",
            "npu-ethos-u55",
            "--recipe",
            "fp32",
            "--shapes",
            "1x16",
            "--out",
            str(out),
        ]
    )
    assert res.exit_code == 0, res.output
    n = json.loads((out / "report.json").read_text())["npu"]
    assert n["latency"][0]["source"] == "vendor_model" and n["tool"].startswith("ethos-u-vela")
    assert n["cycles_npu"] > 0 and n["operators"]["npu"] > 0
    assert n["cycles_per_layer_sum"] == sum(r["cycles"] for r in n["layers"])
    assert (out / "model_int.tflite").is_file() and list((out / "vela").glob("*_vela.tflite"))
    assert "[vendor_model" in res.output
    prof = _run(["profile", str(out), "--target", "npu-ethos-u55", "--shapes", "1x16"])
    assert prof.exit_code == 0 and "[vendor_model]" in prof.output and "NPU cycles" in prof.output, prof.output
