"""``prune.gradual``: gradual magnitude pruning on the cubic schedule, recovered by distillation.

Zhu & Gupta: s_t = s_f + (s_i − s_f)(1 − (t − t0)/(n Δt))³ for t0 ≤ t ≤ t0 + nΔt, updated every Δt
steps, per-layer thresholds, then recovery steps at the final sparsity. The masks live in
``torch.nn.utils.prune`` (weight = weight_orig * mask), so masked weights get no gradient and Adam or
weight decay cannot revive them. Recovery without labels: distil the original model's outputs
(cosine on the sentence embedding / mean-pooled state, MSE on logits) on unlabelled text.

Granularities:
- ``unstructured``: individual weights of every matched Linear. No speed-up in ORT's CPU kernels.
- ``channel``: whole FFN neurons (row i of intermediate.dense and column i of output.dense), scored by
  ||W1[i,:]|| * ||W2[:,i]||, physically removed before export: smaller and faster everywhere.
- ``head``: whole attention heads (Q/K/V rows and the output columns of a head), scored by the norms of
  those slices, removed with transformers' own ``prune_heads`` before export.

Causal LMs with gated FFNs and grouped-query attention (Llama-style ``model.layers.N.mlp.{gate,up,down}_proj`` and
``self_attn.{q,k,v,o}_proj``): a channel is neuron i of gate and up (rows) and of down (column) together, scored
by (||gate[i]|| + ||up[i]||) * ||down[:, i]||; a head unit is a whole key/value group (one K/V head and the query
heads that read it: q rows, k/v rows, o columns), so the grouping survives. Recovery distils the next-token
distributions (``compress.stages.distil``).
"""

from __future__ import annotations

from dataclasses import dataclass

from compress.core.models import default_layers, linear_layers
from compress.stages.base import StageError, TorchContext
from compress.stages.distil import distil_train
from compress.stages.layers import taylor_scores
from compress.stages.structure import decoder_blocks, transformer

GRANULARITIES = ("unstructured", "channel", "head")
IMPORTANCE = ("magnitude", "taylor")


@dataclass(frozen=True)
class GradualPrune:
    final_sparsity: float = 0.5
    initial_sparsity: float = 0.0
    granularity: str = "unstructured"  # unstructured | channel | head
    begin_step: int = 0
    end_step: int = 300  # last pruning update; steps after it recover at s_f
    frequency: int = 25  # Δt: steps between mask updates
    total_steps: int = 400
    learning_rate: float = 5e-5
    batch_size: int = 16
    layers: tuple[str, ...] = ()  # fnmatch over nn.Linear names (unstructured only); empty: *encoder* / *layers.*
    importance: str = "magnitude"  # magnitude | taylor (channel / head: first-order, LLM-Pruner's group score)
    samples: int = 128  # calibration sentences (or --train pairs) for the Taylor scores
    seed: int = 0

    def __post_init__(self) -> None:
        if not 0.0 < self.final_sparsity < 1.0:
            raise StageError(f"prune.gradual: final_sparsity={self.final_sparsity} must be in (0, 1)")
        if not 0.0 <= self.initial_sparsity <= self.final_sparsity:
            raise StageError(f"prune.gradual: initial_sparsity={self.initial_sparsity} must be in [0, final_sparsity]")
        if self.granularity not in GRANULARITIES:
            raise StageError(
                f"prune.gradual: granularity='{self.granularity}' is not one of {', '.join(GRANULARITIES)}"
            )
        if not 0 <= self.begin_step <= self.end_step <= self.total_steps or self.frequency < 1:
            raise StageError("prune.gradual: need 0 <= begin_step <= end_step <= total_steps and frequency >= 1")
        if self.learning_rate <= 0 or self.batch_size < 1:
            raise StageError("prune.gradual: learning_rate must be > 0 and batch_size >= 1")
        if self.importance not in IMPORTANCE or (self.importance == "taylor" and self.granularity == "unstructured"):
            raise StageError(
                f"prune.gradual: importance='{self.importance}' must be magnitude, or taylor for "
                "channel / head granularity"
            )


def cubic_sparsity(step: int, cfg: GradualPrune) -> float:
    """Sparsity target at an optimizer step (held at s_i before begin_step, s_f after end_step)."""
    if step >= cfg.end_step:  # also one-shot pruning: begin_step = end_step = total_steps = 0
        return cfg.final_sparsity
    if step < cfg.begin_step:
        return cfg.initial_sparsity
    span = max(cfg.end_step - cfg.begin_step, 1)
    done = min((step - cfg.begin_step) / span, 1.0)
    return cfg.final_sparsity + (cfg.initial_sparsity - cfg.final_sparsity) * (1.0 - done) ** 3


