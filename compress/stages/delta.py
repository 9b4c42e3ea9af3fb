"""``prune.delta``: delta-parameter pruning of a fine-tuned model against its base.

Methods: DARE, DAREx-q, magnitude, importance.

Δ = θ_ft − θ_base per floating-point tensor (state_dict names; integer buffers such as position ids are skipped).
Every tensor of a module whose name matches ``layers`` (fnmatch over module names) keeps part of its delta:
  dare        each entry kept with probability 1 − p (seeded mask), survivors × 1/(1 − p)  -> E[kept Δ] = Δ
  darex-q     the same mask, survivors × 1/q with q in [1 − p, 1]; q = 0: q is searched (``q_search``)
  magnitude   the round((1 − p) n) largest |Δ| of the tensor's n changed entries (Δ != 0), no rescale
  importance  the same on |Δ_ij| · ||x_j|| (input-activation norms on calibration text) for Linear weights,
              on |Δ| for every other tensor
So p is the fraction of the changed entries dropped, for every method alike (DARE in expectation); zero
entries of Δ are never stored. Tensors outside ``layers`` keep their whole delta. The model becomes
θ_base + kept Δ, and only the kept entries (flat indices + values) go to ``delta.safetensors``
(compress.stages.delta_io): base + that file rebuilds this model bit for bit (``compress apply-delta``).

Encoders and causal LMs (model kind ``causal-lm``: Llama / SmolLM2, GPT-2, ...), the base loaded as the same kind of
model. A causal LM's q search matches its last hidden state at every calibration token (``unlabelled``), or picks
the lowest perplexity on ``eval_file`` (``grid``). Tied weights (an LM head tied to the embedding table) are one
tensor here, under the embedding's name: its delta is pruned and added once.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from compress.core.errors import CompressError
from compress.core.evaluate import EMBEDDING_TASKS, accuracy, stsb_spearman
from compress.core.lm_eval import CHUNKS, perplexity, sentences_of, token_chunks
from compress.core.models import (
    causal_logits,
    forward_only,
    lm_hidden_states,
    load_model,
    matches,
    module_of,
    torch_outputs,
)
from compress.stages.base import StageError, TorchContext
from compress.stages.delta_io import Kept, apply_kept, delta_tensors, fingerprint, first_mismatch, save_delta
from compress.stages.distil import training

METHODS = ("dare", "darex-q", "magnitude", "importance")
Q_SEARCHES = ("unlabelled", "grid")
DELTA_DTYPES = ("fp32", "fp16")
DELTA_FILE = "delta.safetensors"
LM_TASK = "text-generation"  # the task of a causal LM (model kind causal-lm)
LOSSES = {
    "unlabelled": "mean |h(pruned) - h(fine-tuned)| on calibration text",
    "grid": "-(STS-B Spearman x100 or accuracy %) on eval_file",
}
LM_LOSSES = {
    "unlabelled": "mean |h(pruned) - h(fine-tuned)| of the last hidden state (the LM head's input) at every "
    "calibration token",
    "grid": f"token perplexity on eval_file (min(samples, {CHUNKS}) chunks)",
}
LM_LAYERS_HINT = "e.g. '*layers*' (Llama / SmolLM2 decoder blocks) or '*h.*' (GPT-2)"
SMALL_DELTA = 0.005  # DARE's working assumption (supervised fine-tuning): mean |Δ| below about this


@dataclass(frozen=True)
class DeltaPrune:
    method: str = "dare"  # dare | darex-q | magnitude | importance
    p: float = 0.9  # drop rate, in [0, 1)
    q: float = 0.0  # darex-q: survivors × 1/q, q in [1 - p, 1] (1 - p is DARE); 0: search it
    q_search: str = "unlabelled"  # unlabelled: match the fine-tuned outputs | grid: best score on eval_file
    # q_search = "grid": STS-B file (embeddings), text<TAB>label TSV (classifiers), any text file (causal LMs: the
    # lowest perplexity wins)
    eval_file: str = ""
    base: str = ""  # the base model; "" -> --base of compress run
    seed: int = 0
    # fnmatch patterns over module names; the other tensors keep their whole delta. "*": every floating-point tensor,
    # a causal LM's decoder Linears, norms and embedding table (with the LM head tied to it: one tensor) included
    layers: tuple[str, ...] = ("*",)
    delta_dtype: str = "fp32"  # values in delta.safetensors: fp32 | fp16
    # calibration texts for the q search and the importance norms (a causal LM's: contexts of up to 256 tokens)
    samples: int = 50

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise StageError(f"prune.delta: method='{self.method}' is not one of {', '.join(METHODS)}")
        if not 0.0 <= self.p < 1.0:
            raise StageError(f"prune.delta: p={self.p} must be in [0, 1) (the fraction of delta entries dropped)")
        if self.q != 0.0:
            if self.method != "darex-q":
                raise StageError("prune.delta: q is used by method='darex-q' only; remove q or set method='darex-q'")
            if not (1.0 - self.p) - 1e-12 <= self.q <= 1.0:
                raise StageError(
                    f"prune.delta: q={self.q} must be 0 (search it) or in [1 - p, 1] = [{1.0 - self.p:.6g}, 1]"
                )
        if self.q_search not in Q_SEARCHES:
            raise StageError(f"prune.delta: q_search='{self.q_search}' is not one of {', '.join(Q_SEARCHES)}")
        if self.method == "darex-q" and self.q == 0.0 and self.q_search == "grid" and not self.eval_file:
            raise StageError(
                "prune.delta: q_search='grid' scores q on eval_file: set eval_file to an STS-B "
                "file (embedding models), a text<TAB>label TSV (classifiers) or a text file (causal LMs: "
                "perplexity), or use q_search='unlabelled'"
            )
        if self.eval_file and not Path(self.eval_file).is_file():
            raise StageError(f"prune.delta: eval_file {self.eval_file} not found: pass an existing file")
        if self.delta_dtype not in DELTA_DTYPES:
            raise StageError(f"prune.delta: delta_dtype='{self.delta_dtype}' is not one of {', '.join(DELTA_DTYPES)}")
        if self.samples < 1 or not self.layers:
            raise StageError("prune.delta: samples must be >= 1 and layers must hold at least one pattern")


# ---- choosing the kept entries of one tensor ------------------------------------------------------------


def keep_count(n: int, p: float) -> int:
    """How many of n changed entries a top-k method keeps: round((1 - p) n), at least one (none of none)."""
    return min(n, max(1, round((1.0 - p) * n))) if n else 0


def tensor_seed(seed: int, name: str) -> int:
    """A per-tensor seed, so one tensor's mask does not depend on which other tensors are pruned."""
    return (seed * 1_000_003 + zlib.crc32(name.encode())) % (2**63 - 1)


