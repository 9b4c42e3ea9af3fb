"""Low-rank error compensation after a compressing stage: ``lowrank.eora`` and ``lowrank.svd``.

For every compressed Linear (weight differs from the original), ΔW = W_original − W_compressed
(out × in). EoRA projects ΔW into the eigenspace of the layer's input activations:
  C = mean x xᵀ (float64) = Q Λ Qᵀ, λ clamped;  Q' = Q Λ^½;  SVD(ΔW Q') = U Σ Vᵀ, keep r;
  B = U_r Σ_r^½ (out × r),  A = Σ_r^½ V_rᵀ Λ^-½ Qᵀ (r × in)
so BA minimises ‖(ΔW − BA) X‖_F. ``lowrank.svd`` is the baseline: SVD of ΔW itself (no activations).
The layer becomes ``W_c x + B(A x)``. Layers are processed in module order; each layer's activations
come from the model whose earlier layers are already compressed and compensated.

Exact block offsets (``exact_offsets``, on by default): when ΔW of an int4 layer is a constant per quantization
block (out × in/block values), no calibration is needed and no rank is lost: A is the block indicator
(in/block × in, ones over each block) and B the offsets, so BA = ΔW exactly (rank in/block, whatever ``rank`` says).
That is what a source already on a 16-level grid per block leaves, e.g. a GGUF Q4_1 model (w = d·q + m per block of
32, llama.cpp's grid) put on MatMulNBits' asymmetric grid: the codes q and scales d are kept, and only the float
offset m, which MatMulNBits' integer zero point cannot hold (w = d·(q − z)), is left: ΔW = m + d·z per block. The
compensation then restores the source weights exactly (SmolLM2-135M: README, Language models).

``offset_share`` < 1 (causal LMs) keeps the exact offsets only on that share of the distinct inputs (layers reading
one tensor, e.g. Q/K/V, form one): each offset costs decode time in the deployed graph (a block-mean node and a
Concat per input, ``export.genai_graph``) and they do not all carry the same weight. Each input group is scored on
the calibration text with only that group's offsets rounded (every other one exact), by ``offset_score``: ``loss``,
the next-token loss increase, or ``kl``, the next-token KL divergence to the all-exact model; the groups that cost
least stay on the integer zero point, uncompensated. The two disagree on smollm2 (README, Language models): half the
groups dropped by loss keep STS-B perplexity (+1.5%, ``lm-int4-eora-genai-fast``) but move the model on other text
(KL to the float model 0.18 against 0.04 with every offset); dropped by KL, 0.09 there but +8.2% perplexity. Stands
beside per-layer sensitivity scans (HAWQ's, quant.mixed's context term) measured directly on the output.
"""

from __future__ import annotations

import contextlib
import functools
from dataclasses import dataclass

import numpy as np

from compress.core.models import default_layers, forward_only, linear_layers
from compress.stages.base import StageError, TorchContext
from compress.stages.structure import decoder_blocks


@dataclass(frozen=True)
class LowRank:
    rank: int = 32  # fixed rank, or the cap when explained > 0
    explained: float = 0.0  # > 0: per layer, the smallest rank reaching this share of the (weighted) error
    layers: tuple[str, ...] = ()  # fnmatch over nn.Linear names; empty: every Linear / a decoder's *layers.*
    calibration_samples: int = 64
    eig_floor: float = 1e-6  # eigenvalues below floor * largest are clamped to it
    exact_offsets: bool = True  # an int4 residual that is constant per block: exact factors, no calibration
    offset_share: float = 1.0  # causal LMs: share of input groups keeping exact offsets (by measured cost); 1: all
    # what ranks the groups: loss (calibration next-token loss increase) | kl (next-token KL to the all-exact model)
    offset_score: str = "loss"

    def __post_init__(self) -> None:
        if self.rank < 1:
            raise StageError(f"lowrank: rank={self.rank} must be >= 1")
        if not 0.0 <= self.explained < 1.0:
            raise StageError(f"lowrank: explained={self.explained} must be in [0, 1)")
        if self.calibration_samples < 1 or not 0 < self.eig_floor < 1:
            raise StageError("lowrank: calibration_samples must be >= 1 and eig_floor in (0, 1)")
        if not 0.0 <= self.offset_share <= 1.0:
            raise StageError(f"lowrank: offset_share={self.offset_share} must be in [0, 1]")
        if self.offset_score not in ("loss", "kl"):
            raise StageError(f"lowrank: offset_score='{self.offset_score}' must be loss or kl")