# ---- groups: what one mask entry covers --------------------------------------------------------------


def _encoder(lm):
    return transformer(lm)


def _taylor_units(lm, ctx: TorchContext, cfg: GradualPrune) -> list:
    """Per layer, the first-order Taylor importance of each FFN neuron / head (LLM-Pruner's vector-wise group
    score): |sum over the unit's coupled weights and biases of w * dL/dw|, summed over calibration batches."""
    layers = list(_encoder(lm).encoder.layer)

    def units() -> list:
        out = []
        for layer in layers:
            if cfg.granularity == "channel":
                w1, w2 = layer.intermediate.dense, layer.output.dense
                g = (w1.weight * w1.weight.grad).sum(1) + w1.bias * w1.bias.grad + (w2.weight * w2.weight.grad).sum(0)
            else:
                att = layer.attention
                heads, size = att.self.num_attention_heads, att.self.attention_head_size
                g = sum((lin.weight * lin.weight.grad).reshape(heads, size, -1).sum((1, 2))
                        + (lin.bias * lin.bias.grad).reshape(heads, size).sum(1)
                        for lin in (att.self.query, att.self.key, att.self.value))  # fmt: skip
                o = att.output.dense
                g = g + (o.weight * o.weight.grad).reshape(-1, heads, size).sum((0, 2))
            out.append(g.detach().abs())
        return out

    return taylor_scores(lm, ctx, list(ctx.calibration[: cfg.samples]), cfg.batch_size, units)


def _norm_rows(*mods):
    return sum(m.weight.detach().norm(dim=1) for m in mods)


def _decoder_groups(blocks, cfg: GradualPrune) -> list:
    """Channel / head groups of Llama-style decoder blocks (gated FFN, grouped-query attention)."""
    groups = []
    for i, layer in enumerate(blocks):
        if cfg.granularity == "channel":
            mlp = getattr(layer, "mlp", None)
            if not all(hasattr(mlp, k) for k in ("gate_proj", "up_proj", "down_proj")):
                raise StageError("prune.gradual: channel pruning of decoders takes gated FFNs (mlp.gate/up/down_proj)")
            g, u, d = mlp.gate_proj, mlp.up_proj, mlp.down_proj
            score = lambda g=g, u=u, d=d: _norm_rows(g, u) * d.weight.detach().norm(dim=0)
            groups.append((f"layer.{i}.ffn", score, [(g, "rows"), (u, "rows"), (d, "cols")]))
            continue
        att = layer.self_attn
        hd, kv = att.head_dim, att.k_proj.out_features // att.head_dim
        rep = att.q_proj.out_features // (kv * hd)

        def score(att=att, hd=hd, kv=kv, rep=rep):
            q = att.q_proj.weight.detach().reshape(kv, rep * hd, -1).flatten(1).norm(dim=1)
            k, v = (m.weight.detach().reshape(kv, hd, -1).flatten(1).norm(dim=1) for m in (att.k_proj, att.v_proj))
            o = att.o_proj.weight.detach().reshape(-1, kv, rep * hd).transpose(0, 1).flatten(1).norm(dim=1)
            return (q + k + v) * o

        groups.append((f"layer.{i}.kv_groups", score, [(att.q_proj, ("rows", rep * hd)), (att.k_proj, ("rows", hd)),
                                                        (att.v_proj, ("rows", hd)), (att.o_proj, ("cols", rep * hd))]))  # fmt: skip
    return groups


