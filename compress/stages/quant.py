"""ONNX Runtime int8 quantization stages: ``quant.dynamic`` and ``quant.static`` (QDQ, calibrated on text).

Stand beside ``onnxruntime.quantization.quantize_dynamic`` / ``quantize_static`` /
``shape_inference.quant_pre_process`` and ``matmul_nbits_quantizer.MatMulNBitsQuantizer``; this file chooses their
arguments for the target, the host and the model kind, and counts what was quantized.

``quant.dynamic`` has two int8 kernels (``kernel``):
- ``matmulinteger``: ``quantize_dynamic``: int8 weights per output channel, activations quantized per tensor at run
  time (DynamicQuantizeLinear + MatMulInteger). The default for encoders (benchmarks/cpu_recipes.py).
- ``matmulnbits``: 8-bit ``MatMulNBits`` (weights int8 symmetric per block of ``block_size`` along K), with
  ``accuracy_level`` 4 the activations are quantized to int8 at run time per block of each row, i.e. per token.
  The default for causal language models: a decoder's down-projection inputs reach ~3000 at position 0 (typical
  ~1), which one per-tensor activation scale cannot hold. On SmolLM2-135M (README, Language models): per-tensor
  MatMulInteger +90% perplexity (+9.2% with reduce_range, per-channel and all 30 down_proj kept float),
  MatMulNBits-8 +0.6% and faster decode (1.97-2.0x fp32 vs 1.45-1.61x).
"""

from __future__ import annotations

import fnmatch
import time
from dataclasses import dataclass
from pathlib import Path

import onnx

from compress.core.fs import file_bytes, scratch_cwd
from compress.core.onnx_ops import quantized_counts
from compress.stages.base import OnnxContext, StageError
from compress.stages.grids import check_block_size

QTYPES = {"int8": "QInt8", "uint8": "QUInt8"}
CALIBRATION = {"minmax": "MinMax", "entropy": "Entropy", "percentile": "Percentile"}


def _reduce_range(setting: str, ctx: OnnxContext) -> bool:
    # ORT's docs suggest 7-bit weights on hosts without VNNI (u8s8 vpmaddubsw can saturate): "auto" does that.
    # The default is "false": it cost fidelity on MiniLM here (benchmarks/quant_ablation.py; README, CPU recipes).
    return (not ctx.host.has_vnni) if setting == "auto" else setting == "true"


def _check_choice(stage: str, key: str, value: str, choices) -> None:
    if value not in choices:
        raise StageError(f"{stage}: {key}='{value}' is not one of {', '.join(choices)}")


KERNELS = ("auto", "matmulinteger", "matmulnbits")


@dataclass(frozen=True)
class DynamicQuant:
    weight_type: str = "int8"  # int8 | uint8
    per_channel: bool = True  # per-tensor loses fidelity (benchmarks/quant_ablation.py)
    reduce_range: str = "false"  # auto (on when the host lacks VNNI) | true | false
    op_types: tuple[str, ...] = ()  # empty: every op type ORT can quantize dynamically (MatMul, Attention, Gather, ...)
    exclude: tuple[str, ...] = ()  # node names or fnmatch patterns kept in float
    kernel: str = "auto"  # auto (matmulnbits for causal LMs, else matmulinteger) | matmulinteger | matmulnbits
    block_size: int = 32  # matmulnbits: weights per scale along K
    accuracy_level: int = 4  # matmulnbits: 4 = int8 activations per block (per token); 0 = fp32 compute

    def __post_init__(self) -> None:
        _check_choice("quant.dynamic", "weight_type", self.weight_type, QTYPES)
        _check_choice("quant.dynamic", "reduce_range", self.reduce_range, ("auto", "true", "false"))
        _check_choice("quant.dynamic", "kernel", self.kernel, KERNELS)
        check_block_size("quant.dynamic", self.block_size)


def dynamic_kernel(cfg: DynamicQuant, ctx: OnnxContext | None) -> str:
    if cfg.kernel != "auto":
        return cfg.kernel
    return "matmulnbits" if ctx is not None and ctx.kind == "causal-lm" else "matmulinteger"


