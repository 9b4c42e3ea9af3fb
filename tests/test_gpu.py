"""GPU target: everything checkable without CUDA (fp16 conversion, TensorRT options, 2:4 detection, labels, the
timing harness on the CPU EP, the one-line refusal), and the real CUDA / TensorRT paths, skipped without a device."""

import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from click.testing import CliRunner
from onnx import TensorProto, helper, numpy_helper

from compress.cli import main
from compress.core.errors import CompressError
from runtimes import gpu
from runtimes.profiler import Shape

HAS_CUDA = "CUDAExecutionProvider" in ort.get_available_providers()
needs_cuda = pytest.mark.skipif(not HAS_CUDA, reason="no CUDAExecutionProvider (onnxruntime-gpu) on this host")
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny_onnx(tiny_dirs, tmp_path_factory) -> Path:
    from compress.core.models import load_model
    from export.onnx_export import export_onnx

    return export_onnx(load_model(str(tiny_dirs["encoder"])), tmp_path_factory.mktemp("gpu") / "fp32")


@pytest.fixture()
def no_cuda(monkeypatch):
    monkeypatch.setattr(ort, "get_available_providers", lambda: ["CPUExecutionProvider"])
    gpu.ep_usable.cache_clear()
    yield
    gpu.ep_usable.cache_clear()


