"""GPTQ onto MatMulNBits' block-wise int4 grid (Frantar et al., 2023: optimal brain quantization, one column at a time,
the rounding error pushed onto the columns not yet quantized through the inverse Hessian's Cholesky factor).

Stands beside GPTQModel / AutoGPTQ's ``GPTQ.fasterquant`` (the same lazy-batch update, group size = the block size,
each group's scale and zero point taken from its weights as the updates left them) and ORT's
``GPTQWeightOnlyQuantConfig`` (which needs Intel Neural Compressor and a calibration reader on the ONNX graph). Here the
Hessian ``H = E[x xᵀ]`` comes from the torch model's own inputs (``lowrank.input_covariances``), and the result is the
table itself: codes, scales and zero points exactly as MatMulNBits packs them (ORT's conventions: asymmetric scale =
(max(w, 0) - min(w, 0)) / 15 per block, zero point round(-min / scale); symmetric scale = the largest-magnitude weight /
-8), so the exporter writes these numbers rather than re-rounding the dequantized weight (which would not be lossless:
a block whose codes miss 0 or 15 re-rounds to another scale).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class GptqTable:
    """One Linear on MatMulNBits' 4-bit grid: ``weight`` (out, in) = scales * (codes - zero points) per block."""

    weight: np.ndarray  # float32 (out, in), the dequantized grid
    packed: np.ndarray  # uint8 (out, blocks, block / 2), low nibble first
    scales: np.ndarray  # float32 (out, blocks)
    zero_points: np.ndarray | None  # uint8 (out, ceil(blocks / 2)) packed; None: symmetric (8 implied)


def _grid(w, symmetric: bool):
    """Per-row scale and zero point of one block (torch (out, block)), ORT's conventions."""
    import torch

    if symmetric:
        idx = w.abs().argmax(1, keepdim=True)
        scale = w.gather(1, idx)[:, 0] / -8
        zero = torch.full_like(scale, 8.0)
    else:
        lo, hi = w.min(1).values.clamp(max=0), w.max(1).values.clamp(min=0)
        scale = (hi - lo) / 15
        zero = torch.round(-lo / torch.where(scale == 0, torch.ones_like(scale), scale)).clamp(0, 15)
    return torch.where(scale == 0, torch.ones_like(scale), scale), zero


def _pack(codes: np.ndarray) -> np.ndarray:
    """(..., 2k) values 0..15 -> (..., k) bytes, low nibble first (ORT's MatMulNBits layout)."""
    return (codes[..., 0::2] | (codes[..., 1::2] << 4)).astype(np.uint8)


def gptq(w: np.ndarray, hessian: np.ndarray, block: int, symmetric: bool = False, damp: float = 0.01,
         grid: tuple[np.ndarray, np.ndarray] | None = None) -> GptqTable:  # fmt: skip
    """GPTQ of a Linear's (out, in) weight with ``hessian`` = E[x xᵀ] (in, in) of its inputs, blocks of ``block``.
    ``grid`` = (scales, zero points), each (out, in / block): keep that grid (e.g. a GGUF source's scales with the
    nearest integer zero points) and choose only the codes, instead of each block's scale from its weights."""
    import torch

    out_f, in_f = w.shape
    if grid is not None and in_f % block:
        raise ValueError(f"in_features {in_f} is not a multiple of the source grid's block {block}")
    # a partial last block (smollm2's head: 576 = 4.5 x 128) as MatMulNBits holds it: zero weights padded to a whole
    # block, which land on the block's zero point exactly (0 is always on the grid) and are cut from ``weight``
    pad = -in_f % block
    W = torch.from_numpy(np.pad(np.asarray(w, np.float32), ((0, 0), (0, pad)))).clone()
    H = torch.from_numpy(np.pad(np.asarray(hessian, np.float64), ((0, pad), (0, pad)))).clone()
    k = in_f
    in_f += pad
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    H += damp * torch.mean(torch.diag(H)[:k]) * torch.eye(in_f, dtype=H.dtype)
    hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True).float()
    codes = torch.zeros((out_f, in_f), dtype=torch.int64)
    n_blocks = in_f // block
    scales = torch.zeros((out_f, n_blocks))
    zeros = torch.zeros((out_f, n_blocks))
    for b in range(n_blocks):
        lo, hi = b * block, (b + 1) * block
        if grid is None:
            scale, zero = _grid(W[:, lo:hi], symmetric)
        else:
            scale, zero = torch.from_numpy(grid[0][:, b]).float(), torch.from_numpy(grid[1][:, b]).float()
        scales[:, b], zeros[:, b] = scale, zero
        err = torch.zeros((out_f, block))
        qmin, qmax = 0, 15
        for j in range(block):
            col = W[:, lo + j]
            q = torch.clamp(torch.round(col / scale) + zero, qmin, qmax)
            codes[:, lo + j] = q.long()
            e = (col - (q - zero) * scale) / hinv[lo + j, lo + j]
            W[:, lo + j : hi] -= e[:, None] * hinv[lo + j, lo + j : hi][None, :]
            err[:, j] = e
        W[:, hi:] -= err @ hinv[lo:hi, hi:]
    c = codes.numpy().astype(np.uint8)
    s, z = scales.numpy().astype(np.float32), zeros.numpy()
    weight = ((c.reshape(out_f, n_blocks, block) - z[..., None]) * s[..., None]).reshape(out_f, in_f)[:, :k]
    zp = None
    if not symmetric:
        zc = z.astype(np.uint8)
        if n_blocks % 2:
            zc = np.concatenate([zc, np.zeros((out_f, 1), np.uint8)], 1)
        zp = _pack(zc)
    return GptqTable(weight.astype(np.float32), _pack(c.reshape(out_f, n_blocks, block)), s, zp)