def nbits_quantize(src: Path, dst: Path, bits: int, block_size: int, accuracy_level: int, symmetric: bool = True,
                   exclude: list[str] | tuple[str, ...] = ()) -> None:  # fmt: skip
    """Every weight MatMul (B an initializer) not in ``exclude`` -> ``bits``-bit MatMulNBits, with ORT's
    ``MatMulNBitsQuantizer`` (its ``nodes_to_include`` is OR-ed with the op types, not an allow-list: exclude instead)."""
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    with scratch_cwd():
        q = MatMulNBitsQuantizer(onnx.load(str(src)), bits=bits, block_size=block_size, is_symmetric=symmetric,
                                 accuracy_level=accuracy_level or None, op_types_to_quantize=("MatMul",),
                                 nodes_to_exclude=list(exclude))  # fmt: skip
        q.process()
        onnx.save(q.model.model, str(dst))


def apply_dynamic(cfg: DynamicQuant, src: Path, dst: Path, ctx: OnnxContext) -> dict:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    before = file_bytes(src)
    src, dst = src.resolve(), dst.resolve()
    if dynamic_kernel(cfg, ctx) == "matmulnbits":
        nbits_quantize(src, dst, 8, cfg.block_size, cfg.accuracy_level, True, _matching_nodes(src, cfg.exclude))
        return {"bytes_before": before, "bytes": file_bytes(dst), "kernel": "matmulnbits (8-bit, symmetric, "
                f"block {cfg.block_size}, accuracy_level {cfg.accuracy_level})", "quantized": quantized_counts(dst)}  # fmt: skip
    rr = _reduce_range(cfg.reduce_range, ctx)
    with scratch_cwd():
        quantize_dynamic(
            str(src),
            str(dst),
            weight_type=getattr(QuantType, QTYPES[cfg.weight_type]),
            per_channel=cfg.per_channel,
            reduce_range=rr,
            op_types_to_quantize=list(cfg.op_types) or None,
            nodes_to_exclude=_matching_nodes(src, cfg.exclude),
            # A graph fused by ORT's optimizer lacks some value infos; without this the quantizer
            # fails with "Unable to find data type for weight_name".
            extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT},
        )
    return {"bytes_before": before, "bytes": file_bytes(dst), "kernel": "matmulinteger", "reduce_range": rr,
            "quantized": quantized_counts(dst)}  # fmt: skip


@dataclass(frozen=True)
class StaticQuant:
    per_channel: bool = True
    activation_type: str = "uint8"  # uint8 | int8
    weight_type: str = "int8"
    calibration_method: str = "minmax"  # minmax | entropy | percentile
    samples: int = 64  # calibration sentences
    reduce_range: str = "false"
    op_types: tuple[str, ...] = ("MatMul", "Gather")  # quantizing Add/Mul/Softmax too costs accuracy for little speed
    exclude: tuple[str, ...] = ()  # fnmatch patterns of node names kept in float
    symmetric_activations: bool = False  # zero point 0 (ORT's ActivationSymmetric): TensorRT accepts only that

    def __post_init__(self) -> None:
        _check_choice("quant.static", "activation_type", self.activation_type, QTYPES)
        _check_choice("quant.static", "weight_type", self.weight_type, QTYPES)
        _check_choice("quant.static", "calibration_method", self.calibration_method, CALIBRATION)
        _check_choice("quant.static", "reduce_range", self.reduce_range, ("auto", "true", "false"))
        if self.samples < 1:
            raise StageError(f"quant.static: samples={self.samples} must be >= 1")


def _weight_nodes(path: Path, op_types: tuple[str, ...], exclude: tuple[str, ...] = ()) -> list[str] | None:
    """Names of the nodes to quantize: MatMuls whose B is a weight, plus the other listed op types,
    minus the nodes matching an ``exclude`` pattern.

    ORT's QDQ MatMul ignores the ``MatMulConstBOnly`` option, so without this list the activation x
    activation attention MatMuls (QK^T, PV) would be quantized too.
    """
    if not op_types:
        return None
    graph = onnx.load(str(path), load_external_data=False).graph
    consts = {i.name for i in graph.initializer} | {o for n in graph.node if n.op_type == "Constant" for o in n.output}
    return [
        n.name
        for n in graph.node
        if n.op_type in op_types and (n.op_type != "MatMul" or n.input[1] in consts) and not _excluded(n.name, exclude)
    ]


