"""``prune.nm``: N:M semi-structured sparsity by magnitude, one shot (no retraining).

Groups of M consecutive weights along each Linear's input dimension keep their N largest |w|.
The training methods of the pruning issue (progressive gradient flow, SR-STE) are not built yet;
``method`` names what was applied so reports stay unambiguous when they arrive.
"""
from __future__ import annotations

from dataclasses import dataclass

from compress.stages.base import StageError, TorchContext


@dataclass(frozen=True)
class NMPrune:
    n: int = 2
    m: int = 4
    method: str = "oneshot"                     # oneshot: magnitude, no recovery training
    layers: tuple[str, ...] = ("*encoder*",)   # fnmatch patterns over nn.Linear module names

    def __post_init__(self) -> None:
        if self.m < 2 or not 1 <= self.n < self.m:
            raise StageError(f"prune.nm: need 1 <= n < m and m >= 2, got n={self.n}, m={self.m}")
        if self.method != "oneshot":
            raise StageError(f"prune.nm: method '{self.method}' is not available; valid: oneshot")


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


def apply_nm(cfg: NMPrune, lm, ctx: TorchContext):
    import torch

    from compress.models import linear_layers

    layers = linear_layers(lm, cfg.layers)
    if not layers:
        raise StageError(f"prune.nm: no nn.Linear matches {list(cfg.layers)}: set layers to patterns of module names")
    per_layer = []
    with torch.no_grad():
        for name, mod in layers.items():
            if mod.in_features % cfg.m:
                per_layer.append({"layer": name, "skipped": f"in_features {mod.in_features} not divisible by m={cfg.m}"})
                continue
            mod.weight.mul_(nm_mask(mod.weight, cfg.n, cfg.m))
            per_layer.append({"layer": name, "sparsity": round(float((mod.weight == 0).float().mean()), 4),
                              "pattern": f"{cfg.n}:{cfg.m}", "pattern_ok": satisfies_nm(mod.weight, cfg.n, cfg.m)})
    done = [r for r in per_layer if "pattern_ok" in r]
    return lm, {"layers": len(done), "all_patterns_ok": all(r["pattern_ok"] for r in done),
                "expected_speedup": "none on ORT CPU (no sparse kernels): size win only after compression; "
                                    "2:4 is accelerated by TensorRT sparse weights on NVIDIA Ampere+",
                "per_layer": per_layer}
