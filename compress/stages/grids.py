"""The deployed grids, simulated exactly: the numbers ONNX Runtime's kernels will hold after quantization.

Shared by ``quant.int4`` (puts weights on the grid in torch so a compensation stage sees the exact error and the
exporter re-packs them losslessly) and ``quant.mixed`` (sensitivities measured on the grid that ships).
- int4 MatMul weights: ORT's own C++ kernel (``onnxruntime.capi._pybind_state.quantize_matmul_4bits``, what
  ``MatMulNBitsQuantizer`` calls), blocks along the input dimension.
- int4 embedding tables: ``DefaultWeightOnlyQuantizer.quantize_ndarray`` (GatherBlockQuantized), blocks along H.
- int8 weights: symmetric, ORT's range (``get_qmin_qmax_for_qType``), per output channel or per tensor.
"""

from __future__ import annotations

import numpy as np

from compress.stages.base import StageError
from export.int4_pack import ort_quantize, unpack_nibbles

BLOCK_SIZES = (16, 32, 64, 128, 256)


def check_block_size(stage: str, block_size: int) -> None:
    if block_size not in BLOCK_SIZES:
        raise StageError(f"{stage}: block_size={block_size} must be one of {', '.join(map(str, BLOCK_SIZES))}")


def ort_int4_roundtrip(w_kn: np.ndarray, block_size: int, symmetric: bool, bits: int = 4) -> np.ndarray:
    """Quantize a (K, N) float weight with ORT's MatMulNBits kernel (``ort_quantize``) and dequantize it back to
    float32."""
    k, n = w_kn.shape
    kb = (k + block_size - 1) // block_size
    packed, scales, zp = ort_quantize(w_kn, block_size, symmetric, bits)
    if bits == 4:
        q = unpack_nibbles(packed)  # (N, kb, block)
        z = np.full((n, kb), 8.0, np.float32) if symmetric else unpack_nibbles(zp)[:, :kb]
    else:
        q = packed.astype(np.float32)
        z = np.full((n, kb), 128.0, np.float32) if symmetric else zp[:, :kb].astype(np.float32)
    w = (q - z[..., None]) * scales[..., None]  # (N, kb, block)
    return w.reshape(n, kb * block_size)[:, :k].T.copy()


def source_grid_weight(w, block: int, levels: int = 16):
    """A Linear's (out, in) weight that sits exactly on an affine grid of ``levels`` values per block of ``block``
    input weights (w = d·q + m, q in 0..levels-1, d = (max - min) / (levels - 1): a source that was already quantized
    that way, e.g. a GGUF Q4_1 tensor dequantized to float), put on MatMulNBits' asymmetric grid keeping the source's
    codes q and scales d exactly: w' = d·(q − z), z = round(−m/d) clamped to 0..levels-1, the same for every weight
    of a block. None when the weight is not on such a grid. Only the block's float offset m + d·z is lost (an
    integer zero point cannot hold it), a constant per block that ``lowrank.eora`` restores exactly. ORT's own
    round-to-nearest gets the same grid except where the offset is a half step (ties: ~0.13-0.15% of the blocks of
    the SmolLM2 layers checked are then split both ways, so the error is no longer a constant per block).
    Re-quantizing w' with ORT is lossless."""
    import torch

    found = source_grid(w, block, levels)
    if found is None:
        return None
    d, q, z = found
    return torch.from_numpy((d[..., None] * (q - z[..., None])).reshape(w.shape)).to(w.dtype)


def source_grid(w, block: int, levels: int = 16) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
    """``source_grid_weight``'s pieces: scales d (out, blocks), codes q (out, blocks, block) and the nearest integer
    zero points z (out, blocks), float64; None when the weight is not on such a grid."""
    if w.shape[-1] % block:
        return None
    b = w.detach().double().numpy().reshape(w.shape[0], -1, block)
    lo, hi = b.min(-1, keepdims=True), b.max(-1, keepdims=True)
    d = np.where(hi > lo, (hi - lo) / (levels - 1), 1.0)
    q = np.rint((b - lo) / d)
    if np.abs(q * d + lo - b).max() > 1e-5 * max(float(np.abs(b).max()), 1e-30):
        return None
    z = np.clip(np.floor(-lo / d + 0.5), 0, levels - 1)
    return d[..., 0], q, z[..., 0]


def int4_table(w, block_size: int):
    """GatherBlockQuantized's grid on an embedding table (V, H) tensor: ORT's own quantize_ndarray, blocks along H."""
    import torch
    from onnxruntime.quantization.matmul_nbits_quantizer import DefaultWeightOnlyQuantizer

    data = w.detach().float().numpy()
    packed, scales, zp = DefaultWeightOnlyQuantizer.quantize_ndarray(data, 1, block_size, False)
    q = unpack_nibbles(packed.reshape(1, -1))[0, : data.size].reshape(data.shape)
    z = unpack_nibbles(zp.reshape(1, -1))[0, : scales.size].reshape(scales.shape)
    deq = (q.reshape(data.shape[0], -1, block_size) - z[..., None]) * scales[..., None]
    return torch.from_numpy(deq.reshape(data.shape)).to(w.dtype)


def int4_weight(w, block_size: int, symmetric: bool = False, bits: int = 4):
    """MatMulNBits' grid (4 or 8 bits) on a Linear's (out, in) weight tensor: blocks along the input dim."""
    import torch

    wq = ort_int4_roundtrip(w.detach().float().T.numpy(), block_size, symmetric, bits)
    return torch.from_numpy(wq).T.contiguous().to(w.dtype)


def int8_weight(w, per_channel: bool = True):
    """Symmetric int8 as ORT quantizes weights (range from get_qmin_qmax_for_qType): per output channel for
    MatMul weights, per tensor for a Gather's table."""
    import onnx
    import torch
    from onnxruntime.quantization.quant_utils import get_qmin_qmax_for_qType

    qmin, qmax = (float(v) for v in get_qmin_qmax_for_qType(onnx.TensorProto.INT8, symmetric=True))
    absmax = w.abs().amax(dim=1, keepdim=True) if per_channel else w.abs().max()
    scale = (absmax * 2 / (qmax - qmin)).clamp(min=1e-12)
    return torch.clamp(torch.round(w / scale), qmin, qmax) * scale