def _groups(lm, cfg: GradualPrune, ctx: TorchContext):
    """(name, unit-score function, [(module, how the unit mask expands onto its weight)]) per layer."""

    if cfg.granularity == "unstructured":
        patterns = default_layers(lm, cfg.layers)
        layers = linear_layers(lm, patterns)
        if not layers:
            raise StageError(f"prune.gradual: no nn.Linear matches {list(patterns)}")
        return [(name, lambda m=mod: m.weight.detach().abs(), [(mod, None)]) for name, mod in layers.items()]
    found = decoder_blocks(lm)
    if found is not None:
        if cfg.importance != "magnitude":
            raise StageError("prune.gradual: decoders are pruned by magnitude importance: set importance = 'magnitude'")
        return _decoder_groups(found[1], cfg)
    groups = []
    taylor = _taylor_units(lm, ctx, cfg) if cfg.importance == "taylor" else None
    for i, layer in enumerate(_encoder(lm).encoder.layer):
        if taylor is not None:  # fixed first-order scores, computed once on the unpruned model
            score = lambda t=taylor[i]: t
        if cfg.granularity == "channel":
            w1, w2 = layer.intermediate.dense, layer.output.dense
            if taylor is None:
                score = lambda w1=w1, w2=w2: w1.weight.detach().norm(dim=1) * w2.weight.detach().norm(dim=0)
            groups.append((f"layer.{i}.ffn", score, [(w1, "rows"), (w2, "cols")]))
        else:
            att = layer.attention
            heads, size = att.self.num_attention_heads, att.self.attention_head_size

            def magnitude(att=att, heads=heads, size=size):
                rows = [
                    getattr(att.self, k).weight.detach().reshape(heads, size, -1) for k in ("query", "key", "value")
                ]
                cols = att.output.dense.weight.detach().reshape(-1, heads, size).transpose(0, 1)
                return sum(r.flatten(1).norm(dim=1) for r in rows) * cols.flatten(1).norm(dim=1)

            if taylor is None:
                score = magnitude

            groups.append(
                (
                    f"layer.{i}.heads",
                    score,
                    [
                        (att.self.query, ("rows", size)),
                        (att.self.key, ("rows", size)),
                        (att.self.value, ("rows", size)),
                        (att.output.dense, ("cols", size)),
                    ],
                )
            )
    return groups


def _expand(keep, how, weight):
    """A unit-level keep vector -> a weight-shaped mask (rows or columns, optionally per head)."""
    if how is None:
        return keep
    kind, size = (how, 1) if isinstance(how, str) else how
    unit = keep.repeat_interleave(size)
    return unit[:, None].expand_as(weight) if kind == "rows" else unit[None, :].expand_as(weight)


def _update_masks(groups, sparsity: float) -> list[dict]:
    """Per-layer threshold: in each group mask the lowest-scoring units until the group reaches ``sparsity``."""
    import torch
    from torch.nn.utils import prune as tprune

    out = []
    for name, score, targets in groups:
        s = score().float()
        k = int(round(sparsity * s.numel()))
        keep = torch.ones_like(s, dtype=torch.bool).flatten()
        if k > 0:
            keep[s.flatten().argsort()[:k]] = False
        keep = keep.reshape(s.shape)
        for mod, how in targets:
            mask = _expand(keep, how, mod.weight).to(mod.weight.dtype)
            if tprune.is_pruned(mod):
                mask = mask * mod.weight_mask  # once pruned, stays pruned
                tprune.remove(mod, "weight")
            tprune.custom_from_mask(mod, "weight", mask)
        out.append({"layer": name, "sparsity": round(1 - float(keep.float().mean()), 4)})
    return out


def _shrunk(mod, keep, axis: str):
    """A new Linear holding only the ``keep`` rows (outputs) or columns (inputs) of ``mod`` (mask removed first)."""
    import torch
    from torch.nn.utils import prune as tprune

    if tprune.is_pruned(mod):
        tprune.remove(mod, "weight")
    rows = axis == "rows"
    new = torch.nn.Linear(mod.in_features if rows else len(keep), len(keep) if rows else mod.out_features,
                          bias=mod.bias is not None)  # fmt: skip
    with torch.no_grad():
        new.weight.copy_(mod.weight[keep] if rows else mod.weight[:, keep])
        if mod.bias is not None:
            new.bias.copy_(mod.bias[keep] if rows else mod.bias)
    return new


def _remove_decoder_units(lm, cfg: GradualPrune, blocks) -> dict:
    """Drop masked FFN neurons (gate/up rows, down columns) or whole key/value groups from decoder blocks."""
    import torch

    removed, sizes = {}, set()
    for i, layer in enumerate(blocks):
        if cfg.granularity == "channel":
            mlp = layer.mlp
            keep = torch.nonzero(mlp.gate_proj.weight_mask[:, 0] > 0).flatten()
            removed[f"layer.{i}.ffn"] = mlp.gate_proj.out_features - len(keep)
            mlp.gate_proj, mlp.up_proj = _shrunk(mlp.gate_proj, keep, "rows"), _shrunk(mlp.up_proj, keep, "rows")
            mlp.down_proj = _shrunk(mlp.down_proj, keep, "cols")
            sizes.add(len(keep))
            continue
        att = layer.self_attn
        hd = att.head_dim
        kv_keep = torch.nonzero(att.k_proj.weight_mask[::hd, 0] > 0).flatten()
        rep = att.q_proj.out_features // att.k_proj.out_features
        kv_rows = (kv_keep[:, None] * hd + torch.arange(hd)).flatten()
        q_rows = (kv_keep[:, None] * rep * hd + torch.arange(rep * hd)).flatten()
        removed[f"layer.{i}.kv_groups"] = att.k_proj.out_features // hd - len(kv_keep)
        att.q_proj, att.o_proj = _shrunk(att.q_proj, q_rows, "rows"), _shrunk(att.o_proj, q_rows, "cols")
        att.k_proj, att.v_proj = _shrunk(att.k_proj, kv_rows, "rows"), _shrunk(att.v_proj, kv_rows, "rows")
        sizes.add(len(kv_keep))
    config = lm.model.config
    if len(sizes) == 1:  # uniform per layer (one threshold per layer): the config can say so
        n = sizes.pop()
        if cfg.granularity == "channel":
            config.intermediate_size = n
        else:
            # num_attention_heads stays: optimum's ORTModelForCausalLM sizes the KV cache as hidden_size //
            # num_attention_heads per head. The blocks' own modules hold head_dim and the query-per-K/V ratio.
            rep = config.num_attention_heads // config.num_key_value_heads
            config.num_key_value_heads = n
            config.attention_heads_kept = n * rep
    return removed


