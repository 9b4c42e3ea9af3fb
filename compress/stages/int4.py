"""``quant.int4``: block-wise int4 weight-only round-to-nearest on Linear layers (torch level).

The weights are put on ONNX Runtime's own MatMulNBits grid: quantized with ORT's C++ kernel
(``onnxruntime.capi._pybind_state.quantize_matmul_4bits``, what ``MatMulNBitsQuantizer`` calls) and
dequantized back into the torch model, so a following stage (``lowrank.eora``) sees the exact error and
the exporter packs the same numbers into ``MatMulNBits`` (``export.int4_pack``), a lossless re-quantization. The grid itself: ``compress.stages.grids``.

``bits = 8`` puts the layers on MatMulNBits' 8-bit grid instead (round to nearest; a source grid is not kept, GPTQ
is 4-bit only). Language models (``causal-lm``): ``layers`` defaults to the decoder blocks (``*layers.*``: q/k/v/o and gate/up/down
projections), and the LM head and the token embeddings have their own settings: ``lm_head`` float | int8 (8-bit
MatMulNBits, block-wise symmetric) | int4 (its own ``lm_head_block_size`` and ``lm_head_grid`` if set), ``embeddings`` float | int8 | int4 (GatherBlockQuantized, blocks along
the hidden dimension; int4 asymmetric on ORT's ``DefaultWeightOnlyQuantizer`` grid, int8 symmetric on MatMulNBits'
8-bit grid: ``export.int4_pack.gather_table``). A tied head and embedding are untied
first when they get different grids. On SmolLM2-135M the head holds much of int4's loss (perplexity 84.8 with an
int4 head, 77.3 with an 8-bit head, 77.1 float), the int4 embedding costs ~1 point and saves ~96 MB (in
``lm-int8-genai``: the 8-bit table 62.82 against the int4 one's 63.54, 13.7 MB more; README, Language models).

A source already on a 16-level grid per block (a GGUF Q4_1 model, as ``smollm2``) is reported (``source_grid_layers``):
with ``symmetric = false`` and its block size, its codes and scales are kept exactly (``grids.source_grid_weight``)
and only the per-block float offset is lost (the integer zero point cannot hold it); ``lowrank.eora`` then restores
it exactly (``compress.stages.lowrank``, exact block offsets).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np

from compress.core.models import default_layers, linear_layers
from compress.stages.base import StageError, TorchContext
from compress.stages.gptq import gptq
from compress.stages.grids import (
    BLOCK_SIZES,
    check_block_size,
    int4_table,
    int4_weight,
    ort_int4_roundtrip,
    source_grid_weight,
)
from compress.stages.lowrank import input_covariances

__all__ = ["Int4Format", "Int4Quant", "apply_int4", "ort_int4_roundtrip", "untie"]

HEADS = ("float", "int8", "int4")
HEAD_GRIDS = ("body", "symmetric", "asymmetric")


@dataclass(frozen=True)
class Int4Format:
    block_size: int
    symmetric: bool
    accuracy_level: int
    bits: int = 4


@dataclass(frozen=True)
class Int4Quant:
    block_size: int = 32  # weights per scale along the input dimension (16, 32, 64, 128, 256)
    bits: int = 4  # the layers' width: 4, or 8 (8-bit MatMulNBits: onnxruntime-genai's int8; no source-grid keeping)
    symmetric: bool = False  # asymmetric uint4 + zero point (ORT's default); some NPUs need symmetric
    accuracy_level: int = 4  # MatMulNBits compute type: 4 = int8 activations (fast on x86 CPUs), 0 = fp32
    layers: tuple[str, ...] = ()  # fnmatch patterns over nn.Linear names; empty: *encoder* / decoder *layers.*
    lm_head: str = "float"  # language models: float | int8 | int4
    # the head's own block size (0: block_size). smollm2: its 49152 x 576 head is ~1/5 of a decode step's weights;
    # blocks of 64 / 128 (576 = 4.5 blocks: MatMulNBits pads the last) run it faster than 32, at some perplexity
    lm_head_block_size: int = 0
    # the int4 head's zero points: body (as ``symmetric``) | symmetric | asymmetric. smollm2's head by GPTQ (body
    # exact; torch): b64 symmetric 64.11 perplexity vs b128 asymmetric 64.52, and the faster MatMulNBits of the two
    lm_head_grid: str = "body"
    embeddings: str = "float"  # language models: float | int8 | int4 (GatherBlockQuantized)
    # rtn: round to nearest; gptq: GPTQ on the 4-bit layers (compress.stages.gptq), Hessians from the calibration
    # text through the float model (one pass; a layer on a source grid keeps it, embeddings and 8-bit heads stay RTN)
    method: str = "rtn"
    calibration_samples: int = 64  # gptq: calibration texts (LMs: packed token windows)
    damp: float = 0.01  # gptq: Hessian dampening, a share of its mean diagonal

    def __post_init__(self) -> None:
        check_block_size("quant.int4", self.block_size)
        if self.lm_head_block_size and self.lm_head_block_size not in BLOCK_SIZES:
            raise StageError(f"quant.int4: lm_head_block_size={self.lm_head_block_size} must be 0 (= block_size) or "
                             f"one of {', '.join(map(str, BLOCK_SIZES))}")  # fmt: skip
        if self.accuracy_level not in (0, 1, 2, 3, 4):
            raise StageError(f"quant.int4: accuracy_level={self.accuracy_level} must be 0..4")
        if self.bits not in (4, 8):
            raise StageError(f"quant.int4: bits={self.bits} must be 4 or 8")
        if self.method not in ("rtn", "gptq") or self.calibration_samples < 1 or not 0 < self.damp < 1:
            raise StageError(
                f"quant.int4: method='{self.method}' must be rtn or gptq, calibration_samples >= 1, damp in (0, 1)"
            )
        if self.lm_head_grid not in HEAD_GRIDS:
            raise StageError(f"quant.int4: lm_head_grid='{self.lm_head_grid}' must be one of {', '.join(HEAD_GRIDS)}")
        if self.lm_head not in HEADS or self.embeddings not in HEADS:
            raise StageError(
                f"quant.int4: lm_head='{self.lm_head}' and embeddings='{self.embeddings}' must each be one of "
                f"{', '.join(HEADS)}"
            )


def untie(model) -> None:
    """Give the LM head its own weight (a tied head shares the embedding table's Parameter)."""
    import torch

    head, emb = model.get_output_embeddings(), model.get_input_embeddings()
    if head is not None and emb is not None and head.weight is emb.weight:
        head.weight = torch.nn.Parameter(emb.weight.detach().clone())
        model.config.tie_word_embeddings = False
        if hasattr(model.config, "get_text_config"):
            model.config.get_text_config().tie_word_embeddings = False


def _head_and_embeddings(cfg: Int4Quant, lm) -> dict:
    """{module name: (module, Int4Format, grid fn)} for the LM head and the token embeddings."""
    if cfg.lm_head == "float" and cfg.embeddings == "float":
        return {}
    model = lm.model
    if lm.task != "text-generation" or model.get_output_embeddings() is None:
        raise StageError("quant.int4: lm_head / embeddings apply to causal language models: leave them 'float'")
    head_block = cfg.lm_head_block_size or cfg.block_size
    head_bits = 8 if cfg.lm_head == "int8" else 4
    head_sym = head_bits == 8 or {"body": cfg.symmetric, "symmetric": True, "asymmetric": False}[cfg.lm_head_grid]
    head_fmt = None if cfg.lm_head == "float" else Int4Format(head_block, head_sym, cfg.accuracy_level, head_bits)
    emb_fmt = {"float": None, "int4": Int4Format(cfg.block_size, False, cfg.accuracy_level),
               "int8": Int4Format(cfg.block_size, True, cfg.accuracy_level, 8)}[cfg.embeddings]  # fmt: skip
    if head_fmt != emb_fmt:
        untie(model)
    names = {id(m): n for n, m in model.named_modules()}
    out = {}
    head, emb = model.get_output_embeddings(), model.get_input_embeddings()
    if head_fmt is not None:
        out[names[id(head)]] = (head, head_fmt,
                                lambda w, f=head_fmt: int4_weight(w, f.block_size, f.symmetric, f.bits))  # fmt: skip
    if cfg.embeddings == "int4":
        out[names[id(emb)]] = (emb, emb_fmt, lambda w: int4_table(w, cfg.block_size))
    elif cfg.embeddings == "int8":  # the 8-bit head's grid (blocks along the hidden dim either way): a tied pair agrees
        out[names[id(emb)]] = (emb, emb_fmt, lambda w: int4_weight(w, cfg.block_size, True, 8))
    return out


def apply_int4(cfg: Int4Quant, lm, ctx: TorchContext):
    import torch

    patterns = default_layers(lm, cfg.layers)
    layers = linear_layers(lm, patterns)
    if not layers:
        raise StageError(f"quant.int4: no nn.Linear matches {list(patterns)}: set layers to patterns of module names")
    fmt = Int4Format(cfg.block_size, cfg.symmetric, cfg.accuracy_level, cfg.bits)
    extra = _head_and_embeddings(cfg, lm)
    targets = {name: (mod, fmt, lambda w: int4_weight(w, cfg.block_size, cfg.symmetric, cfg.bits)) for name, mod in
               layers.items() if name not in extra and mod.in_features % 2 == 0}  # fmt: skip
    targets.update(extra)
    keep_source = cfg.bits == 4
    sources = {name: None if name in extra or not keep_source else
               source_grid_weight(mod.weight.detach().float(), cfg.block_size)
               for name, (mod, _, _) in targets.items()}  # fmt: skip
    # asymmetric at the source's block size, a source grid is kept as it is (symmetric cannot hold its zero points)
    kept = {n: src for n, src in sources.items() if src is not None and not cfg.symmetric}
    gptq_layers = [n for n, (m, f, _) in targets.items() if cfg.method == "gptq" and f.bits == 4 and
                   isinstance(m, torch.nn.Linear) and n not in kept]  # fmt: skip
    progress = ctx.progress or (lambda msg: None)
    if gptq_layers:
        progress(
            f"  gptq: input Hessians of {len(gptq_layers)} layer(s) from {cfg.calibration_samples} calibration texts"
        )
    hessians = (
        input_covariances(lm, gptq_layers, list(ctx.calibration[: cfg.calibration_samples])) if gptq_layers else {}
    )
    per_layer, formats, tables, on_grid = [], {}, {}, 0
    with torch.no_grad():
        for name, (mod, f, grid) in targets.items():
            w = mod.weight.detach().float()
            on_grid += sources[name] is not None
            if name in hessians:
                tables[name] = gptq(w.numpy(), hessians[name], f.block_size, f.symmetric, cfg.damp)
                if len(tables) % max(len(hessians) // 5, 1) == 0 or len(tables) == len(hessians):
                    progress(f"  gptq: {len(tables)}/{len(hessians)} layers")
                wq = torch.from_numpy(tables[name].weight)
            else:
                wq = kept[name] if name in kept else grid(w)
            err = float((w - wq).norm() / w.norm())
            mod.weight.copy_(wq.to(mod.weight.dtype))
            formats[name] = f
            per_layer.append({"layer": name, "bits": f.bits, "relative_error": round(err, 5),
                              "method": "gptq" if name in tables else "source grid" if name in kept else "rtn"})  # fmt: skip
    lm = dataclasses.replace(lm, int4_layers={**lm.int4_layers, **formats}, int4_tables={**lm.int4_tables, **tables})
    errs = [r["relative_error"] for r in per_layer]
    metrics = {
        "layers": len(per_layer),
        "patterns": list(patterns),
        "lm_head": cfg.lm_head,
        "embeddings": cfg.embeddings,
        "mean_relative_error": round(float(np.mean(errs)), 5),
        "source_grid_layers": on_grid,
        "method": cfg.method,
        "gptq_layers": len(tables),
        "per_layer": per_layer,
    }
    if on_grid and cfg.symmetric:
        metrics["note"] = (f"{on_grid} layer(s) sit on a 16-level grid per block of {cfg.block_size} (e.g. GGUF "
                           "Q4_1): symmetric = false keeps their codes and scales")  # fmt: skip
    return lm, metrics