@functools.cache
def _lowrank_module():
    import torch

    class LowRankLinear(torch.nn.Module):
        """y = base(x) + lowrank_B(lowrank_A(x)); exports as the base MatMul plus two thin MatMuls."""

        def __init__(self, base: torch.nn.Linear, a: torch.Tensor, b: torch.Tensor):
            super().__init__()
            self.base = base
            self.lowrank_A = torch.nn.Linear(a.shape[1], a.shape[0], bias=False)
            self.lowrank_B = torch.nn.Linear(b.shape[1], b.shape[0], bias=False)
            with torch.no_grad():
                self.lowrank_A.weight.copy_(a)
                self.lowrank_B.weight.copy_(b)

        @property
        def weight(self):
            return self.base.weight

        def forward(self, x):
            return self.base(x) + self.lowrank_B(self.lowrank_A(x))

    return LowRankLinear


def _choose_rank(sigma: np.ndarray, cfg: LowRank) -> int:
    if cfg.explained <= 0:
        return min(cfg.rank, len(sigma))
    energy = np.cumsum(sigma**2) / max(float((sigma**2).sum()), 1e-30)
    return int(min(cfg.rank, np.searchsorted(energy, cfg.explained) + 1))


def factors(dw: np.ndarray, cov: np.ndarray | None, cfg: LowRank) -> tuple[np.ndarray, np.ndarray, dict]:
    """A (r × in), B (out × r) and error figures for one layer. cov None: plain SVD of ΔW."""
    d_in = dw.shape[1]
    if cov is None:
        q_sqrt, q_inv, clamped = np.eye(d_in), np.eye(d_in), 0
        weighted = dw
    else:
        lam, q = np.linalg.eigh(cov)  # ascending, float64
        floor = cfg.eig_floor * max(float(lam.max()), 1e-30)
        clamped = int((lam < floor).sum())
        lam = np.maximum(lam, floor)
        q_sqrt = q * np.sqrt(lam)  # Q Λ^½
        q_inv = (q / np.sqrt(lam)).T  # Λ^-½ Qᵀ  (the inverse of Q')
        weighted = dw @ q_sqrt
    u, s, vt = np.linalg.svd(weighted, full_matrices=False)
    r = _choose_rank(s, cfg)
    root = np.sqrt(s[:r])
    b = u[:, :r] * root  # (out, r)
    a = (root[:, None] * vt[:r]) @ q_inv  # (r, in)
    return a, b, {"rank": r, "clamped_eigenvalues": clamped}


