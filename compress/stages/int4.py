"""``quant.int4``: block-wise int4 weight-only round-to-nearest on Linear layers (torch level).

The weights are put on ONNX Runtime's own MatMulNBits grid: quantized with ORT's C++ kernel
(``onnxruntime.capi._pybind_state.quantize_matmul_4bits``, what ``MatMulNBitsQuantizer`` calls) and
dequantized back into the torch model, so a following stage (``lowrank.eora``) sees the exact error and
the exporter packs the same numbers into ``MatMulNBits`` (``export.int4_pack``), a lossless re-quantization.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np

from compress.stages.base import StageError, TorchContext


@dataclass(frozen=True)
class Int4Format:
    block_size: int
    symmetric: bool
    accuracy_level: int


@dataclass(frozen=True)
class Int4Quant:
    block_size: int = 32              # weights per scale along the input dimension (16, 32, 64, 128, 256)
    symmetric: bool = False           # asymmetric uint4 + zero point (ORT's default); some NPUs need symmetric
    accuracy_level: int = 4           # MatMulNBits compute type: 4 = int8 activations (fast on x86 CPUs), 0 = fp32
    layers: tuple[str, ...] = ("*encoder*",)   # fnmatch patterns over nn.Linear module names

    def __post_init__(self) -> None:
        if self.block_size not in (16, 32, 64, 128, 256):
            raise StageError(f"quant.int4: block_size={self.block_size} must be one of 16, 32, 64, 128, 256")
        if self.accuracy_level not in (0, 1, 2, 3, 4):
            raise StageError(f"quant.int4: accuracy_level={self.accuracy_level} must be 0..4")


def ort_int4_roundtrip(w_kn: np.ndarray, block_size: int, symmetric: bool) -> np.ndarray:
    """Quantize a (K, N) float weight with ORT's MatMulNBits kernel and dequantize it back to float32."""
    from onnxruntime.capi._pybind_state import quantize_matmul_4bits

    k, n = w_kn.shape
    kb = (k + block_size - 1) // block_size
    packed = np.zeros((n, kb, block_size // 2), np.uint8)
    scales = np.zeros((n, kb), np.float32)
    zp = np.zeros((n, (kb + 1) // 2), np.uint8)
    quantize_matmul_4bits(packed, np.ascontiguousarray(w_kn, dtype=np.float32), scales, zp, block_size, n, k, symmetric)
    q = np.stack([packed & 0xF, packed >> 4], -1).reshape(n, kb, block_size).astype(np.float32)   # low nibble first
    if symmetric:
        z = np.full((n, kb), 8.0, np.float32)
    else:
        z = np.stack([zp & 0xF, zp >> 4], -1).reshape(n, -1)[:, :kb].astype(np.float32)
    w = (q - z[..., None]) * scales[..., None]                  # (N, kb, block)
    return w.reshape(n, kb * block_size)[:, :k].T.copy()


def apply_int4(cfg: Int4Quant, lm, ctx: TorchContext):
    import torch

    from compress.models import linear_layers

    layers = linear_layers(lm, cfg.layers)
    if not layers:
        raise StageError(f"quant.int4: no nn.Linear matches {list(cfg.layers)}: set layers to patterns of module names")
    fmt = Int4Format(cfg.block_size, cfg.symmetric, cfg.accuracy_level)
    per_layer = []
    with torch.no_grad():
        for name, mod in layers.items():
            if mod.in_features % 2:
                continue
            w = mod.weight.detach().float()                       # (out, in) = (N, K)
            wq = torch.from_numpy(ort_int4_roundtrip(w.T.numpy(), cfg.block_size, cfg.symmetric)).T
            err = float((w - wq).norm() / w.norm())
            mod.weight.copy_(wq.to(mod.weight.dtype))
            per_layer.append({"layer": name, "relative_error": round(err, 5)})
    lm = dataclasses.replace(lm, int4_layers={**lm.int4_layers, **{r["layer"]: fmt for r in per_layer}})
    errs = [r["relative_error"] for r in per_layer]
    return lm, {"layers": len(per_layer), "mean_relative_error": round(float(np.mean(errs)), 5), "per_layer": per_layer}
