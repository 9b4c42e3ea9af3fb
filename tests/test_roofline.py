"""Roofline arithmetic on tiny hand-built ONNX graphs: exact MACs and bytes, the compute/memory switch,
launch overhead, precisions, labels. Nothing is exported or run."""

from dataclasses import replace
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from profiles import DeviceProfile, available_profiles, load_profile
from runtimes.roofline import RooflineError, estimate

# A made-up device with round figures and full efficiency, so the expected times are exact.
UNIT = DeviceProfile(
    name="unit",
    description="test device",
    kind="npu",
    runtime="none",
    execution_provider="none",
    latency_source="analytic",
    precisions=("fp32", "int8"),
    peak_tops_int8=4.0,
    peak_tflops_fp32=1.0,
    bandwidth_gbs=1.0,
    efficiency_compute=1.0,
    efficiency_memory=1.0,
)
OPSET = [helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)]


def _save(path: Path, nodes, inputs, outputs, inits) -> Path:
    graph = helper.make_graph(nodes, path.stem, inputs, outputs, inits)
    onnx.save(helper.make_model(graph, opset_imports=OPSET), str(path))
    return path


def _weight(name: str, shape, dtype=np.float32, seed=0):
    rng = np.random.default_rng(seed)
    if np.issubdtype(dtype, np.integer):
        return numpy_helper.from_array(rng.integers(-100, 100, shape).astype(dtype), name)
    return numpy_helper.from_array(rng.standard_normal(shape).astype(dtype), name)


def _matmul(path: Path, m: int, k: int, n: int) -> Path:
    """x (M, K) @ w (K, N): MACs = M*K*N exactly."""
    return _save(
        path,
        [helper.make_node("MatMul", ["x", "w"], ["y"])],
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [m, k])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        [_weight("w", (k, n))],
    )


def _mlp(path: Path, d: int = 256, hidden: int = 1024) -> Path:
    """x (batch, d) -> MatMul -> Relu -> MatMul: a 2-layer MLP with a symbolic batch."""
    nodes = [
        helper.make_node("MatMul", ["x", "w1"], ["h"]),
        helper.make_node("Relu", ["h"], ["a"]),
        helper.make_node("MatMul", ["a", "w2"], ["y"]),
    ]
    return _save(
        path,
        nodes,
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", d])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", d])],
        [_weight("w1", (d, hidden)), _weight("w2", (hidden, d), seed=1)],
    )


def test_matmul_macs_bytes_and_the_compute_memory_switch(tmp_path):
    m, k, n = 64, 128, 256
    path = _matmul(tmp_path / "mm.onnx", m, k, n)
    macs, nbytes = m * k * n, (m * k + k * n + m * n) * 4
    slow_memory = estimate(path, UNIT, 1, 1)  # 1 TFLOPS, 1 GB/s: memory-bound
    assert slow_memory["macs"] == macs and slow_memory["bytes"] == nbytes and slow_memory["weight_bytes"] == k * n * 4
    assert slow_memory["bound"] == {"compute": 0, "memory": 1}
    assert slow_memory["p50_ms"] == pytest.approx(nbytes / 1e9 * 1e3)
    fast_memory = estimate(path, replace(UNIT, bandwidth_gbs=1000.0), 1, 1)  # 1 TB/s: compute-bound
    assert fast_memory["bound"] == {"compute": 1, "memory": 0}
    assert fast_memory["p50_ms"] == pytest.approx(2 * macs / 1e12 * 1e3)
    slow_compute = estimate(path, replace(UNIT, bandwidth_gbs=1000.0, peak_tflops_fp32=0.001), 1, 1)
    assert slow_compute["p50_ms"] == pytest.approx(1000 * fast_memory["p50_ms"])
    # efficiencies divide the peaks
    half = estimate(path, replace(UNIT, bandwidth_gbs=1000.0, efficiency_compute=0.5), 1, 1)
    assert half["p50_ms"] == pytest.approx(2 * fast_memory["p50_ms"])
    assert half["top_nodes"][0]["op_type"] == "MatMul" and half["top_nodes"][0]["bound"] == "compute"