def _cosine(a, b):
    a, b = a.reshape(len(a), -1), b.reshape(len(b), -1)
    return (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


# --- fp16 / int8 variants -----------------------------------------------------------------------------------


def test_fp16_variant_is_valid_keeps_fp32_io_and_matches_fp32_on_cpu(tiny_onnx, tmp_path):
    from runtimes.ort import cpu_session, synthetic_feeds

    dst = tmp_path / "fp16.onnx"
    info = gpu.to_fp16(tiny_onnx, dst)
    onnx.checker.check_model(str(dst))
    model = onnx.load(str(dst))
    assert info["fp16_initializers"] > 0 and info["fp32_initializers"] == 0
    assert all(i.type.tensor_type.elem_type == TensorProto.FLOAT for i in model.graph.output)
    assert all(i.type.tensor_type.elem_type == TensorProto.INT64 for i in model.graph.input)
    s32, s16 = cpu_session(tiny_onnx, 1), cpu_session(dst, 1)
    feeds = synthetic_feeds(s32, 2, 16)
    a, b = s32.run(None, feeds)[0], s16.run(None, feeds)[0]
    assert b.dtype == np.float32 and a.shape == b.shape
    assert float(_cosine(a, b).min()) > 0.999 and float(np.abs(a - b).max()) < 0.05


def test_precision_of_artefacts_decides_the_tensorrt_flags(tiny_onnx, tiny_dirs, tmp_path):
    from onnxruntime.quantization import quantize_dynamic
    from transformers import AutoTokenizer

    from compress.gpu import artifact_precision, to_int8_qdq

    assert artifact_precision(tiny_onnx) == ("fp32", [])
    gpu.to_fp16(tiny_onnx, tmp_path / "h.onnx")
    assert artifact_precision(tmp_path / "h.onnx")[0] == "fp16"
    tok = AutoTokenizer.from_pretrained(str(tiny_dirs["encoder"]))
    calib = (
        dict(tok(["a short sentence", "another one here"], padding="max_length", max_length=16, return_tensors="np")),
    )
    metrics = to_int8_qdq(tiny_onnx, tmp_path / "q.onnx", calib)
    assert metrics["activation_type"] == "int8" and metrics["quantized"].get("QuantizeLinear", 0) > 0
    kept = gpu.after_one_sided_activation(tiny_onnx)  # the FFN output MatMul of each of the 2 layers
    assert len(kept) == 2 and all("layer." in k and k.endswith("output/dense/MatMul") for k in kept), kept
    assert metrics["kept_float"] == 2
    q = onnx.load(str(tmp_path / "q.onnx"))
    inits = {i.name: numpy_helper.to_array(i) for i in q.graph.initializer}
    zero_points = [inits[n.input[2]] for n in q.graph.node if n.op_type == "QuantizeLinear" and len(n.input) > 2]
    assert zero_points and all(z.dtype == np.int8 and not z.any() for z in zero_points)  # what TensorRT accepts
    assert artifact_precision(tmp_path / "q.onnx") == ("int8-qdq", [])
    quantize_dynamic(str(tiny_onnx), str(tmp_path / "d.onnx"))
    precision, notes = artifact_precision(tmp_path / "d.onnx")
    assert precision == "fp32" and "quant.static" in notes[0]


# --- TensorRT / CUDA provider options, pure --------------------------------------------------------------------


def test_trt_options_cache_precision_sparsity_and_profile_shapes(tmp_path):
    o = gpu.trt_options(tmp_path / "cache", precision="fp32")
    assert o["trt_engine_cache_enable"] == "1" and o["trt_engine_cache_path"] == str(tmp_path / "cache")
    assert o["trt_timing_cache_path"] == str(tmp_path / "cache")
    assert (o["trt_fp16_enable"], o["trt_int8_enable"], o["trt_sparsity_enable"]) == ("0", "0", "0")
    assert "trt_profile_min_shapes" not in o
    o = gpu.trt_options(tmp_path, precision="fp16", sparsity=True)
    assert (o["trt_fp16_enable"], o["trt_int8_enable"], o["trt_sparsity_enable"]) == ("1", "0", "1")
    o = gpu.trt_options(
        tmp_path, precision="int8-qdq", device_id=1, inputs=["input_ids", "attention_mask"], batch=32, seq=128
    )
    assert (o["trt_fp16_enable"], o["trt_int8_enable"], o["device_id"]) == ("1", "1", "1")
    assert o["trt_profile_min_shapes"] == o["trt_profile_max_shapes"] == "input_ids:32x128,attention_mask:32x128"
    o = gpu.trt_options(tmp_path, inputs=["input_ids"], batch=32, seq=128, min_shape=(1, 1))
    assert o["trt_profile_min_shapes"] == "input_ids:1x1" and o["trt_profile_opt_shapes"] == "input_ids:32x128"
    with pytest.raises(ValueError, match="precision"):
        gpu.trt_options(tmp_path, precision="int4")


def test_providers_lists_and_config_checks(tmp_path):
    trt = gpu.providers(gpu.TRT_EP, {"trt_fp16_enable": "1"}, 0)
    assert [p[0] for p in trt] == [gpu.TRT_EP, gpu.CUDA_EP] and trt[0][1]["trt_fp16_enable"] == "1"
    assert gpu.providers(gpu.CUDA_EP, gpu.cuda_options(2)) == [(gpu.CUDA_EP, {"device_id": "2"})]
    with pytest.raises(ValueError, match="unknown GPU execution provider"):
        gpu.providers("ROCMExecutionProvider", {})
    with pytest.raises(CompressError, match=">= 100"):
        gpu.GpuConfig(runs=50)
    v = gpu.variants_for(
        {"fp32": (tmp_path / "a.onnx", "fp32"), "c": (tmp_path / "c.onnx", "fp16")},
        [gpu.CUDA_EP, gpu.TRT_EP],
        {"c": True},
    )
    assert [x.label for x in v] == ["fp32/CUDA", "fp32/TensorRT", "c/CUDA", "c/TensorRT"]
    assert [x.sparsity for x in v] == [False, False, False, True]  # sparsity only where TensorRT can use it


def test_nvidia_smi_parsing():
    assert gpu.parse_nvidia_smi("name, driver_version\nNVIDIA A10, 550.54.15\n") == "NVIDIA A10 (driver 550.54.15)"
    assert gpu.parse_nvidia_smi("NVIDIA H100 80GB HBM3, 570.86\nNVIDIA A10, 550\n", 1) == "NVIDIA A10 (driver 550)"
    assert gpu.parse_nvidia_smi("") == "CUDA device"


def _matmul_model(w: np.ndarray, path: Path) -> Path:
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"])],
        "m",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, w.shape[0]])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, w.shape[1]])],
        [numpy_helper.from_array(w.astype(np.float32), "w")],
    )
    onnx.save(helper.make_model(graph), str(path))
    return path


def test_two_four_detection_along_the_reduction_axis(tmp_path):
    rng = np.random.default_rng(0)
    w = rng.normal(size=(16, 8)) + 3.0  # (K, N): no zeros
    assert gpu.two_four_fraction(_matmul_model(w, tmp_path / "dense.onnx")) == 0.0
    sparse = w.copy()
    sparse.reshape(4, 4, 8)[:, :2, :] = 0  # two zeros in every group of 4 along K
    assert gpu.is_two_four(_matmul_model(sparse, tmp_path / "s.onnx"))
    wrong_axis = w.copy()
    wrong_axis.reshape(16, 2, 4)[:, :, :2] = 0  # 2:4 along N, not the reduction axis
    assert not gpu.is_two_four(_matmul_model(wrong_axis, tmp_path / "n.onnx"))


# --- the timing harness, checked on the CPU EP (labelled as a harness check, never as a GPU number) -----------


