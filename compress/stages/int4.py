"""``quant.int4``: block-wise int4 weight-only round-to-nearest on Linear layers (torch level).

The weights are put on ONNX Runtime's own MatMulNBits grid: quantized with ORT's C++ kernel
(``onnxruntime.capi._pybind_state.quantize_matmul_4bits``, what ``MatMulNBitsQuantizer`` calls) and
dequantized back into the torch model, so a following stage (``lowrank.eora``) sees the exact error and
the exporter packs the same numbers into ``MatMulNBits`` (``export.int4_pack``), a lossless re-quantization. The grid itself: ``compress.stages.grids``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np

from compress.core.models import linear_layers
from compress.stages.base import StageError, TorchContext
from compress.stages.grids import check_block_size, ort_int4_roundtrip


@dataclass(frozen=True)
class Int4Format:
    block_size: int
    symmetric: bool
    accuracy_level: int


@dataclass(frozen=True)
class Int4Quant:
    block_size: int = 32  # weights per scale along the input dimension (16, 32, 64, 128, 256)
    symmetric: bool = False  # asymmetric uint4 + zero point (ORT's default); some NPUs need symmetric
    accuracy_level: int = 4  # MatMulNBits compute type: 4 = int8 activations (fast on x86 CPUs), 0 = fp32
    layers: tuple[str, ...] = ("*encoder*",)  # fnmatch patterns over nn.Linear module names

    def __post_init__(self) -> None:
        check_block_size("quant.int4", self.block_size)
        if self.accuracy_level not in (0, 1, 2, 3, 4):
            raise StageError(f"quant.int4: accuracy_level={self.accuracy_level} must be 0..4")


def apply_int4(cfg: Int4Quant, lm, ctx: TorchContext):
    import torch

    layers = linear_layers(lm, cfg.layers)
    if not layers:
        raise StageError(f"quant.int4: no nn.Linear matches {list(cfg.layers)}: set layers to patterns of module names")
    fmt = Int4Format(cfg.block_size, cfg.symmetric, cfg.accuracy_level)
    per_layer = []
    with torch.no_grad():
        for name, mod in layers.items():
            if mod.in_features % 2:
                continue
            w = mod.weight.detach().float()  # (out, in) = (N, K)
            wq = torch.from_numpy(ort_int4_roundtrip(w.T.numpy(), cfg.block_size, cfg.symmetric)).T
            err = float((w - wq).norm() / w.norm())
            mod.weight.copy_(wq.to(mod.weight.dtype))
            per_layer.append({"layer": name, "relative_error": round(err, 5)})
    lm = dataclasses.replace(lm, int4_layers={**lm.int4_layers, **{r["layer"]: fmt for r in per_layer}})
    errs = [r["relative_error"] for r in per_layer]
    return lm, {"layers": len(per_layer), "mean_relative_error": round(float(np.mean(errs)), 5), "per_layer": per_layer}