def test_launch_overhead_is_added_per_node(tmp_path):
    path = _mlp(tmp_path / "mlp.onnx")
    base = estimate(path, UNIT, 2, 1)
    with_launch = estimate(path, replace(UNIT, launch_us=10.0), 2, 1)
    assert base["nodes"] == with_launch["nodes"] == 3
    assert with_launch["p50_ms"] - base["p50_ms"] == pytest.approx(3 * 0.010)
    assert any("launch overhead" in c for c in with_launch["caveats"])


def test_mlp_scales_linearly_with_batch_when_compute_bound(tmp_path):
    path = _mlp(tmp_path / "mlp.onnx")
    device = replace(UNIT, bandwidth_gbs=1e6)  # memory far faster than compute
    one, eight = estimate(path, device, 1, 1), estimate(path, device, 8, 1)
    assert one["macs"] == 2 * 256 * 1024 and eight["macs"] == 8 * one["macs"]
    assert eight["bound"]["compute"] == 2  # the two MatMuls; Relu has no MACs
    assert eight["p50_ms"] / one["p50_ms"] == pytest.approx(8, rel=0.02)


def test_einsum_macs(tmp_path):
    nodes = [helper.make_node("Einsum", ["x", "w"], ["y"], equation="bij,jk->bik")]
    path = _save(
        tmp_path / "ein.onnx",
        nodes,
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        [_weight("w", (4, 5))],
    )
    assert estimate(path, UNIT, 1, 1)["macs"] == 2 * 3 * 4 * 5


def test_int8_moves_fewer_weight_bytes_than_fp32(tmp_path):
    m, k, n = 16, 64, 32
    fp32 = estimate(_matmul(tmp_path / "fp32.onnx", m, k, n), UNIT, 1, 1)
    # QDQ form (static quantization): x -> Q -> DQ, w_int8 -> DQ, MatMul, the pairs fuse into the MatMul.
    scale = numpy_helper.from_array(np.array(0.1, np.float32), "s")
    zp = numpy_helper.from_array(np.array(0, np.int8), "z")
    qdq = [
        helper.make_node("QuantizeLinear", ["x", "s", "z"], ["xq"]),
        helper.make_node("DequantizeLinear", ["xq", "s", "z"], ["xd"]),
        helper.make_node("DequantizeLinear", ["wq", "s", "z"], ["wd"]),
        helper.make_node("MatMul", ["xd", "wd"], ["y"]),
    ]
    qdq_path = _save(
        tmp_path / "qdq.onnx",
        qdq,
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [m, k])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        [_weight("wq", (k, n), np.int8), scale, zp],
    )
    q = estimate(qdq_path, UNIT, 1, 1)
    assert q["macs"] == fp32["macs"] and q["weight_bytes"] == k * n == fp32["weight_bytes"] / 4
    assert q["top_nodes"][0]["precision"] == "int8" and q["nodes"] == 1  # Q/DQ cost nothing
    assert q["p50_ms"] < fp32["p50_ms"]
    # dynamic quantization form: MatMulInteger on an int8 weight
    mmi = _save(
        tmp_path / "mmi.onnx",
        [helper.make_node("MatMulInteger", ["x", "wq"], ["y"])],
        [helper.make_tensor_value_info("x", TensorProto.UINT8, [m, k])],
        [helper.make_tensor_value_info("y", TensorProto.INT32, None)],
        [_weight("wq", (k, n), np.int8)],
    )
    dyn = estimate(mmi, UNIT, 1, 1)
    assert dyn["weight_bytes"] == k * n and dyn["top_nodes"][0]["precision"] == "int8"