def block_offsets(dw: np.ndarray, block: int, tol: float = 1e-4) -> np.ndarray | None:
    """ΔW (out × in) -> its per-block offsets (out × in/block) when it is constant over every block of ``block``
    input weights (deviation <= tol x its largest value), else None."""
    out, d_in = dw.shape
    if d_in % block or not np.abs(dw).max() > 0:
        return None
    blocks = dw.reshape(out, d_in // block, block)
    mean = blocks.mean(-1)
    return mean if np.abs(blocks - mean[..., None]).max() <= tol * np.abs(dw).max() else None


def offset_factors(offsets: np.ndarray, block: int) -> tuple[np.ndarray, np.ndarray]:
    """A (in/block × in: ones over each block) and B (= the offsets, out × in/block) with BA = the block offsets."""
    n_blocks = offsets.shape[1]
    a = np.repeat(np.eye(n_blocks), block, axis=1)
    return a, offsets


def _forward_with_hooks(lm, names: list[str], texts: list[str], fn) -> None:
    """Run the calibration text through the model with ``fn(name, x)`` hooked on each named module's input."""
    import torch

    modules = dict(lm.model.named_modules())

    def hook(name):
        def on_forward(_module, inputs, _output) -> None:  # returning None keeps the module's output
            fn(name, inputs[0])

        return on_forward

    hooks = [modules[n].register_forward_hook(hook(n)) for n in names]
    try:
        with torch.no_grad():
            forward_only(lm, texts, batch_size=16)
    finally:
        for h in hooks:
            h.remove()


def _input_groups(lm, names: list[str], texts: list[str]) -> list[list[str]]:
    """Layers that read the same input tensor (e.g. Q, K, V) form a group: one calibration pass serves them all."""
    key: dict[str, int] = {}
    held: list = []  # every input stays alive through the pass: a freed one's address can be reused by the next

    def record(name: str, x) -> None:
        if name not in key:
            held.append(x)
            key[name] = x.data_ptr()

    _forward_with_hooks(lm, names, texts[:1], record)
    groups: list[list[str]] = []
    for n in names:
        if groups and key[groups[-1][0]] == key[n]:
            groups[-1].append(n)
        else:
            groups.append([n])
    return groups


def input_covariances(lm, names: list[str], texts: list[str]) -> dict[str, np.ndarray]:
    """E[x xᵀ] of each named Linear's input over all calibration tokens (float64), in one forward pass."""
    import torch

    def run():
        with torch.no_grad():
            forward_only(lm, texts, batch_size=16)

    return _collect(lm, names, run)


class _Stop(Exception):
    """Raised from a hook to end a forward pass early (only the first block's inputs were wanted)."""


def _block_index(prefix: str, name: str) -> int | None:
    """The decoder block a module belongs to (``model.layers.3.mlp.up_proj`` -> 3 under ``model.layers.``)."""
    if not prefix or not name.startswith(prefix):
        return None
    head = name[len(prefix) :].split(".")[0]
    return int(head) if head.isdigit() else None


class BlockStream:
    """A decoder's calibration activations block by block (what GPTQ-style layer-wise calibration does): the inputs
    of block 0 are captured once, and each later block's inputs come from running the blocks before it, in their
    current (compressed and compensated) state, on the cached inputs. A group of Linears inside block i then costs
    one pass of block i instead of a forward of the whole model."""

    def __init__(self, lm, texts: list[str], prefix: str, blocks, batch_size: int = 8):
        import torch

        self.prefix, self.blocks, self.index = prefix, blocks, 0
        self.inputs: list[tuple[tuple, dict]] = []

        def capture(_module, args, kwargs):
            self.inputs.append((args, kwargs))
            raise _Stop

        hook = blocks[0].register_forward_pre_hook(capture, with_kwargs=True)
        try:
            with torch.no_grad():
                for i in range(0, len(texts), batch_size):
                    enc = lm.tokenizer(texts[i : i + batch_size], padding=True, truncation=True,
                                       max_length=lm.max_length, return_tensors="pt")  # fmt: skip
                    try:
                        lm.model(**enc, use_cache=False)
                    except _Stop:
                        pass
        finally:
            hook.remove()

    def block_of(self, name: str) -> int | None:
        return _block_index(self.prefix, name)

    def _run(self, i: int) -> list:
        outs = []
        for args, kwargs in self.inputs:
            out = self.blocks[i](*args, **kwargs)
            outs.append(out[0] if isinstance(out, tuple) else out)
        return outs

    def covariances(self, lm, names: list[str]) -> dict[str, np.ndarray]:
        """E[x xᵀ] of the named Linears' inputs, all inside one block, from that block's cached inputs."""
        import torch

        i = self.block_of(names[0])
        with torch.no_grad():
            while self.index < i:  # the blocks before i are final now: move the cached inputs through them
                for k, hidden in enumerate(self._run(self.index)):
                    args, kwargs = self.inputs[k]
                    self.inputs[k] = (
                        ((hidden, *args[1:]), kwargs) if args else (args, {**kwargs, "hidden_states": hidden})
                    )
                self.index += 1
            return _collect(lm, names, lambda: self._run(i))


def _collect(lm, names: list[str], run) -> dict[str, np.ndarray]:
    """E[x xᵀ] (float64) of each named module's input over every token ``run()`` feeds it."""
    modules = dict(lm.model.named_modules())
    sums: dict[str, np.ndarray] = {}
    counts: dict[str, int] = {}

    def hook(name):
        def on_forward(_module, inputs, _output) -> None:
            x = inputs[0].detach().reshape(-1, inputs[0].shape[-1]).double()
            sums[name] = sums.get(name, 0) + (x.T @ x).numpy()
            counts[name] = counts.get(name, 0) + x.shape[0]

        return on_forward

    hooks = [modules[n].register_forward_hook(hook(n)) for n in names]
    try:
        run()
    finally:
        for h in hooks:
            h.remove()
    return {name: sums[name] / counts[name] for name in names}


def _weighted_norm(m: np.ndarray, cov: np.ndarray) -> float:
    """‖M X‖_F / sqrt(n) = sqrt(tr(M C Mᵀ))."""
    return float(np.sqrt(max(np.einsum("ij,jk,ik->", m, cov, m), 0.0)))


def compensate(cfg: LowRank, lm, ctx: TorchContext, whiten: bool):

    stage = "lowrank.eora" if whiten else "lowrank.svd"
    patterns = default_layers(lm, cfg.layers, ("*",))
    originals = {n: m.weight.detach().double().numpy() for n, m in linear_layers(ctx.original, patterns).items()}
    current = linear_layers(lm, patterns)
    targets = [
        n
        for n, m in current.items()
        if n in originals and not np.array_equal(originals[n], m.weight.detach().double().numpy())
    ]
    if not targets:
        raise StageError(
            f"{stage}: no compressed Linear layer to compensate: put it after a compressing stage "
            "(quant.int4, prune.nm, ...)"
        )
    texts = list(ctx.calibration[: cfg.calibration_samples])
    per_layer = []
    exact = []
    with_offsets: dict[str, tuple[np.ndarray, np.ndarray, int]] = {}  # name -> (ΔW, its block offsets, block)
    if cfg.exact_offsets:
        for name in targets:
            fmt = lm.int4_layers.get(name)
            if fmt is None:
                continue
            dw = originals[name] - current[name].weight.detach().double().numpy()
            offsets = block_offsets(dw, fmt.block_size)
            if offsets is not None:
                with_offsets[name] = (dw, offsets, fmt.block_size)
    groups_report: list[dict] = []
    if with_offsets and cfg.offset_share < 1:
        if lm.task != "text-generation":
            raise StageError(f"{stage}: offset_share < 1 scores offsets by next-token loss: causal LMs only")
        groups_report = _offsets_that_pay(
            lm, with_offsets, originals, texts, cfg.offset_share, cfg.offset_score, ctx.progress
        )
    rounded = {n for g in groups_report if not g["kept"] for n in g["layers"]}
    for name, (dw, offsets, block) in with_offsets.items():
        if name not in rounded:
            per_layer.append(_offset_layer(lm, name, originals[name], dw, offsets, block))
            exact.append(name)
    calibrated = [n for n in targets if n not in with_offsets]
    found = decoder_blocks(lm) if calibrated else None
    stream = BlockStream(lm, texts, *found) if found is not None else None
    # Module order, earlier layers first; each group's activations come from the already compensated model.
    # SVD does not use the covariance for its factors, only to report the error in the same norm as EoRA.
    for group in _input_groups(lm, calibrated, texts) if calibrated else []:
        if stream is not None and stream.block_of(group[0]) is not None and stream.block_of(group[0]) >= stream.index:
            covs = stream.covariances(lm, group)
        else:
            covs = input_covariances(lm, group, texts)
        for name in group:
            per_layer.append(_compensate_layer(lm, name, covs[name], originals[name], cfg, whiten))
    for name in targets:  # int4 packing follows the weight into its new module
        if name in lm.int4_layers and any(r.get("layer") == name and "rank" in r for r in per_layer):
            lm.int4_layers[f"{name}.base"] = lm.int4_layers.pop(name)
            if name in lm.int4_tables:
                lm.int4_tables[f"{name}.base"] = lm.int4_tables.pop(name)
    done = [r for r in per_layer if "rank" in r and "exact" not in r]
    mean = lambda key: round(float(np.mean([r[key] for r in done])), 5) if done else None
    offsets_report = {
        "offset_groups_kept": sum(g["kept"] for g in groups_report),
        "offset_layers_rounded": len(rounded),
        "offset_groups": groups_report,
    }
    return lm, {
        "layers": len(done) + len(exact),
        "exact_offset_layers": len(exact),
        **(offsets_report if groups_report else {}),
        "skipped": len(per_layer) - len(done) - len(exact),
        "mean_error_before": mean("error_before"),
        "mean_error_after": mean("error_after"),
        "added_params": sum(r.get("added_params", 0) for r in per_layer),
        "error_norm": "activation-weighted relative: ||dW X|| / ||W X||",
        "per_layer": per_layer,
    }


def _scored_batches(lm, texts: list[str], batch_size: int = 8) -> list[tuple[dict, object]]:
    """(tokenized batch, mask of the positions that predict a next token) for ``_fidelity``."""
    batches = []
    for i in range(0, len(texts), batch_size):
        enc = lm.tokenizer(texts[i : i + batch_size], padding=True, truncation=True, max_length=lm.max_length,
                           return_tensors="pt")  # fmt: skip
        mask = enc["attention_mask"].bool()
        batches.append((enc, mask[:, :-1] & mask[:, 1:]))
    return batches


def _fidelity(lm, batches: list, reference: list | None = None) -> tuple[float, float, list]:
    """(mean next-token cross-entropy, mean KL(p_reference || p_model), this pass's final hidden states) over the
    scored positions; the reference's logits are its recorded final hidden states through the current head."""
    import torch

    head = lm.model.get_output_embeddings()
    hidden: list = []
    hook = head.register_forward_hook(lambda _m, inputs, _out: hidden.append(inputs[0]))
    ce = kl = 0.0
    count = 0
    try:
        with torch.inference_mode():
            for b, (enc, mask) in enumerate(batches):
                logp = torch.log_softmax(lm.model(**enc, use_cache=False).logits[:, :-1].float(), -1)[mask]
                ce -= float(logp.gather(-1, enc["input_ids"][:, 1:][mask][:, None]).sum())
                if reference is not None:
                    ref = torch.log_softmax(head(reference[b])[:, :-1].float(), -1)[mask]
                    kl += float((ref.exp() * (ref - logp)).sum())
                count += int(mask.sum())
    finally:
        hook.remove()
    return ce / max(count, 1), kl / max(count, 1), hidden


def _offsets_that_pay(lm, found: dict, originals: dict, texts: list[str], share: float, score: str,
                      progress) -> list[dict]:  # fmt: skip
    """Input groups of the exact-offset layers, each with what rounding only its offsets costs on the calibration
    text: the next-token loss increase and (``score`` = kl) the next-token KL to the model with every offset exact;
    the ``share`` of groups that cost most by ``score`` keep their offsets. The weights end as they came. A group
    inside decoder block i changes nothing before it: blocks 0..i-1 answer from the outputs recorded in the exact
    model's pass (``_recorded``), so scoring it runs blocks i.. and the head only."""
    import torch

    progress = progress or (lambda msg: None)
    names = list(found)
    modules = {n: lm.model.get_submodule(n) for n in names}
    rounded = {n: m.weight.detach().clone() for n, m in modules.items()}
    exact = {n: torch.from_numpy(originals[n]).to(rounded[n].dtype) for n in names}

    def put(weights: dict) -> None:
        with torch.no_grad():
            for n, w in weights.items():
                modules[n].weight.copy_(w)

    groups = _input_groups(lm, names, texts)
    found_blocks = decoder_blocks(lm)
    prefix, blocks = found_blocks if found_blocks is not None else ("", [])

    batches = _scored_batches(lm, texts)
    rows = []
    try:
        put(exact)
        outputs = [[] for _ in blocks]
        with _recorded(blocks, outputs):
            base, _, reference = _fidelity(lm, batches)
        for i, group in enumerate(groups):
            put({n: rounded[n] for n in group})
            with _replayed(blocks[: min(_block_index(prefix, n) or 0 for n in group)], outputs):
                loss, kl, _ = _fidelity(lm, batches, reference if score == "kl" else None)
            rows.append({"layers": group, "loss_increase": round(loss - base, 6)})
            if score == "kl":
                rows[-1]["kl"] = round(kl, 6)
            put({n: exact[n] for n in group})
            if (i + 1) % max(len(groups) // 5, 1) == 0 or i + 1 == len(groups):
                progress(f"  offsets: scored {i + 1}/{len(groups)} input groups (only theirs rounded)")
    finally:
        put(rounded)
    keep = round(share * len(rows))
    key = "kl" if score == "kl" else "loss_increase"
    ranked = sorted(range(len(rows)), key=lambda i: rows[i][key], reverse=True)
    for rank, i in enumerate(ranked):
        rows[i]["kept"] = rank < keep
    return rows


@contextlib.contextmanager
def _recorded(blocks, outputs: list[list]):
    """Each block's output of every call, in call order, appended to ``outputs[block index]``."""
    hooks = [b.register_forward_hook(lambda _m, _a, out, j=j: outputs[j].append(out)) for j, b in enumerate(blocks)]
    try:
        yield
    finally:
        for h in hooks:
            h.remove()


@contextlib.contextmanager
def _replayed(blocks, outputs: list[list]):
    """The given blocks return their recorded outputs in call order instead of computing (the same batches, the same
    order as when they were recorded)."""
    for j, b in enumerate(blocks):
        b.forward = lambda *_a, _calls=iter(outputs[j]), **_k: next(_calls)
    try:
        yield
    finally:
        for b in blocks:
            del b.forward


def _replace(lm, name: str, a: np.ndarray, b: np.ndarray) -> None:
    import torch

    mod = lm.model.get_submodule(name)
    parent, _, child = name.rpartition(".")
    new = _lowrank_module()(mod, torch.from_numpy(a).float(), torch.from_numpy(b).float())
    setattr(lm.model.get_submodule(parent) if parent else lm.model, child, new)


def _offset_layer(lm, name: str, original: np.ndarray, dw: np.ndarray, offsets: np.ndarray, block: int) -> dict:
    a, b = offset_factors(offsets, block)
    _replace(lm, name, a, b)
    scale = max(float(np.linalg.norm(original)), 1e-30)
    return {
        "layer": name,
        "rank": a.shape[0],
        "exact": "block offsets",
        "error_before": round(float(np.linalg.norm(dw)) / scale, 5),
        "error_after": round(float(np.linalg.norm(dw - b @ a)) / scale, 7),
        "added_params": int(a.size + b.size),
    }


def _compensate_layer(lm, name: str, cov: np.ndarray, original: np.ndarray, cfg: LowRank, whiten: bool) -> dict:
    mod = lm.model.get_submodule(name)
    if not np.isfinite(cov).all() or np.abs(cov).max() == 0:
        return {"layer": name, "skipped": "degenerate calibration covariance (no signal): left uncompensated"}
    dw = original - mod.weight.detach().double().numpy()
    a, b, info = factors(dw, cov if whiten else None, cfg)
    scale = max(_weighted_norm(original, cov), 1e-30)
    before, after = _weighted_norm(dw, cov) / scale, _weighted_norm(dw - b @ a, cov) / scale
    _replace(lm, name, a, b)
    return {
        "layer": name,
        **info,
        "error_before": round(before, 5),
        "error_after": round(after, 5),
        "added_params": int(a.size + b.size),
    }


def apply_eora(cfg: LowRank, lm, ctx: TorchContext):
    return compensate(cfg, lm, ctx, whiten=True)


def apply_svd(cfg: LowRank, lm, ctx: TorchContext):
    return compensate(cfg, lm, ctx, whiten=False)
