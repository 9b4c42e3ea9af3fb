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

from compress.core.fs import scratch_cwd


def _digest(a: np.ndarray) -> str:
    return hashlib.sha1(np.ascontiguousarray(a, dtype=np.float32).tobytes()).hexdigest()


WEIGHT_INPUT = {"MatMul": 1, "Gather": 0}  # where each op takes its weight: MatMul B (K, N), Gather data (V, H)


def op_weight(mod) -> np.ndarray:
    """A torch layer's weight as its exported op holds it: MatMul B = W^T (K, N) for a Linear, Gather data (V, H)
    for an embedding table."""
    import torch

    w = mod.weight.detach().float()
    return (w if isinstance(mod, torch.nn.Embedding) else w.T).numpy()


def unpack_nibbles(packed: np.ndarray) -> np.ndarray:
    """uint8 bytes holding two 4-bit values (low nibble first) -> float32 values, flattened per leading row."""
    return np.stack([packed & 0xF, packed >> 4], -1).reshape(*packed.shape[:-1], -1).astype(np.float32)


def ort_quantize(w_kn: np.ndarray, block_size: int, symmetric: bool, bits: int = 4):
    """ORT's MatMulNBits packing of a (K, N) float weight (``quantize_matmul_4bits`` / ``_8bits``, what
    ``MatMulNBitsQuantizer`` calls): (packed B (N, blocks, block/(8/bits)), scales (N, blocks), packed zero points)."""
    from onnxruntime.capi import _pybind_state as ort_c

    k, n = w_kn.shape
    kb = (k + block_size - 1) // block_size
    pack = 8 // bits
    packed = np.zeros((n, kb, block_size // pack), np.uint8)
    scales = np.zeros((n, kb), np.float32)
    zp = np.zeros((n, (kb + pack - 1) // pack), np.uint8)
    w = np.ascontiguousarray(w_kn, dtype=np.float32)
    getattr(ort_c, f"quantize_matmul_{bits}bits")(packed, w, scales, zp, block_size, n, k, symmetric)
    return packed, scales, zp


def gather_table(w_vh: np.ndarray, block_size: int, bits: int) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """GatherBlockQuantized's (data, scales, zero points) for an embedding table (V, H), blocks along H. 4 bits:
    asymmetric uint4 pairs as ORT's ``DefaultWeightOnlyQuantizer.quantize_gather`` writes them; 8 bits: MatMulNBits'
    8-bit symmetric grid (``ort_quantize`` of the table as a (H, V) weight: uint8, the op's implicit zero point 128),
    so a tied 8-bit LM head and the table share one grid."""
    if bits == 8:
        packed, scales, _ = ort_quantize(np.ascontiguousarray(w_vh.T), block_size, True, 8)
        return packed.reshape(w_vh.shape[0], -1)[:, : w_vh.shape[1]], scales, None
    from onnxruntime.quantization.matmul_nbits_quantizer import DefaultWeightOnlyQuantizer

    return DefaultWeightOnlyQuantizer.quantize_ndarray(np.asarray(w_vh, np.float32), 1, block_size, False)


def gather_node(data: np.ndarray, scales: np.ndarray, zero_points: np.ndarray | None, shape: tuple[int, int],
                block_size: int, bits: int, ids: str, output: str, name: str, prefix: str) -> tuple:  # fmt: skip
    """The GatherBlockQuantized node reading ``gather_table``'s pieces, and its initializers (named ``prefix.*``)."""
    from onnx import TensorProto, helper

    dtype = TensorProto.UINT8 if bits == 8 else TensorProto.UINT4
    inits = [helper.make_tensor(f"{prefix}.packed", dtype, shape, data.tobytes(), True),
             numpy_helper.from_array(np.ascontiguousarray(scales, np.float32), f"{prefix}.scales")]  # fmt: skip
    if zero_points is not None:
        inits.append(helper.make_tensor(f"{prefix}.zero_points", dtype, scales.shape, zero_points.tobytes(), True))
    inputs = [inits[0].name, ids, *(t.name for t in inits[1:])]
    node = helper.make_node("GatherBlockQuantized", inputs, [output], name=name, domain="com.microsoft",
                            gather_axis=0, quantize_axis=1, block_size=block_size, bits=bits)  # fmt: skip
    return node, inits


def layer_nodes(model: onnx.ModelProto, weights_kn: dict[str, np.ndarray]) -> dict[str, str]:
    """Layer name -> the MatMul / Gather node whose weight initializer is byte-identical to the layer's weight
    as the op sees it ((K, N) for a Linear, (V, H) for an embedding)."""
    by_digest = {_digest(w): name for name, w in weights_kn.items()}
    inits = {i.name: i for i in model.graph.initializer}
    out = {}
    for node in model.graph.node:
        init = inits.get(node.input[WEIGHT_INPUT[node.op_type]]) if node.op_type in WEIGHT_INPUT else None
        if init is not None:
            hit = by_digest.get(_digest(numpy_helper.to_array(init)))
            if hit:
                out[hit] = node.name
    return out


def pack_int4(src: Path, dst: Path, weights_kn: dict[str, tuple[np.ndarray, object]],
              tables: dict[str, tuple] | None = None) -> dict:  # fmt: skip
    """weights_kn: layer name -> (float weight as the op sees it, Int4Format); MatMuls become MatMulNBits,
    embedding Gathers GatherBlockQuantized (blocks along the hidden dim). ``tables``: layer name -> (packed, scales,
    zero points or None) a stage chose itself (GPTQ), written over ORT's re-rounding of that layer. Returns counts."""
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    model = onnx.load(str(src))
    nodes_of = layer_nodes(model, {name: w for name, (w, _) in weights_kn.items()})
    missing = sorted(set(weights_kn) - set(nodes_of))
    if missing:
        raise ValueError(f"int4 packing found no MatMul for {len(missing)} layer(s), e.g. {missing[0]}")
    groups: dict[object, list[str]] = defaultdict(list)  # format -> MatMul node names to pack
    gathers8 = {}  # ORT's quantize_gather writes 4 bits whatever it is asked: 8-bit tables are written here
    op_of = {n.name: n.op_type for n in model.graph.node}
    for name, node in nodes_of.items():
        w, fmt = weights_kn[name]
        if op_of[node] == "Gather" and getattr(fmt, "bits", 4) == 8:
            gathers8[node] = (w, fmt)
        else:
            groups[fmt].append(node)
    matmuls = [n.name for n in model.graph.node if n.op_type in WEIGHT_INPUT]
    current = model
    with scratch_cwd():
        for fmt, nodes in groups.items():
            quantizer = MatMulNBitsQuantizer(
                current,
                bits=getattr(fmt, "bits", 4),
                block_size=fmt.block_size,
                is_symmetric=fmt.symmetric,
                accuracy_level=fmt.accuracy_level or None,
                op_types_to_quantize=tuple(WEIGHT_INPUT),
                nodes_to_exclude=[n for n in matmuls if n not in set(nodes)],
            )
            quantizer.process()
            current = quantizer.model.model
    if tables:
        _write_tables(current, {nodes_of[name]: t for name, t in tables.items()})
    for node in current.graph.node:
        if node.name in gathers8:
            w, fmt = gathers8[node.name]
            data, scales, zp = gather_table(w, fmt.block_size, 8)
            new, inits = gather_node(data, scales, zp, w.shape, fmt.block_size, 8, node.input[1], node.output[0],
                                     node.name + "_Q8", node.input[0])  # fmt: skip
            floats = node.input[0]
            node.CopyFrom(new)
            current.graph.initializer.extend(inits)
            if not any(floats in n.input for n in current.graph.node):  # the float table, unless still shared
                kept = [t for t in current.graph.initializer if t.name != floats]
                del current.graph.initializer[:]
                current.graph.initializer.extend(kept)
    onnx.save(current, str(dst))
    formats = list(groups) + [f for _, f in gathers8.values()]
    return {
        "packed_matmuls": sum(len(v) for v in groups.values()),
        "embedding_tables_8bit": len(gathers8),
        "formats": [vars(f) for f in dict.fromkeys(formats)],
    }


def _write_tables(model: onnx.ModelProto, tables: dict[str, tuple]) -> None:
    """Overwrite the MatMulNBits that MatMulNBitsQuantizer made of each MatMul node (named NODE_Q4) with the given
    (packed, scales, zero points) table."""
    inits = {t.name: t for t in model.graph.initializer}
    nodes = {n.name: n for n in model.graph.node if n.op_type == "MatMulNBits"}
    for matmul, (packed, scales, zp) in tables.items():
        node = nodes.get(f"{matmul}_Q4")
        if node is None or (zp is None) != (len(node.input) < 4 or not node.input[3]):
            raise ValueError(f"int4 packing: no MatMulNBits of the same kind for {matmul}'s own table")
        for name, arr in zip(node.input[1:4], (packed, scales.reshape(-1), None if zp is None else zp.reshape(-1))):
            if arr is not None:
                if int(np.prod(inits[name].dims)) != arr.size:
                    raise ValueError(f"int4 packing: {matmul}'s table does not fit {name} {list(inits[name].dims)}")
                inits[name].CopyFrom(numpy_helper.from_array(arr.reshape(tuple(inits[name].dims)), name))
