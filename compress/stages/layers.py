"""``prune.layers``: depth pruning, whole transformer blocks removed by measured importance.

Importance of block l, on the calibration text (never the evaluation data):
- ``block_influence`` (ShortGPT, Men et al. 2024): BI_l = 1 - cos(h_l, h_{l+1}) averaged over real tokens, where
  h_l is the block's input and h_{l+1} its output; a block that barely turns the residual stream goes first.
- ``taylor`` (first-order, LLM-Pruner's block group): |sum over the block's parameters of w * dL/dw| (element-wise
  |w * g| summed), L the distillation loss against the original's outputs, or the task loss (CoSENT) on labelled
  pairs when --train gives them.
``blocks`` overrides both with explicit indices (what a search's winner writes into its recipe).

The kept blocks stay in order; the model's config says how many remain, so the export is an ordinary, shallower
model. ``kept_blocks`` on the loaded model records which original blocks survive, for the recovery's
intermediate-layer distillation (``recover``). No training here: a recipe follows with ``recover``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from compress.stages.base import StageError, TorchContext
from compress.stages.distil import cosent, distil_loss, student_outputs, training
from compress.stages.structure import blocks, keep_blocks, transformer

IMPORTANCE = ("block_influence", "taylor")


@dataclass(frozen=True)
class LayerPrune:
    keep: int = 4  # blocks kept (ignored when `blocks` names them)
    importance: str = "block_influence"  # block_influence | taylor
    blocks: tuple[str, ...] = ()  # explicit block indices to keep, e.g. ["0", "4", "5"]
    samples: int = 128  # calibration sentences (or labelled pairs, for taylor with --train) for the importance
    batch_size: int = 32

    def __post_init__(self) -> None:
        if self.importance not in IMPORTANCE:
            raise StageError(f"prune.layers: importance='{self.importance}' is not one of {', '.join(IMPORTANCE)}")
        if not self.blocks and self.keep < 1:
            raise StageError(f"prune.layers: keep={self.keep} must be >= 1 (or name the blocks to keep)")
        if any(not b.isdigit() for b in self.blocks) or len(set(self.blocks)) != len(self.blocks):
            raise StageError(
                f"prune.layers: blocks={list(self.blocks)} must be distinct block indices, e.g. ['0', '5']"
            )
        if self.samples < 1 or self.batch_size < 1:
            raise StageError("prune.layers: samples and batch_size must be >= 1")


def _batches(lm, texts: list[str], size: int):
    for i in range(0, len(texts), size):
        yield lm.tokenizer(texts[i : i + size], padding=True, truncation=True, max_length=lm.max_length,
                           return_tensors="pt")  # fmt: skip


def block_influence(lm, texts: list[str], batch_size: int) -> np.ndarray:
    """BI per block: 1 - cos(input, output) over the tokens the attention mask keeps. The block's input and output
    are read by forward hooks (the same tensors as BERT's hidden_states; in a decoder, before the final norm)."""
    import torch

    model = transformer(lm)
    seen: list = []

    def hook(module, args, kwargs, output):
        x = args[0] if args else kwargs["hidden_states"]
        seen.append((x, output[0] if isinstance(output, tuple) else output))

    handles = [b.register_forward_hook(hook, with_kwargs=True) for b in blocks(lm)]
    n = len(handles)
    total, tokens = np.zeros(n), 0
    try:
        with torch.inference_mode():
            for enc in _batches(lm, texts, batch_size):
                seen.clear()
                model(**enc, **({"use_cache": False} if lm.task == "text-generation" else {}))
                keep = enc["attention_mask"].bool()
                for i, (x, y) in enumerate(seen):
                    total[i] += float((1 - torch.nn.functional.cosine_similarity(x, y, dim=-1))[keep].sum())
                tokens += int(keep.sum())
    finally:
        for h in handles:
            h.remove()
    return total / max(tokens, 1)


@training
def taylor_scores(lm, ctx: TorchContext, texts: list[str], batch_size: int, reduce: Callable[[], list]) -> list:
    """First-order Taylor importance, summed over batches: after each backward pass ``reduce()`` turns the
    parameters' w * dL/dw into one value (or tensor of unit values) per group, already made absolute. L: CoSENT on
    labelled pairs when the context has them (the task the user cares about), else the distillation loss against
    the original's outputs on ``texts``."""
    import torch

    total: list = []

    def add(values: list) -> None:
        nonlocal total
        total = values if not total else [t + v for t, v in zip(total, values)]

    lm.model.train()
    try:
        if ctx.labelled is not None:
            pairs = ctx.labelled
            idx = np.random.default_rng(0).permutation(len(pairs.scores))[: len(texts)]
            for i in range(0, len(idx), batch_size):
                part = idx[i : i + batch_size]
                enc = lm.tokenizer([pairs.first[j] for j in part] + [pairs.second[j] for j in part], padding=True,
                                   truncation=True, max_length=lm.max_length, return_tensors="pt")  # fmt: skip
                e = student_outputs(lm, enc)
                loss = cosent(e[: len(part)], e[len(part) :], torch.tensor([pairs.scores[j] for j in part]))
                lm.model.zero_grad()
                loss.backward()
                add(reduce())
        else:
            if ctx.original is None:
                raise StageError("taylor importance needs the original model or labelled pairs (--train)")
            for enc in _batches(lm, texts, batch_size):
                with torch.no_grad():
                    ref = student_outputs(ctx.original, enc)
                lm.model.zero_grad()
                distil_loss(student_outputs(lm, enc), ref, lm.task, enc["attention_mask"]).backward()
                add(reduce())
    finally:
        lm.model.zero_grad()
        lm.model.eval()
    return total


def w_times_grad(params) -> float:
    """|sum over parameters of w * dL/dw|: the first-order change of the loss when they are all set to zero."""
    return abs(float(sum((p * p.grad).sum() for p in params if p.grad is not None)))


def apply_layers(cfg: LayerPrune, lm, ctx: TorchContext):
    n = len(blocks(lm))
    texts = list(ctx.calibration[: cfg.samples])
    if cfg.blocks:
        keep = sorted(int(b) for b in cfg.blocks)
        if keep[-1] >= n:
            raise StageError(f"prune.layers: block {keep[-1]} does not exist (the model has {n}: 0..{n - 1})")
        scores, how = None, "explicit"
    else:
        if cfg.keep >= n:
            raise StageError(f"prune.layers: keep={cfg.keep} removes nothing from a model with {n} blocks")
        if cfg.importance == "block_influence":
            scores = block_influence(lm, texts, cfg.batch_size)
        else:
            groups = [list(b.parameters()) for b in blocks(lm)]
            scores = np.array(taylor_scores(lm, ctx, texts, cfg.batch_size, lambda: [w_times_grad(g) for g in groups]))
        keep = sorted(int(i) for i in np.argsort(-scores, kind="stable")[: cfg.keep])
        how = cfg.importance
    params_before = sum(p.numel() for p in lm.model.parameters())
    keep_blocks(lm, keep)
    previous = lm.kept_blocks or tuple(range(n))
    lm = dataclasses.replace(lm, kept_blocks=tuple(previous[i] for i in keep))
    return lm, {
        "importance": how,
        "scores": None if scores is None else [round(float(s), 6) for s in scores],
        "kept": keep,
        "removed": [i for i in range(n) if i not in keep],
        "blocks_before": n,
        "blocks_after": len(keep),
        "parameters_before": params_before,
        "parameters_after": sum(p.numel() for p in lm.model.parameters()),
        "samples": len(texts),
        "expected_speedup": "yes on every runtime: fewer blocks run",
    }
