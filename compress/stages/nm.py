"""``prune.nm``: N:M semi-structured sparsity, one shot or trained with progressive gradient flow.

Groups of M consecutive weights along each Linear's input dimension keep their N largest |w|.
Methods (formulas: ``../shared/notes/algorithms.md``, Bambhaniya et al., "Progressive Gradient Flow"):

- ``oneshot``: magnitude mask of the original weights; then ``steps`` recovery steps with that mask
  fixed (0: none, the no-training baseline).
- ``mdgf`` (mask decay): during the decay phase the forward uses ``W_eff = W * (m + a_t (1 - m))``
  with ``a_t = max(0, 1 - k t)`` (linear) or ``exp(-k t)`` (exponential), t = steps since the decay
  phase began, k rescaled to its length (1/T linear, 5/T exponential) unless ``decay_rate`` is set.
- ``sdgf`` (structure decay): the decay phase walks a sequence of binary patterns in equal frames,
  stepwise (M-1):M -> M/2:M -> ... -> N:M or geometric 8N:8M -> 4N:4M -> 2N:2M -> N:M (a layer whose
  width a coarse frame does not divide uses N:M in that frame).
- ``srste``: binary mask, gradient ``dL/dW_eff + lambda (1 - m) W`` (SR-STE, lambda = 2e-4).

Phases, as fractions of ``steps``: dense (``dense_fraction``; a fraction, not a percentage: the reference
script's offset bug made its dense phase ~0), decay, fine-tune (``finetune_fraction``). During decay the
mask is recomputed from the dense weights every step, so pruned weights can come back; the gradient is
straight-through (dL/dW = dL/dW_eff) unless ``masked_gradient`` (then dL/dW = dL/dW_eff * (m + a_t(1-m)),
the exact derivative). The fine-tune phase freezes the mask of the dense weights at its start, zeroes the
pruned weights and keeps them zero after every optimizer step, so what it trains is what ships.
Recovery is distillation from the original model (compress/stages/distil.py, shared with prune.gradual).
The masked forward is a ``torch.nn.utils.parametrize`` parametrization of each Linear's weight.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from compress.core.models import default_layers, linear_layers
from compress.stages.base import StageError, TorchContext
from compress.stages.distil import distil_train

METHODS = ("oneshot", "mdgf", "sdgf", "srste")
DECAYS = ("linear", "exponential")
SCHEDULES = ("stepwise", "geometric")


@dataclass(frozen=True)
class NMPrune:
    n: int = 2
    m: int = 4
    method: str = "oneshot"  # oneshot | mdgf | sdgf | srste
    steps: int = 0  # optimizer steps; oneshot: recovery steps after the cut (0: none)
    dense_fraction: float = 0.1  # share of steps trained dense first (mdgf / sdgf / srste)
    finetune_fraction: float = 0.2  # share of steps at the end with a fixed binary mask
    decay: str = "exponential"  # mdgf: linear | exponential
    decay_rate: float = 0.0  # mdgf k; 0: rescaled to the decay phase (1/T linear, 5/T exponential)
    schedule: str = "stepwise"  # sdgf: stepwise | geometric
    srste_lambda: float = 2e-4  # srste: weight of the (1 - m) * W gradient term
    masked_gradient: bool = False  # exact gradient through the mask instead of straight-through
    learning_rate: float = 5e-5
    batch_size: int = 16
    layers: tuple[str, ...] = ()  # fnmatch patterns over nn.Linear module names; empty: *encoder* / decoder *layers.*
    seed: int = 0

    def __post_init__(self) -> None:
        if self.m < 2 or not 1 <= self.n < self.m:
            raise StageError(f"prune.nm: need 1 <= n < m and m >= 2, got n={self.n}, m={self.m}")
        for key, value, valid in (
            ("method", self.method, METHODS),
            ("decay", self.decay, DECAYS),
            ("schedule", self.schedule, SCHEDULES),
        ):
            if value not in valid:
                raise StageError(f"prune.nm: {key} '{value}' is not available; valid: {', '.join(valid)}")
        if (
            not (0.0 <= self.dense_fraction <= 1.0 and 0.0 <= self.finetune_fraction <= 1.0)
            or self.dense_fraction + self.finetune_fraction > 1.0
        ):
            raise StageError(
                f"prune.nm: dense_fraction={self.dense_fraction} and finetune_fraction="
                f"{self.finetune_fraction} must each be in [0, 1] and sum to <= 1"
            )
        if self.steps < 0 or (self.method != "oneshot" and self.steps < 1):
            raise StageError(f"prune.nm: method '{self.method}' trains: set steps >= 1 (e.g. 400), got {self.steps}")
        if self.decay_rate < 0 or self.srste_lambda < 0 or self.learning_rate <= 0 or self.batch_size < 1:
            raise StageError("prune.nm: decay_rate and srste_lambda must be >= 0, learning_rate > 0, batch_size >= 1")


def nm_mask(w, n: int, m: int):
    """Boolean keep-mask of w (out, in): in every group of m along the input dim, the n largest |w|."""
    import torch

    out_f, in_f = w.shape
    groups = w.abs().reshape(out_f, in_f // m, m)
    keep = torch.zeros_like(groups, dtype=torch.bool)
    keep.scatter_(-1, groups.topk(n, dim=-1).indices, True)
    return keep.reshape(out_f, in_f)


def satisfies_nm(w, n: int, m: int) -> bool:
    out_f, in_f = w.shape
    return bool(((w.reshape(out_f, in_f // m, m) != 0).sum(-1) <= n).all())


# ---- schedules -----------------------------------------------------------------------------------------


def phases(cfg: NMPrune) -> tuple[int, int, int]:
    """(dense, decay, fine-tune) step counts; oneshot is all fine-tune."""
    if cfg.method == "oneshot":
        return 0, 0, cfg.steps
    finetune = round(cfg.finetune_fraction * cfg.steps)
    dense = min(round(cfg.dense_fraction * cfg.steps), cfg.steps - finetune)  # fraction x steps, not / 100
    return dense, cfg.steps - dense - finetune, finetune


def decay_factor(t: int, decay_steps: int, decay: str, rate: float = 0.0) -> float:
    """MDGF a_t, t = steps since the decay phase began; k rescaled to the phase length when rate is 0."""
    if decay == "linear":
        return max(0.0, 1.0 - (rate or 1.0 / max(decay_steps, 1)) * t)
    return math.exp(-(rate or 5.0 / max(decay_steps, 1)) * t)


def sdgf_frames(n: int, m: int, schedule: str) -> list[tuple[int, int]]:
    """SDGF patterns of the decay phase, in order, ending at n:m (the dense phase comes before them)."""
    if schedule == "geometric":
        return [(8 * n, 8 * m), (4 * n, 4 * m), (2 * n, 2 * m), (n, m)]
    keep, k = [m - 1], m // 2
    while k > n:
        keep.append(k)
        k //= 2
    keep.append(n)
    return [(k, m) for k in dict.fromkeys(x for x in keep if x >= n)]


def sdgf_frame(t: int, decay_steps: int, frames: list[tuple[int, int]]) -> tuple[int, int]:
    return frames[min(t * len(frames) // max(decay_steps, 1), len(frames) - 1)]


# ---- the masked forward --------------------------------------------------------------------------------


def attach(mod, state: dict):
    """Parametrize ``mod.weight`` as W_eff = W * state['factor'] (None: dense), straight-through unless
    state['exact']; add SR-STE's ``state['lam'] * (1 - state['mask']) * W`` to the dense weight's gradient.
    Returns the gradient-hook handle (remove it, and the parametrization, when training ends)."""
    import torch
    from torch.nn.utils import parametrize

    class NMWeight(torch.nn.Module):
        def forward(self, w):
            f = state["factor"]
            if f is None:
                return w
            if state["exact"]:
                return w * f
            return w + (w * f - w).detach()  # value W*f, gradient dL/dW_eff (straight-through)

    parametrize.register_parametrization(mod, "weight", NMWeight())
    w = mod.parametrizations.weight.original
    return w.register_hook(lambda g: g + state["lam"] * (~state["mask"]) * w.detach() if state["lam"] else g)


def _train(cfg: NMPrune, lm, ctx: TorchContext, layers: dict) -> dict:
    import torch
    from torch.nn.utils import parametrize

    dense_steps, decay_steps, finetune_steps = phases(cfg)
    frames = sdgf_frames(cfg.n, cfg.m, cfg.schedule)
    states = {name: {"factor": None, "exact": False, "mask": None, "lam": 0.0} for name in layers}
    hooks = [attach(mod, states[name]) for name, mod in layers.items()]

    def dense(mod):
        return mod.parametrizations.weight.original

    def before_step(step: int) -> dict:
        status = {"phase": "dense", "sparsity": 0.0}
        if step < dense_steps:
            return status
        with torch.no_grad():
            if step >= dense_steps + decay_steps:  # fine-tune: fixed binary mask
                if step == dense_steps + decay_steps:
                    for name, mod in layers.items():
                        st, w = states[name], dense(mod)
                        st["mask"] = nm_mask(w, cfg.n, cfg.m)
                        w.mul_(st["mask"])
                        st.update(factor=st["mask"].to(w.dtype), exact=True, lam=0.0)  # masked gradient
                return {"phase": "finetune", "sparsity": round(1 - cfg.n / cfg.m, 4)}
            t = step - dense_steps  # steps since decay began
            a_t = decay_factor(t, decay_steps, cfg.decay, cfg.decay_rate) if cfg.method == "mdgf" else 0.0
            pattern = sdgf_frame(t, decay_steps, frames) if cfg.method == "sdgf" else (cfg.n, cfg.m)
            for name, mod in layers.items():
                st, w = states[name], dense(mod)
                n, m = pattern if w.shape[1] % pattern[1] == 0 else (cfg.n, cfg.m)
                st["mask"] = nm_mask(w, n, m)  # from the dense weights, every step
                keep = st["mask"].to(w.dtype)
                st.update(
                    factor=keep + a_t * (1 - keep),
                    exact=cfg.masked_gradient,
                    lam=cfg.srste_lambda if cfg.method == "srste" else 0.0,
                )
        status = {"phase": "decay", "sparsity": round(1 - pattern[0] / pattern[1], 4)}
        if cfg.method == "mdgf":
            status["a_t"] = round(a_t, 4)
        if cfg.method == "sdgf":
            status["pattern"] = f"{pattern[0]}:{pattern[1]}"
        return status

    def after_step(step: int) -> None:
        if step >= dense_steps + decay_steps:  # keep pruned weights at zero
            with torch.no_grad():
                for name, mod in layers.items():
                    dense(mod).mul_(states[name]["mask"])

    try:
        training = distil_train(lm, ctx, cfg, "prune.nm", cfg.steps, before_step, after_step)
    finally:
        for hook in hooks:
            hook.remove()
        for mod in layers.values():
            parametrize.remove_parametrizations(mod, "weight", leave_parametrized=False)  # back to the dense W
    return {**training, "phases": {"dense": dense_steps, "decay": decay_steps, "finetune": finetune_steps}}


def apply_nm(cfg: NMPrune, lm, ctx: TorchContext):
    import torch

    patterns = default_layers(lm, cfg.layers)
    matched = linear_layers(lm, patterns)
    if not matched:
        raise StageError(f"prune.nm: no nn.Linear matches {list(patterns)}: set layers to patterns of module names")
    layers = {name: mod for name, mod in matched.items() if mod.in_features % cfg.m == 0}
    oneshot = {name: nm_mask(mod.weight.detach(), cfg.n, cfg.m) for name, mod in layers.items()}
    if cfg.method == "oneshot":
        with torch.no_grad():
            for name, mod in layers.items():
                mod.weight.mul_(oneshot[name])
    training = _train(cfg, lm, ctx, layers) if cfg.steps else {}
    per_layer = []
    with torch.no_grad():
        for name, mod in matched.items():
            if name not in layers:
                per_layer.append(
                    {"layer": name, "skipped": f"in_features {mod.in_features} not divisible by m={cfg.m}"}
                )
                continue
            mask = nm_mask(mod.weight, cfg.n, cfg.m)  # the final cut (a no-op after a fine-tune phase)
            mod.weight.mul_(mask)
            per_layer.append(
                {
                    "layer": name,
                    "sparsity": round(float((mod.weight == 0).float().mean()), 4),
                    "pattern": f"{cfg.n}:{cfg.m}",
                    "pattern_ok": satisfies_nm(mod.weight, cfg.n, cfg.m),
                    "mask_changed_vs_oneshot": round(float((mask != oneshot[name]).float().mean()), 4),
                }
            )
    done = [r for r in per_layer if "pattern_ok" in r]
    return lm, {
        "method": cfg.method,
        "layers": len(done),
        "all_patterns_ok": all(r["pattern_ok"] for r in done),
        "expected_speedup": "none on ORT CPU (no sparse kernels): size win only after compression; "
        "2:4 is accelerated by TensorRT sparse weights on NVIDIA Ampere+",
        "per_layer": per_layer,
        **training,
    }