def dare_keep(shape, p: float, seed: int):
    """Flat indices kept by DARE: each entry independently with probability 1 - p (torch.Generator, seeded)."""
    import torch

    g = torch.Generator().manual_seed(seed)
    return (torch.rand(shape, generator=g) >= p).reshape(-1).nonzero().squeeze(1)


def top_keep(score, changed: int, p: float):
    """Flat indices of the keep_count(changed, p) largest scores, ascending (changed: entries with Δ != 0)."""
    return score.reshape(-1).topk(keep_count(changed, p)).indices.sort().values


@dataclass
class DeltaPlan:
    """Which entries survive (fixed), and the Δ there; the rescale q is applied when values are asked for."""

    shapes: dict[str, tuple[int, ...]]
    idx: dict[str, object]  # name -> flat kept positions, int64 (k,)
    delta: dict[str, object]  # name -> Δ at those positions, float32 (k,)
    rescaled: set[str]  # names whose values are divided by q (DARE / DAREx-q)

    def kept(self, q: float, dtype) -> Kept:
        import torch

        out: Kept = {}
        for name, idx in self.idx.items():
            vals = self.delta[name] / q if name in self.rescaled else self.delta[name]
            vals = vals.to(dtype)
            if not torch.isfinite(vals).all():
                raise StageError(f"prune.delta: kept values of {name} overflow {dtype}: use delta_dtype='fp32'")
            index_dtype = torch.int32 if idx.numel() == 0 or int(idx.max()) < 2**31 else torch.int64
            out[name] = (idx.to(index_dtype), vals, self.shapes[name])
        return out


