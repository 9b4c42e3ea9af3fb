from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from compress.core.errors import CompressError
from runtimes.host import host_info
from runtimes.profiler import ProfileConfig, Shape, measure_latency, op_breakdown


def _toy_model(path: Path, hidden: int) -> Path:
    """input_ids (B, T) -> one-hot-free embedding lookup -> MatMul: a real graph ORT runs."""
    rng = np.random.default_rng(0)
    emb = helper.make_tensor(
        "emb", TensorProto.FLOAT, [2000, hidden], rng.standard_normal((2000, hidden)).astype(np.float32).ravel()
    )
    w = helper.make_tensor(
        "w", TensorProto.FLOAT, [hidden, hidden], rng.standard_normal((hidden, hidden)).astype(np.float32).ravel()
    )
    nodes = [helper.make_node("Gather", ["emb", "input_ids"], ["h"]), helper.make_node("MatMul", ["h", "w"], ["y"])]
    graph = helper.make_graph(
        nodes,
        "toy",
        [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["b", "t"])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["b", "t", hidden])],
        [emb, w],
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    return path


def test_shape_parse():
    assert Shape.parse("32x128") == Shape(32, 128)
    for bad in ("32", "0x128", "ax1"):
        with pytest.raises(CompressError):
            Shape.parse(bad)


def test_interleaved_measurement_labels_and_orders(tmp_path):
    small, big = _toy_model(tmp_path / "s.onnx", 16), _toy_model(tmp_path / "b.onnx", 384)
    seen = []
    res = measure_latency(
        {"small": small, "big": big},
        ProfileConfig(shapes=(Shape(1, 16), Shape(8, 64)), runs=12, warmup=2, threads=1),
        on_progress=lambda d, t: seen.append((d, t)),
    )
    assert seen[-1] == (24, 24)
    for label in ("small", "big"):
        assert [(r.batch, r.seq) for r in res[label]] == [(1, 16), (8, 64)]
        for r in res[label]:
            assert r.source == "measured" and r.runs == 12 and r.threads == 1
            assert 0 < r.min_ms <= r.p50_ms <= r.p90_ms <= r.p99_ms
            assert "onnxruntime" in r.tool and r.caveats  # < 50 runs is flagged
    # 384-wide MatMul on 512 tokens costs far more than a 16-wide one: the timer sees real work.
    assert res["big"][1].p50_ms > res["small"][1].p50_ms


def test_op_breakdown_reads_ort_profiler(tmp_path):
    ops = op_breakdown(_toy_model(tmp_path / "m.onnx", 256), Shape(4, 64), threads=1, runs=3)
    types = {o["op_type"] for o in ops}
    assert {"MatMul", "Gather"} <= types
    assert abs(sum(o["share"] for o in ops) - 1.0) < 0.01 and all(o["ms_per_run"] >= 0 for o in ops)


def test_host_info_has_isa_flags():
    h = host_info()
    assert h.physical_cores >= 1 and "avx2" in h.isa and h.onnxruntime
    assert isinstance(h.has_vnni, bool)