def _physically_remove(lm, cfg: GradualPrune, groups) -> dict:
    """Drop the masked FFN neurons / heads so the exported matrices are smaller."""
    import torch
    from torch.nn.utils import prune as tprune

    found = decoder_blocks(lm)
    if found is not None:
        return _remove_decoder_units(lm, cfg, found[1])
    encoder = _encoder(lm)
    removed = {}
    if cfg.granularity == "channel":
        kept_sizes = []
        for i, layer in enumerate(encoder.encoder.layer):
            w1, w2 = layer.intermediate.dense, layer.output.dense
            keep = torch.nonzero(w1.weight_mask[:, 0] > 0).flatten()
            for mod in (w1, w2):
                tprune.remove(mod, "weight")
            new1 = torch.nn.Linear(w1.in_features, len(keep))
            new2 = torch.nn.Linear(len(keep), w2.out_features)
            with torch.no_grad():
                new1.weight.copy_(w1.weight[keep])
                new1.bias.copy_(w1.bias[keep])
                new2.weight.copy_(w2.weight[:, keep])
                new2.bias.copy_(w2.bias)
            layer.intermediate.dense, layer.output.dense = new1, new2
            kept_sizes.append(len(keep))
            removed[f"layer.{i}.ffn"] = w1.out_features - len(keep)
        if len(set(kept_sizes)) == 1:
            encoder.config.intermediate_size = kept_sizes[0]
    else:
        heads_to_prune = {}
        for i, layer in enumerate(encoder.encoder.layer):
            att = layer.attention
            size = att.self.attention_head_size
            keep_rows = att.self.query.weight_mask[:, 0] > 0
            heads_to_prune[i] = [h for h in range(att.self.num_attention_heads) if not keep_rows[h * size]]
            for mod in (att.self.query, att.self.key, att.self.value, att.output.dense):
                tprune.remove(mod, "weight")
            removed[f"layer.{i}.heads"] = len(heads_to_prune[i])
        encoder.prune_heads({i: h for i, h in heads_to_prune.items() if h})  # transformers does the surgery
    return removed


def apply_gradual(cfg: GradualPrune, lm, ctx: TorchContext):
    from torch.nn.utils import prune as tprune

    groups = _groups(lm, cfg, ctx)
    updates = set(range(cfg.begin_step, cfg.end_step + 1, cfg.frequency)) | {cfg.end_step}
    state = {"sparsity": 0.0, "per_layer": []}

    def before_step(step: int) -> dict:
        if step in updates:  # mask update every Δt steps
            state["sparsity"] = cubic_sparsity(step, cfg)
            state["per_layer"] = _update_masks(groups, state["sparsity"])
        return {"sparsity": round(state["sparsity"], 4)}

    training = distil_train(lm, ctx, cfg, "prune.gradual", cfg.total_steps, before_step)
    removed = _physically_remove(lm, cfg, groups) if cfg.granularity != "unstructured" else {}
    if cfg.granularity == "unstructured":
        for _, _, targets in groups:
            for mod, _ in targets:
                tprune.remove(mod, "weight")
    speedup = (
        "none on ORT CPU (no sparse kernels): a size win only, after compression (zip / sparse storage)"
        if cfg.granularity == "unstructured"
        else "yes on every runtime: the matrices are physically smaller"
    )
    return lm, {
        "granularity": cfg.granularity,
        "final_sparsity": cfg.final_sparsity,
        "per_layer": state["per_layer"],
        "removed_units": removed,
        "expected_speedup": speedup,
        **training,
    }