def plan(cfg: DeltaPrune, deltas: dict, selected: set[str], norms: dict) -> DeltaPlan:
    """Kept positions per tensor; zero Δ entries are never stored (they would add nothing)."""
    idx, kept_delta = {}, {}
    for name, d in deltas.items():
        flat = d.reshape(-1)
        if name not in selected:
            keep = flat.nonzero().squeeze(1)
        elif cfg.method in ("dare", "darex-q"):
            keep = dare_keep(d.shape, cfg.p, tensor_seed(cfg.seed, name))
        elif name in norms:  # importance on a Linear / Conv1D weight: norms broadcast over its input axis
            keep = top_keep(d.abs() * norms[name], int(flat.count_nonzero()), cfg.p)
        else:  # magnitude, or importance without activations
            keep = top_keep(d.abs(), int(flat.count_nonzero()), cfg.p)
        keep = keep[flat[keep] != 0]
        if keep.numel():
            idx[name], kept_delta[name] = keep, flat[keep].clone()
    rescaled = selected if cfg.method in ("dare", "darex-q") else set()
    return DeltaPlan({n: tuple(d.shape) for n, d in deltas.items()}, idx, kept_delta, set(rescaled))


# ---- q search (DAREx-q) ------------------------------------------------------------------------------------


def search_q(
    loss: Callable[[float], float], lo: float, hi: float = 1.0, coarse: int = 10, patience: int = 4, max_tries: int = 30
) -> tuple[float, list[tuple[float, float]]]:
    """Minimise loss(q) over q in (lo, hi]: a coarse grid of ``coarse`` points, then a finer search around the
    best (try best ± step, move to any improvement, halve the step when neither side improves); stops after
    ``patience`` tries in a row that do not improve, or ``max_tries`` in all. Returns (q, [(q, loss), ...])."""
    tries: list[tuple[float, float]] = []

    def f(q: float) -> float:
        tries.append((q, float(loss(q))))
        return tries[-1][1]

    if hi - lo <= 1e-12:
        return hi, [(hi, float(loss(hi)))]
    step = (hi - lo) / coarse
    for k in range(1, coarse + 1):
        f(hi if k == coarse else lo + step * k)
    best_q, best = min(tries, key=lambda t: t[1])
    misses = 0
    while misses < patience and len(tries) < max_tries and step > 1e-6:
        step /= 2
        for q in (best_q - step, best_q + step):
            if not lo < q <= hi or misses >= patience or len(tries) >= max_tries:
                continue
            value = f(q)
            if value < best:
                best_q, best, misses = q, value, 0
                step *= 2  # moved: keep the step for the next round
                break
            misses += 1
    return best_q, tries


def pick_q(tries: list[tuple[float, float]], dare_q: float, dare_loss: float) -> float:
    """The best searched q, or DARE's own q = 1 - p when no searched q scores better than it on the same loss
    (search_q samples the open interval (1 - p, 1] and can miss an optimum at its edge)."""
    q, best = min(tries, key=lambda t: t[1])
    return dare_q if dare_loss < best else q


@training
def _input_norms(lm, weight_names: set[str], texts: list[str]) -> dict:
    """||x_j|| over every calibration token at the input of each Linear (or GPT-2 Conv1D) whose weight is named,
    shaped to broadcast over the weight: name -> (1, in) for a Linear's (out, in), (in, 1) for a Conv1D's (in, out)."""
    import torch
    from transformers.pytorch_utils import Conv1D

    linears = {
        f"{n}.weight": m
        for n, m in lm.model.named_modules()
        if isinstance(m, torch.nn.Linear | Conv1D) and f"{n}.weight" in weight_names
    }
    sums: dict = {}

    def hook(name):
        def on_forward(_module, inputs, _output) -> None:
            x = inputs[0].detach().float()
            sums[name] = sums.get(name, 0) + x.reshape(-1, x.shape[-1]).pow(2).sum(0)  # (in,)

        return on_forward

    handles = [m.register_forward_hook(hook(n)) for n, m in linears.items()]
    try:
        forward_only(lm, texts, batch_size=4) if lm.task == LM_TASK else torch_outputs(lm, texts)
    finally:
        for h in handles:
            h.remove()
    return {n: s.sqrt()[:, None] if isinstance(linears[n], Conv1D) else s.sqrt()[None, :] for n, s in sums.items()}