def test_harness_times_interleaved_with_labels_on_cpu_ep(tiny_onnx, tmp_path):
    from compress.gpu import variant_lines

    fp16 = tmp_path / "fp16.onnx"
    gpu.to_fp16(tiny_onnx, fp16)
    variants = gpu.variants_for({"fp32": (tiny_onnx, "fp32"), "fp16": (fp16, "fp16")}, [gpu.CPU_EP])
    steps = []
    res = gpu.measure_gpu(
        variants,
        (Shape(1, 8), Shape(2, 8)),
        gpu.GpuConfig(runs=100, warmup=1),
        work=tmp_path,
        on_progress=lambda d, t: steps.append((d, t)),
    )
    assert steps[-1] == (200, 200)
    assert list(res) == ["fp32/CPU", "fp16/CPU"]
    for rows in res.values():
        assert [(r.batch, r.seq) for r in rows] == [(1, 8), (2, 8)]
        for r in rows:
            assert r.source == "measured" and r.runs == 100 and r.tool.endswith("CPUExecutionProvider")
            assert "not a GPU measurement" in r.caveats[0] and r.device != "CUDA device"
            assert 0 < r.min_ms <= r.p50_ms <= r.p90_ms <= r.p99_ms and r.engine_build_s > 0 and r.first_run_ms > 0
    assert res["fp16/CPU"][0].precision == "fp16"
    nodes = res["fp32/CPU"][0].placement  # read from ORT's verbose partitioning log
    assert list(nodes) == [gpu.CPU_EP] and nodes[gpu.CPU_EP] > 0
    assert gpu.placement_caveats(gpu.TRT_EP, {gpu.TRT_EP: 3, gpu.CUDA_EP: 2, gpu.CPU_EP: 1})[0].startswith(
        "not all on TensorrtExecutionProvider: 2 node(s) on CUDAExecutionProvider, 1 node(s) on CPUExecutionProvider"
    )
    assert gpu.placement_caveats(gpu.CUDA_EP, {gpu.CUDA_EP: 5}) == []
    section = {
        "device": "host CPU (harness check)",
        "eps": [gpu.CPU_EP],
        "variants": {k: [r.__dict__ for r in v] for k, v in res.items()},
    }
    lines = variant_lines(section)
    assert any(line.strip().startswith("fp16/CPU") and "measured (onnxruntime" in line for line in lines)


def test_run_target_gpu_end_to_end_through_the_harness_on_cpu_ep(tiny_dirs, tmp_path, monkeypatch):
    """`compress run --target gpu` wiring (variants, fidelity, report, summary) with the CPU EP standing in for
    the device: every number it writes is labelled CPUExecutionProvider, so none can pass for a GPU figure."""
    import json

    import compress.gpu as cgpu

    monkeypatch.setattr(cgpu, "status", lambda: ("measured", "harness check on the CPU EP"))
    monkeypatch.setattr(gpu, "require_cuda", lambda: [gpu.CPU_EP])
    monkeypatch.setattr(cgpu, "primary_ep", lambda profile, eps: (gpu.CPU_EP, []))
    out = tmp_path / "o"
    res = CliRunner().invoke(
        main,
        [
            "run",
            str(tiny_dirs["st"]),
            "--target",
            "gpu",
            "--recipe",
            "dynamic-int8",
            "--out",
            str(out),
            "--runs",
            "3",
            "--shapes",
            "1x16",
        ],
        catch_exceptions=False,
    )
    assert res.exit_code == 0, res.output
    report = json.loads((out / "report.json").read_text())
    g = report["gpu"]
    assert list(g["variants"]) == ["compressed/CPU", "fp32/CPU", "fp16/CPU", "int8-qdq/CPU"]
    assert g["precisions"]["int8-qdq/CPU"] == "int8-qdq" and g["precisions"]["compressed/CPU"] == "fp32"
    assert any("quant.static" in c for c in g["caveats"])  # dynamic int8 is not a GPU int8 path
    assert any("raised to 100" in c for c in g["caveats"])
    assert g["fidelity"]["fp32/CPU"]["fidelity_min"] > 0.9999  # fp32 against itself
    assert g["fidelity"]["fp16/CPU"]["fidelity_mean"] > 0.99
    for rows in g["variants"].values():
        assert all(r["runs"] == 100 and r["tool"].endswith("CPUExecutionProvider") for r in rows)
    assert report["latency"][0]["tool"].endswith("CPUExecutionProvider") and report["latency"][0]["runs"] == 100
    md = (out / "report.md").read_text()
    assert "## GPU variants" in md and "| int8-qdq/CPU | int8-qdq | 1x16 |" in md and "| CPU " in md
    assert "not a GPU measurement" in md
    assert "int8-qdq/CPU" in res.output and "roofline" in res.output


