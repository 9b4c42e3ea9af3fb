"""Pack int4-grid Linear weights of an exported float graph into ``MatMulNBits``.

Stands beside ``onnxruntime.quantization.matmul_nbits_quantizer.MatMulNBitsQuantizer``, which does the
packing; this file only decides *which* MatMuls: those whose weight initializer is byte-identical to a
layer the torch side registered as int4 (so low-rank adapters and untouched layers stay float).
The weights are already on ORT's grid, so re-quantizing them is lossless.
"""
from __future__ import annotations

import hashlib
from collections import defaultdict
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper


def _digest(a: np.ndarray) -> str:
    return hashlib.sha1(np.ascontiguousarray(a, dtype=np.float32).tobytes()).hexdigest()


def pack_int4(src: Path, dst: Path, weights_kn: dict[str, tuple[np.ndarray, object]]) -> dict:
    """weights_kn: layer name -> ((K, N) float weight as the MatMul sees it, Int4Format). Returns counts."""
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    from compress.stages.base import scratch_cwd

    model = onnx.load(str(src))
    by_digest = {_digest(w): (name, fmt) for name, (w, fmt) in weights_kn.items()}
    inits = {i.name: i for i in model.graph.initializer}
    groups: dict[object, list[str]] = defaultdict(list)      # format -> MatMul node names to pack
    matched, matmuls = set(), []
    for node in model.graph.node:
        if node.op_type != "MatMul":
            continue
        matmuls.append(node.name)
        init = inits.get(node.input[1])
        if init is None:
            continue
        hit = by_digest.get(_digest(numpy_helper.to_array(init)))
        if hit:
            groups[hit[1]].append(node.name)
            matched.add(hit[0])
    missing = sorted(set(weights_kn) - matched)
    if missing:
        raise ValueError(f"int4 packing found no MatMul for {len(missing)} layer(s), e.g. {missing[0]}")
    current = model
    with scratch_cwd():
        for fmt, nodes in groups.items():
            quantizer = MatMulNBitsQuantizer(current, bits=4, block_size=fmt.block_size, is_symmetric=fmt.symmetric,
                                             accuracy_level=fmt.accuracy_level or None,
                                             nodes_to_exclude=[n for n in matmuls if n not in set(nodes)])
            quantizer.process()
            current = quantizer.model.model
    onnx.save(current, str(dst))
    return {"packed_matmuls": sum(len(v) for v in groups.values()), "formats": [vars(f) for f in groups]}