def _outputs(lm, texts: list[str]):
    """What the unlabelled q search matches. An encoder: its own output (torch_outputs: the embedding, the pooled
    state or the logits). A causal LM: its last hidden state (after the final norm, i.e. the LM head's input) at
    every real calibration token, (tokens, hidden). Chosen over next-token log-probabilities because the fine-tuned
    reference stays small (hidden, not vocabulary, wide: 576 vs 49152 floats per token for SmolLM2) while every
    position counts, and the logits are the LM head applied to it. An LM head tied to the embeddings (SmolLM2, GPT-2)
    is pruned as the embedding table, whose delta this loss sees; an untied LM head's own delta it does not see."""
    return lm_hidden_states(lm, texts) if lm.task == LM_TASK else torch_outputs(lm, texts)


def _q_loss(
    cfg: DeltaPrune, lm, texts: list[str], reference, set_q: Callable[[float], None]
) -> Callable[[float], float]:
    """What the q search minimises: mean |h(pruned) − h(fine-tuned)| (unlabelled; h: ``_outputs``), or on eval_file
    (grid) −score for an encoder and the token perplexity for a causal LM (lm_eval's chunks of its context length)."""
    import numpy as np

    encode = lambda t: torch_outputs(lm, t)
    score = stsb_spearman if lm.task in EMBEDDING_TASKS else accuracy
    chunks = None
    if cfg.q_search == "grid" and lm.task == LM_TASK:
        chunks = token_chunks(lm.tokenizer, sentences_of(Path(cfg.eval_file)), min(cfg.samples, CHUNKS), lm.max_length)

    def loss(q: float) -> float:
        set_q(q)
        if cfg.q_search == "unlabelled":
            return float(np.abs(_outputs(lm, texts) - reference).mean())
        if chunks is not None:
            return perplexity(causal_logits(lm), chunks)["ppl"]
        return -score(encode, Path(cfg.eval_file))

    return loss


@training  # a loop of forward passes: one torch thread on a loaded host (spin-waiting threads cost 4-10x)
def _search(cfg: DeltaPrune, lm, texts: list[str], set_q: Callable[[float], None]):
    """DAREx-q's q on the fixed mask: (q, tries, loss of plain DARE's q = 1 - p on the same mask)."""
    reference = _outputs(lm, texts) if cfg.q_search == "unlabelled" else None  # the fine-tuned model's
    loss = _q_loss(cfg, lm, texts, reference, set_q)
    q, tries = search_q(loss, lo=1.0 - cfg.p)
    dare_loss = loss(1.0 - cfg.p)  # plain DARE on the same mask, for comparison
    return pick_q(tries, 1.0 - cfg.p, dare_loss), tries, dare_loss


# ---- the stage -----------------------------------------------------------------------------------------------