def _excluded(name: str, exclude: tuple[str, ...]) -> bool:
    return any(name == pat or fnmatch.fnmatchcase(name, pat) for pat in exclude)


def _matching_nodes(path: Path, exclude: tuple[str, ...]) -> list[str]:
    if not exclude:
        return []
    return [n.name for n in onnx.load(str(path), load_external_data=False).graph.node if _excluded(n.name, exclude)]


def calibration_feeds(stage: str, src: Path, ctx: OnnxContext, samples: int) -> tuple[list[dict], int]:
    """The first ``samples`` calibration sentences as feeds for ``src``'s inputs: (batches, sentences taken)."""
    if not ctx.calibration:
        raise StageError(f"{stage} needs calibration text: pass --data FILE or keep the shipped sentences")
    graph_inputs = {i.name for i in onnx.load(str(src), load_external_data=False).graph.input}
    feeds, n = [], 0
    for batch in ctx.calibration:
        if n >= samples:
            break
        take = min(len(batch["input_ids"]), samples - n)
        feeds.append({k: v[:take] for k, v in batch.items() if k in graph_inputs})
        n += take
    return feeds, n


class _Reader:
    """onnxruntime.quantization.CalibrationDataReader over pre-tokenized feeds."""

    def __init__(self, feeds: list[dict]):
        self._it = iter(feeds)

    def get_next(self):
        return next(self._it, None)


def apply_static(cfg: StaticQuant, src: Path, dst: Path, ctx: OnnxContext) -> dict:
    from onnxruntime.quantization.shape_inference import quant_pre_process

    feeds, n = calibration_feeds("quant.static", src, ctx, cfg.samples)
    src, dst = src.resolve(), dst.resolve()
    pre = dst.with_name(dst.stem + ".pre.onnx")
    t0 = time.perf_counter()
    rr = _reduce_range(cfg.reduce_range, ctx)
    with scratch_cwd():
        try:
            quant_pre_process(str(src), str(pre), skip_symbolic_shape=False)
        except Exception:  # symbolic shape inference fails on some fused graphs; plain ONNX shape inference then
            quant_pre_process(str(src), str(pre), skip_symbolic_shape=True)
        _quantize_static(cfg, pre, dst, feeds, rr)
    return {
        "bytes_before": file_bytes(src),
        "bytes": file_bytes(dst),
        "calibration_samples": n,
        "calibration_seconds": round(time.perf_counter() - t0, 2),
        "reduce_range": rr,
        "quantized": quantized_counts(dst),
    }


def _quantize_static(cfg: StaticQuant, pre: Path, dst: Path, feeds: list[dict], rr: bool) -> None:
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    nodes = _weight_nodes(pre, cfg.op_types, cfg.exclude)
    try:
        quantize_static(
            str(pre),
            str(dst),
            _Reader(feeds),
            quant_format=QuantFormat.QDQ,
            per_channel=cfg.per_channel,
            reduce_range=rr,
            activation_type=getattr(QuantType, QTYPES[cfg.activation_type]),
            weight_type=getattr(QuantType, QTYPES[cfg.weight_type]),
            calibrate_method=getattr(CalibrationMethod, CALIBRATION[cfg.calibration_method]),
            op_types_to_quantize=list(cfg.op_types) or None,
            nodes_to_quantize=nodes,
            extra_options={
                "DefaultTensorType": onnx.TensorProto.FLOAT,
                "ActivationSymmetric": cfg.symmetric_activations,
            },
        )
    finally:
        pre.unlink(missing_ok=True)
        for leftover in dst.parent.glob("augmented_model*.onnx"):
            leftover.unlink()