def test_int4_matmulnbits_weights_are_half_a_byte(tmp_path):
    m, k, n, block = 8, 128, 64, 32
    nodes = [
        helper.make_node(
            "MatMulNBits", ["x", "b", "scales"], ["y"], domain="com.microsoft", K=k, N=n, bits=4, block_size=block
        )
    ]
    path = _save(
        tmp_path / "nbits.onnx",
        nodes,
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [m, k])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        [_weight("b", (n, k // block, block // 2), np.uint8), _weight("scales", (n * (k // block),))],
    )
    r = estimate(path, UNIT, 1, 1)
    assert r["macs"] == m * k * n
    assert r["weight_bytes"] == n * k / 2 + n * (k // block) * 4  # packed nibbles + fp32 scales
    assert r["top_nodes"][0]["precision"] == "fp32"  # accuracy_level 0: float compute


def test_forced_precision_counts_every_tensor_at_that_width(tmp_path):
    m, k, n = 16, 64, 32
    path = _matmul(tmp_path / "mm.onnx", m, k, n)
    as_int8, as_int4 = estimate(path, UNIT, 1, 1, precision="int8"), estimate(path, UNIT, 1, 1, precision="int4")
    assert as_int8["weight_bytes"] == k * n and as_int8["bytes"] == m * k + k * n + m * n
    assert as_int4["weight_bytes"] == k * n / 2 and as_int4["top_nodes"][0]["precision"] == "int8"
    assert any("precision forced to int8" in c for c in as_int8["caveats"])
    with pytest.raises(RooflineError, match="precision"):
        estimate(path, UNIT, 1, 1, precision="int3")


def test_labels_and_caveats(tmp_path):
    r = estimate(_mlp(tmp_path / "mlp.onnx"), replace(UNIT, uncertain=("peak_tops_int8",)), 4, 1)
    assert r["source"] == "analytic" and r["tool"] == "compress roofline"
    assert r["profile"] == "unit" and r["device"] == "test device" and (r["batch"], r["seq"]) == (4, 1)
    assert "not a measurement" in r["caveats"][0]
    assert any("peak_tops_int8" in c for c in r["caveats"])
    assert len(r["top_nodes"]) == 3 and r["top_nodes"][0]["ms"] >= r["top_nodes"][-1]["ms"]


def test_token_inputs_embedding_and_folded_shape_arithmetic(tmp_path):
    """input_ids (batch, seq) -> Gather -> Reshape to a shape computed from Shape/Gather/Concat -> MatMul."""
    vocab, hidden, n = 1000, 32, 16
    const = lambda name, v: numpy_helper.from_array(np.array(v, np.int64), name)
    nodes = [
        helper.make_node("Gather", ["emb", "input_ids"], ["h"]),
        helper.make_node("Shape", ["input_ids"], ["shp"]),
        helper.make_node("Gather", ["shp", "zero"], ["b"], axis=0),
        helper.make_node("Unsqueeze", ["b", "axes"], ["b1"]),
        helper.make_node("Concat", ["b1", "minus1"], ["new_shape"], axis=0),
        helper.make_node("Reshape", ["h", "new_shape"], ["flat"]),  # (batch, seq * hidden)
        helper.make_node("MatMul", ["flat", "w"], ["y"]),
    ]
    seq = 8
    path = _save(
        tmp_path / "tok.onnx",
        nodes,
        [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch_size", "sequence_length"])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch_size", n])],
        [
            _weight("emb", (vocab, hidden)),
            _weight("w", (seq * hidden, n)),
            const("zero", 0),
            const("axes", [0]),
            const("minus1", [-1]),
        ],
    )
    r = estimate(path, UNIT, 3, seq)
    assert r["macs"] == 3 * seq * hidden * n
    assert r["nodes"] == 2  # Gather + MatMul; the shape ops fold away
    gather = next(t for t in r["top_nodes"] if t["op_type"] == "Gather")
    assert gather["bytes"] == 3 * seq * 8 + 2 * 3 * seq * hidden * 4  # ids + rows read + rows written, not the table


def test_fused_attention_shapes_flow_to_the_next_op(tmp_path):
    b, s, d, heads = 2, 16, 64, 4
    nodes = [
        helper.make_node("Attention", ["x", "qkv_w", "qkv_b"], ["att"], domain="com.microsoft", num_heads=heads),
        helper.make_node("MatMul", ["att", "w_out"], ["y"]),
    ]
    path = _save(
        tmp_path / "att.onnx",
        nodes,
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", "seq", d])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        [_weight("qkv_w", (d, 3 * d)), _weight("qkv_b", (3 * d,)), _weight("w_out", (d, d))],
    )
    r = estimate(path, UNIT, b, s)
    projections, scores_and_mix, out = b * s * d * 3 * d, 2 * b * s * s * d, b * s * d * d
    assert r["macs"] == projections + scores_and_mix + out
    assert any("attention" in c for c in r["caveats"])


def test_unknown_op_is_reported_and_leaves_no_files_behind(tmp_path, monkeypatch):
    """An op nothing can infer is counted as unknown and said so; no shape-inference droppings in the cwd
    (onnxruntime.tools.symbolic_shape_infer would write sym_shape_infer_temp.onnx there)."""
    nodes = [
        helper.make_node("NoSuchFusedOp", ["x"], ["h"], domain="com.microsoft"),
        helper.make_node("MatMul", ["h", "w"], ["y"]),
    ]
    path = _save(
        tmp_path / "odd.onnx",
        nodes,
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        [_weight("w", (8, 8))],
    )
    work = tmp_path / "cwd"
    work.mkdir()
    monkeypatch.chdir(work)
    r = estimate(path, UNIT, 1, 1)
    assert list(work.iterdir()) == []
    assert any("without inferred shapes" in c and "the estimate is low" in c for c in r["caveats"])


def test_every_shipped_profile_estimates_or_refuses_in_one_line(tmp_path):
    path = _mlp(tmp_path / "mlp.onnx")
    for name in available_profiles():
        profile = load_profile(name)
        if name == "cpu" and not Path("/proc/cpuinfo").is_file():
            continue
        if profile.peak_tflops_fp32 == 0 and profile.peak_tflops_fp16 == 0 and name != "cpu":
            with pytest.raises(RooflineError) as e:  # integer-only NPU: the fp32 graph has no rate
                estimate(path, profile, 1, 1)
            assert "\n" not in str(e.value) and "precision='int8'" in str(e.value)
            r = estimate(path, profile, 1, 1, precision="int8")
        else:
            r = estimate(path, profile, 1, 1)
        assert r["p50_ms"] > 0 and r["source"] == "analytic" and r["profile"] == name


def test_fp32_graph_on_an_fp16_npu_is_costed_at_fp16_and_says_so(tmp_path):
    r = estimate(_mlp(tmp_path / "mlp.onnx"), load_profile("npu-apple-ane-m4"), 1, 1)
    assert any("costed at the fp16 rate" in c for c in r["caveats"])
    assert r["weight_bytes"] == 2 * 256 * 1024 * 2  # floats held in fp16 on the device


def test_inputs_without_a_size_need_input_shapes(tmp_path):
    path = _save(
        tmp_path / "img.onnx",
        [helper.make_node("Relu", ["x"], ["y"])],
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", "c", "h", "w"])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        [],
    )
    with pytest.raises(RooflineError, match="input_shapes") as e:
        estimate(path, UNIT, 1, 1)
    assert "\n" not in str(e.value)
    r = estimate(path, UNIT, 1, 1, input_shapes={"x": (2, 3, 8, 8)})
    assert r["bytes"] == 2 * 2 * 3 * 8 * 8 * 4


def test_int4_embedding_gather_block_quantized(tmp_path):
    """GatherBlockQuantized (quant.mixed's int4 word embeddings): the output shape flows on to the next MatMul, and
    only the gathered rows (half a byte each) and their block scales are read, not the table."""
    vocab, hidden, n, block, seq = 1000, 64, 16, 32, 8
    table = helper.make_tensor(
        "emb_q", TensorProto.UINT4, (vocab, hidden), np.zeros(vocab * hidden // 2, np.uint8).tobytes(), raw=True
    )
    nodes = [
        helper.make_node(
            "GatherBlockQuantized",
            ["emb_q", "input_ids", "scales"],
            ["h"],
            domain="com.microsoft",
            gather_axis=0,
            quantize_axis=1,
            block_size=block,
        ),
        helper.make_node("MatMul", ["h", "w"], ["y"]),
    ]
    path = _save(
        tmp_path / "gbq.onnx",
        nodes,
        [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch_size", "sequence_length"])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        [table, _weight("scales", (vocab, hidden // block)), _weight("w", (hidden, n))],
    )
    r = estimate(path, UNIT, 2, seq)
    assert r["macs"] == 2 * seq * hidden * n
    g = next(t for t in r["top_nodes"] if t["op_type"] == "GatherBlockQuantized")
    rows = 2 * seq * hidden
    assert g["bytes"] == 2 * seq * 8 + rows / 2 + rows / block * 4 + rows * 4  # ids + nibbles + scales + output