# --- refusal without CUDA ------------------------------------------------------------------------------------


def test_without_cuda_everything_refuses_in_one_line(no_cuda, tiny_onnx):
    from compress.pipeline import resolve_target, target_status
    from profiles import load_profile

    with pytest.raises(CompressError, match="onnxruntime-gpu") as e:
        gpu.require_cuda()
    assert "\n" not in str(e.value) and 'pip install "onnxruntime-gpu' in str(e.value)
    mode, why = target_status(load_profile("gpu"))
    assert mode == "estimate only" and "CUDAExecutionProvider" in why
    with pytest.raises(CompressError, match="--estimate"):
        resolve_target("gpu")
    with pytest.raises(CompressError):
        gpu.measure_gpu(gpu.variants_for({"fp32": (tiny_onnx, "fp32")}, [gpu.CUDA_EP]), (Shape(1, 8),))
    res = CliRunner().invoke(main, ["profile", str(tiny_onnx), "--target", "gpu", "--shapes", "1x8"])
    assert res.exit_code == 2 and res.output.count("\n") == 1 and "--estimate" in res.output
    res = CliRunner().invoke(main, ["profile", str(tiny_onnx), "--target", "gpu", "--shapes", "1x8", "--estimate"])
    assert res.exit_code == 0 and "analytic" in res.output


def test_cuda_listed_but_falling_back_to_cpu_is_not_usable(monkeypatch):
    if HAS_CUDA:
        pytest.skip("this host has CUDA")
    monkeypatch.setattr(ort, "get_available_providers", lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"])
    gpu.ep_usable.cache_clear()
    try:
        why = gpu.cuda_usable()
        assert why is not None and "CUDAExecutionProvider" in why
    finally:
        gpu.ep_usable.cache_clear()


@pytest.mark.skipif(HAS_CUDA, reason="this host has CUDA")
def test_gpu_benchmark_exits_with_one_line_without_cuda():
    res = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "gpu.py")], capture_output=True, text=True, timeout=120, cwd=ROOT
    )
    assert res.returncode == 2 and res.stdout == ""
    assert res.stderr.strip().count("\n") == 0 and res.stderr.startswith("error: GPU measurement needs")


# --- on a CUDA machine ------------------------------------------------------------------------------------------


@needs_cuda
def test_cuda_and_tensorrt_measure_fp32_and_fp16(tiny_onnx, tmp_path):
    eps = gpu.require_cuda()
    fp16 = tmp_path / "fp16.onnx"
    gpu.to_fp16(tiny_onnx, fp16)
    variants = gpu.variants_for({"fp32": (tiny_onnx, "fp32"), "fp16": (fp16, "fp16")}, eps)
    res = gpu.measure_gpu(variants, (Shape(1, 16),), gpu.GpuConfig(runs=100, warmup=2), work=tmp_path)
    for label, (r,) in res.items():
        assert r.source == "measured" and r.ep in eps and r.runs == 100 and r.p50_ms > 0, label
        assert r.device and r.tool.startswith("onnxruntime ")
    if gpu.TRT_EP in eps:
        assert any(p.suffix == ".engine" for p in (tmp_path / "trt-cache").rglob("*")), "TensorRT cached no engine"
        trt_rows = [rows[0] for label, rows in res.items() if label.endswith("/TensorRT")]
        assert all(r.placement.get(gpu.TRT_EP, 0) > 0 and r.engine_build_s > 0 for r in trt_rows)


@needs_cuda
def test_gpu_fidelity_of_fp16_on_the_device(tiny_dirs, tiny_onnx, tmp_path):
    from compress.core.models import load_model
    from compress.gpu import _fidelity
    from runtimes.encode import ort_outputs
    from runtimes.ort import cpu_session

    lm = load_model(str(tiny_dirs["encoder"]))
    gpu.to_fp16(tiny_onnx, tmp_path / "fp16.onnx")
    variants = gpu.variants_for({"fp16": (tmp_path / "fp16.onnx", "fp16")}, gpu.require_cuda())
    texts = ["a cat sat on the mat", "the weather is nice today", "edge devices are small"]
    ref = ort_outputs(cpu_session(tiny_onnx, 1), lm.tokenizer, texts, lm.task, 32)
    for label, f in _fidelity(variants, lm, texts, ref, tmp_path / "cache").items():
        assert f["fidelity_min"] > 0.99, label