def apply_delta_prune(cfg: DeltaPrune, lm, ctx: TorchContext):
    import torch

    base_name = cfg.base or ctx.base_model
    if not base_name:
        raise StageError("prune.delta needs the base model: pass --base MODEL or set base in the recipe")
    try:
        base_lm = load_model(base_name, lm.task)
    except CompressError as e:
        raise StageError(f"prune.delta: the base model could not be loaded: {e}") from None
    ft = delta_tensors(lm.model)
    base = delta_tensors(base_lm.model)
    mismatch = first_mismatch({n: tuple(t.shape) for n, t in ft.items()}, base, "the base", "the fine-tuned model")
    if mismatch:
        raise StageError(f"base and fine-tuned models differ: {mismatch}; pass the base this model was fine-tuned from")
    selected = {n for n in ft if matches(module_of(n), cfg.layers)}
    if not selected:
        hint = LM_LAYERS_HINT if lm.task == LM_TASK else "e.g. '*encoder*'"
        raise StageError(
            f"prune.delta: no floating-point parameter matches layers={list(cfg.layers)}: "
            f"use fnmatch patterns over module names, {hint}"
        )

    texts = list(ctx.calibration[: cfg.samples])
    deltas = {n: ft[n].detach().float() - base[n].detach().float() for n in ft}
    norms = _input_norms(lm, selected, texts) if cfg.method == "importance" else {}
    search = cfg.method == "darex-q" and cfg.q == 0.0
    kept_plan = plan(cfg, deltas, selected, norms)
    dtype = torch.float16 if cfg.delta_dtype == "fp16" else torch.float32

    rescale = cfg.method in ("dare", "darex-q")
    q = 1.0 - cfg.p if cfg.method == "dare" else cfg.q if cfg.method == "darex-q" else 1.0
    tries: list[tuple[float, float]] = []
    dare_loss = None
    if search:
        q, tries, dare_loss = _search(cfg, lm, texts, lambda value: apply_kept(ft, base, kept_plan.kept(value, dtype)))
    kept = kept_plan.kept(q, dtype)
    apply_kept(ft, base, kept)

    metadata = {
        "method": cfg.method,
        "p": cfg.p,
        "q": q if rescale else None,
        "seed": cfg.seed,
        "base": base_name,
        "task": lm.task,
        "model_type": getattr(lm.config, "model_type", ""),
        "delta_dtype": cfg.delta_dtype,
        "layers": list(cfg.layers),
        "shapes": {n: list(t.shape) for n, t in ft.items()},
        "base_sha256": fingerprint(base),
    }
    stored = sum(i.nbytes + v.nbytes for i, v, _ in kept.values())
    delta_file = None
    if ctx.artifact_dir is not None:
        stored = save_delta(Path(ctx.artifact_dir) / DELTA_FILE, kept, metadata)
        delta_file = DELTA_FILE
    losses = LM_LOSSES if lm.task == LM_TASK else LOSSES
    return lm, _metrics(
        cfg, deltas, selected, kept, q if rescale else None, tries, dare_loss, stored, delta_file, base_name, losses
    )


def _metrics(
    cfg: DeltaPrune,
    deltas: dict,
    selected: set[str],
    kept: Kept,
    q,
    tries,
    dare_loss,
    stored: int,
    delta_file,
    base_name: str,
    losses: dict[str, str],
) -> dict:
    n_all = sum(d.numel() for d in deltas.values())
    n_sel = sum(deltas[n].numel() for n in selected)
    kept_sel = sum(len(kept[n][0]) for n in selected if n in kept)
    mean_abs = float(sum(float(d.abs().sum()) for d in deltas.values()) / max(n_all, 1))
    fp32_bytes = 4 * n_all
    per_layer = [
        {
            "param": n,
            "kept_fraction": round(len(kept[n][0]) / d.numel(), 5) if n in kept else 0.0,
            "mean_abs_delta": float(f"{float(d.abs().mean()):.3g}"),
        }
        for n, d in deltas.items()
        if n in selected
    ]
    return {
        "base": base_name,
        "method": cfg.method,
        "p": cfg.p,
        "q": q,
        "seed": cfg.seed,
        "q_search": (
            {
                "mode": cfg.q_search,
                "loss": losses[cfg.q_search],
                "tries": len(tries),
                "best_loss": float(f"{min(b for _, b in tries):.5g}"),
                "dare_loss": float(f"{dare_loss:.5g}"),
                "grid": [[round(a, 5), float(f"{b:.5g}")] for a, b in tries],
            }
            if tries
            else None
        ),
        "tensors_pruned": len(selected),
        "tensors_kept_whole": len(deltas) - len(selected),
        "kept_fraction": round(kept_sel / max(n_sel, 1), 5),
        "changed_fraction": round(sum(int((d != 0).sum()) for d in deltas.values()) / max(n_all, 1), 5),
        "mean_abs_delta": float(f"{mean_abs:.4g}"),
        "max_abs_delta": float(f"{max(float(d.abs().max()) for d in deltas.values() if d.numel()):.4g}"),
        "small_delta": (
            f"holds: mean |delta| {mean_abs:.2g} <= {SMALL_DELTA}"
            if mean_abs <= SMALL_DELTA
            else f"does not hold: mean |delta| {mean_abs:.2g} > {SMALL_DELTA}; random DARE drops degrade "
            "such deltas, prefer method='magnitude' or 'importance', or a lower p"
        ),
        "delta_file": delta_file,
        "delta_bytes": stored,
        "model_fp32_bytes": fp32_bytes,
        "delta_size_pct": round(100 * stored / max(fp32_bytes, 1), 3),
        "per_layer": per_layer,
    }
