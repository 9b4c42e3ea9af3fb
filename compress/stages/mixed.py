"""``quant.mixed``: Hessian-guided mixed-precision post-training quantization inside an accuracy budget.

Per Linear layer the stage chooses float, int8 or int4 weight-only so that the *measured* drop of the search
metric (the run's first ``--eval``) stays inside ``[min_drop, max_drop]``, and returns why each layer got its
precision. Steps (method and defaults: ../shared/notes/algorithms.md, HAWQ-V2 + Schaefer et al.):

1. Sensitivity ``omega_l(b) = Tr(H_l) / n_l * ||Q_b(W_l) - W_l||^2`` (HAWQ-V2). ``Tr(H_l)`` by Hutchinson
   (``v`` Rademacher, ``E[v^T H v]``), Hessian-vector products by double backprop of a distillation loss against
   the original model's outputs on the unlabelled calibration text (``1 - cos`` on embeddings, MSE on logits).
   ``Q_b`` is the deployed grid: ORT's symmetric per-channel int8 range (``get_qmin_qmax_for_qType``) and ORT's
   own MatMulNBits kernel for int4 (``compress.stages.int4.ort_int4_roundtrip``).
2. Inter-layer augmentation ("context"): the output change ``1 - cos`` (MSE for logits) of the whole model on the
   calibration text when layer l takes the move *with every other layer already at the precision in force when
   the move applies* (all float for float->int8 moves, all int8 for int8->int4 moves), simulating ORT's numerics
   in torch: weights on the deployed grid plus the activation quantization the kernel adds (per-tensor uint8
   for int8, block-wise int8 for MatMulNBits ``accuracy_level`` 4). This sees what the block-diagonal Hessian
   cannot: activation quantization and the interaction with the other layers' error.
   Augmented score = ``sqrt(omega_hat * context_hat)``, each normalised by its mean over the move class (a
   geometric mean: a move goes early only when both signals call it harmless).
3. Ordering: all float->int8 moves, then all int8->int4 moves, each class sorted by score per byte saved
   (the most compression for the least sensitivity first). Configuration k = the first k moves.
4. Bisection over k on the real ONNX model (built with ORT's tools: ``MatMulNBitsQuantizer`` through
   ``export.int4_pack`` for int4, ``quantize_dynamic`` / ``quantize_static`` through ``compress.stages.quant``
   for int8, float elsewhere), scored by the pipeline's evaluator: accept the first probe whose drop lies in
   ``[min_drop, max_drop]``, else keep the largest k whose drop <= max_drop. ~log2(2L) evaluations.
   ``latency_aware``: time every feasible probe (interleaved, this host) and keep the fastest.

Neither ORT nor Neural Compressor 3.x ships a Hessian-trace sensitivity (INC 2.x's HAWQ-V2 tuning strategy is
gone from 3.x), so steps 1-4 are written here; the quantizers themselves are ORT's.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from compress.core.fs import file_bytes
from compress.core.models import default_layers, linear_layers
from compress.stages.base import OnnxContext, StageError
from compress.stages.distil import distil_loss, student_outputs, training
from compress.stages.grids import check_block_size, int4_table, int4_weight, int8_weight
from compress.stages.int4 import Int4Format, untie
from compress.stages.quant import DynamicQuant, StaticQuant, apply_dynamic, apply_static
from export.int4_pack import layer_nodes, pack_int4
from export.int4_pack import op_weight as onnx_weight
from runtimes.profiler import ProfileConfig, Shape, measure_latency

# names as in profiles/*.toml `precisions`; int8-weights = 8-bit MatMulNBits (block-wise symmetric weights, int8
# activations per block with accuracy_level 4): the int8 of language models (compress.stages.quant)
CANDIDATES = ("int8-dynamic", "int8-qdq", "int8-weights", "int4-weights")
ORDERINGS = ("augmented", "hessian")


@dataclass(frozen=True)
class MixedQuant:
    max_drop: float = 0.5  # budget: drop of the search metric, points (or % of it when relative)
    min_drop: float = 0.0  # a probe whose drop lies in [min_drop, max_drop] ends the search early
    relative: bool = False  # budget in % of the float model's score instead of absolute points
    candidates: tuple[str, ...] = ("int8-dynamic", "int4-weights")  # mild -> aggressive; float is implicit
    ordering: str = "augmented"  # augmented | hessian (plain HAWQ-V2 omega)
    hutchinson_samples: int = 32  # Rademacher vectors for the trace estimate
    calibration_samples: int = 64  # calibration sentences for the traces and the context measurements
    seed: int = 0
    block_size: int = 32  # int4 weights per scale (MatMulNBits)
    accuracy_level: int = 4  # MatMulNBits compute type: 4 = int8 activations (fast on x86), 0 = fp32
    latency_aware: bool = False  # time the feasible probes on this host and keep the fastest
    latency_runs: int = 20
    measure_alone: bool = False  # also evaluate each layer alone at the most aggressive candidate (L more evals)
    layers: tuple[str, ...] = ()  # fnmatch over nn.Linear names; empty: *encoder* / decoder *layers.* (+ LM head)
    embeddings: bool = True  # the word-embedding table joins the search (int8 Gather, GatherBlockQuantized 8 / 4 bits)

    def __post_init__(self) -> None:
        if not 0 <= self.min_drop <= self.max_drop:
            raise StageError(
                f"quant.mixed: need 0 <= min_drop <= max_drop, got min_drop={self.min_drop}, max_drop={self.max_drop}"
            )
        if self.ordering not in ORDERINGS:
            raise StageError(f"quant.mixed: ordering='{self.ordering}' is not one of {', '.join(ORDERINGS)}")
        bad = [c for c in self.candidates if c not in CANDIDATES]
        if bad or not self.candidates:
            raise StageError(f"quant.mixed: candidates {bad or '[]'} invalid; choose from {', '.join(CANDIDATES)}")
        if sum(c.startswith("int8") for c in self.candidates) > 1 or len(set(self.candidates)) != len(self.candidates):
            raise StageError("quant.mixed: list each precision once and one int8 flavour (int8-dynamic or int8-qdq)")
        if self.hutchinson_samples < 1 or self.calibration_samples < 1:
            raise StageError("quant.mixed: hutchinson_samples and calibration_samples must be >= 1")
        check_block_size("quant.mixed", self.block_size)

    @staticmethod
    def parse_override(key: str, text: str) -> dict:
        """The budget from the command line (compress.recipe.apply_overrides): points ("0.3") or a percentage of
        the float score ("0.5%"), which sets ``relative`` too."""
        if key not in ("max_drop", "min_drop"):
            return {}
        value, relative = parse_drop(text, "--" + key.replace("_", "-"))
        return {key: value, "relative": relative}


def parse_drop(text: str, flag: str) -> tuple[float, bool]:
    """ "0.3" -> (0.3, absolute points); "0.5%" -> (0.5, relative to the float score)."""
    raw = text.strip()
    relative = raw.endswith("%")
    try:
        value = float(raw.rstrip("%"))
    except ValueError:
        raise StageError(f"{flag} {text!r} is not a number: pass points (0.3) or a percentage (0.5%)") from None
    if not value >= 0:
        raise StageError(f"{flag} {text!r} must be >= 0: it is the accuracy drop you accept")
    return value, relative


def ladder(cfg: MixedQuant) -> tuple[str, ...]:
    """Precisions from float to the most aggressive candidate, int8 before int4."""
    return ("float",) + tuple(sorted(cfg.candidates, key=lambda c: c.startswith("int4")))


# ---- the deployed grids, simulated in torch --------------------------------------------------------------


def is_embedding(mod) -> bool:
    import torch

    return isinstance(mod, torch.nn.Embedding)


def quantized_weight(mod, precision: str, cfg: MixedQuant):
    w = mod.weight.detach()
    if precision == "float":
        return w
    if precision == "int8-weights":  # 8-bit MatMulNBits / GatherBlockQuantized over uint8 (export.int4_pack)
        return int4_weight(w, cfg.block_size, True, bits=8)
    if is_embedding(mod):
        return int4_table(w, cfg.block_size) if precision.startswith("int4") else int8_weight(w, per_channel=False)
    return int4_weight(w, cfg.block_size) if precision.startswith("int4") else int8_weight(w)


def _fake_quant_input(x, precision: str, cfg: MixedQuant):
    """The activation quantization ORT's kernel adds: per-tensor asymmetric uint8 (DynamicQuantizeLinear /
    calibrated QDQ, approximated by the batch range) or block-wise symmetric int8 (MatMulNBits accuracy_level 4)."""
    import torch

    if precision == "float" or (precision in ("int4-weights", "int8-weights") and cfg.accuracy_level != 4):
        return x
    if precision in ("int8-dynamic", "int8-qdq"):
        lo, hi = torch.clamp(x.min(), max=0), torch.clamp(x.max(), min=0)
        scale = ((hi - lo) / 255).clamp(min=1e-12)
        zp = torch.round(-lo / scale)
        return (torch.clamp(torch.round(x / scale) + zp, 0, 255) - zp) * scale
    k, b = x.shape[-1], cfg.block_size
    if k % b:
        return x
    blocks = x.reshape(*x.shape[:-1], k // b, b)
    scale = (blocks.abs().amax(-1, keepdim=True) / 127).clamp(min=1e-12)
    return (torch.round(blocks / scale) * scale).reshape(x.shape)


class Simulated:
    """Context manager: the torch model with an assignment layer -> precision applied (weights swapped to the
    deployed grid, activation quantization hooked in); restores the float weights on exit."""

    def __init__(self, layers: dict, assignment: dict[str, str], cache: dict, cfg: MixedQuant):
        self.layers, self.assignment, self.cache, self.cfg = layers, assignment, cache, cfg
        self._saved, self._hooks = {}, []

    def __enter__(self):
        import torch

        with torch.no_grad():
            for name, prec in self.assignment.items():
                if prec == "float":
                    continue
                mod = self.layers[name]
                key = (name, prec)  # int8-weights (blocks) and int8-dynamic (per channel / tensor) differ
                if key not in self.cache:
                    self.cache[key] = quantized_weight(mod, prec, self.cfg).clone()
                self._saved[name] = mod.weight.data
                mod.weight.data = self.cache[key]
                if is_embedding(mod):  # a quantized table gathers exact dequantized rows
                    continue
                self._hooks.append(
                    mod.register_forward_pre_hook(
                        lambda m, args, p=prec: (_fake_quant_input(args[0], p, self.cfg),) + tuple(args[1:])
                    )
                )
        return self

    def __exit__(self, *exc):
        for h in self._hooks:
            h.remove()
        for name, data in self._saved.items():
            self.layers[name].weight.data = data
        return False


# ---- sensitivities ---------------------------------------------------------------------------------------


def _batches(lm, texts: list[str], size: int = 16) -> list[dict]:
    return [
        lm.tokenizer(texts[i : i + size], padding=True, truncation=True, max_length=lm.max_length, return_tensors="pt")
        for i in range(0, len(texts), size)
    ]


def _outputs(lm, enc):

    return student_outputs(lm, enc)


def _distance(out, ref, task: str, enc=None):
    """Distillation loss / output change against the original outputs (the same as the pruning recovery)."""

    return distil_loss(out, ref, task, None if enc is None else enc.get("attention_mask"))


@training
def hessian_traces(lm, layers: dict, batches: list[dict], refs: list, samples: int, seed: int) -> dict[str, dict]:
    """Hutchinson estimate of Tr(H_l) for every layer's weight, with its standard error.

    H is the Hessian of the distillation loss (against the original outputs) w.r.t. the weights; one Rademacher
    vector over all layers gives v_l^T H_ll v_l for every block at once (cross terms vanish in expectation).
    Double backprop through the math SDPA kernel (the fused CPU kernels have no double backward).
    """
    import torch
    from torch.nn.attention import SDPBackend, sdpa_kernel

    names = list(layers)
    params = [layers[n].weight for n in names]
    flags = [p.requires_grad for p in params]
    gen = torch.Generator().manual_seed(seed)
    est = {n: [] for n in names}
    try:
        for p in params:
            p.requires_grad_(True)
        with sdpa_kernel(SDPBackend.MATH):
            for i in range(samples):
                enc, ref = batches[i % len(batches)], refs[i % len(batches)]
                loss = _distance(_outputs(lm, enc), ref, lm.task, enc)
                grads = torch.autograd.grad(loss, params, create_graph=True)
                vs = [torch.randint(0, 2, p.shape, generator=gen).to(p.dtype) * 2 - 1 for p in params]
                hv = torch.autograd.grad(sum((g * v).sum() for g, v in zip(grads, vs)), params)
                for n, v, h in zip(names, vs, hv):
                    est[n].append(float((v * h).sum()))
    finally:
        for p, f in zip(params, flags):
            p.requires_grad_(f)
    out = {}
    for n in names:
        a = np.asarray(est[n])
        out[n] = {"trace": float(a.mean()), "stderr": float(a.std(ddof=1) / np.sqrt(len(a))) if len(a) > 1 else 0.0}
    return out


@dataclass
class Move:
    layer: str
    src: str
    dst: str
    bytes_saved: int
    omega: float = 0.0
    context: float = 0.0
    score: float = 0.0

    def as_dict(self) -> dict:
        return {
            "layer": self.layer,
            "from": self.src,
            "to": self.dst,
            "bytes_saved": self.bytes_saved,
            "omega": self.omega,
            "context": self.context,
            "score": self.score,
        }


def weight_bytes(k: int, n: int, precision: str, block_size: int, per_channel: bool = True) -> int:
    """Stored bytes of a weight with K elements per block axis and N channels (MatMul (K, N); embedding table:
    K = hidden, N = vocabulary): fp32; int8 + scale and zero point per channel (per tensor for a table); 8-bit
    weights: uint8 + per-block fp32 scales; uint4 + per-block fp32 scales + packed 4-bit zero points (MatMulNBits /
    GatherBlockQuantized)."""
    if precision == "float":
        return 4 * k * n
    if precision == "int8-weights":  # uint8 + a fp32 scale per block (symmetric: no zero points), tables too
        return n * (k + 4 * -(-k // block_size))
    if precision.startswith("int8"):
        return k * n + (5 * n if per_channel else 5)
    blocks = -(-k // block_size)
    return n * (blocks * block_size // 2 + 4 * blocks + (blocks + 1) // 2)


def stored_bytes(mod, precision: str, cfg: MixedQuant) -> int:
    rows, cols = mod.weight.shape  # Linear (out, in): K = in, N = out; embedding (V, H): K = H, N = V
    return weight_bytes(cols, rows, precision, cfg.block_size, per_channel=not is_embedding(mod))


def _context_change(lm, layers, batches, refs, assignment, cache, cfg) -> float:
    import torch

    with torch.inference_mode(), Simulated(layers, assignment, cache, cfg):
        return float(
            np.mean([float(_distance(_outputs(lm, enc), ref, lm.task, enc)) for enc, ref in zip(batches, refs)])
        )


def rank_moves(cfg: MixedQuant, lm, layers: dict, texts: list[str], progress) -> tuple[list[Move], dict]:
    """Every move with its Hessian (omega) and in-context sensitivity, ordered for the bisection."""
    import torch

    batches = _batches(lm, texts)
    with torch.inference_mode():
        refs = [_outputs(lm, enc).detach().clone() for enc in batches]
    t0 = time.perf_counter()
    progress(f"quant.mixed: Hutchinson traces over {len(layers)} layers ({cfg.hutchinson_samples} samples)")
    traces = hessian_traces(lm, layers, batches, refs, cfg.hutchinson_samples, cfg.seed)
    t_hessian = time.perf_counter() - t0
    steps = ladder(cfg)
    cache: dict = {}
    moves: list[Move] = []
    t0 = time.perf_counter()
    for src, dst in zip(steps, steps[1:]):
        progress(f"quant.mixed: in-context sensitivity of {src} -> {dst} for {len(layers)} layers")
        context_assignment = {n: src for n in layers}
        cls = []
        for name, mod in layers.items():
            w = mod.weight.detach()
            with torch.no_grad():
                err_dst = float(((quantized_weight(mod, dst, cfg) - w) ** 2).sum())
                err_src = float(((quantized_weight(mod, src, cfg) - w) ** 2).sum())
            curvature = traces[name]["trace"] / w.numel()
            ctx_change = (  # the plain Hessian ordering needs no in-context measurement (one forward per move)
                _context_change(lm, layers, batches, refs, {**context_assignment, name: dst}, cache, cfg)
                if cfg.ordering == "augmented"
                else 0.0
            )
            cls.append(
                Move(
                    name,
                    src,
                    dst,
                    stored_bytes(mod, src, cfg) - stored_bytes(mod, dst, cfg),
                    omega=max(curvature, 0.0) * max(err_dst - err_src, 0.0),
                    context=ctx_change,
                )
            )
        measured = src != "float" and cfg.ordering == "augmented"
        base = _context_change(lm, layers, batches, refs, context_assignment, cache, cfg) if measured else 0.0
        for m in cls:
            m.context = m.context - base  # the move's own share, not the context's
        moves += cls
    info = {
        "traces": traces,
        "hessian_seconds": round(t_hessian, 1),
        "context_seconds": round(time.perf_counter() - t0, 1),
    }
    return order_moves(moves, cfg.ordering), info


def order_moves(moves: list[Move], ordering: str) -> list[Move]:
    """Score every move and sort within its class (float->int8 moves first, then int8->int4), keeping the class
    order. hessian: omega / mean omega. augmented: sqrt(omega_hat * context_hat). Both per MB saved."""
    import dataclasses

    out: list[Move] = []
    for src in dict.fromkeys(m.src for m in moves):
        cls = [dataclasses.replace(m) for m in moves if m.src == src]
        mo = np.mean([m.omega for m in cls]) or 1.0
        mc = np.mean([max(m.context, 0.0) for m in cls]) or 1.0
        for m in cls:
            # A marginal change at or below zero is under the measurement's resolution, not a free move: floor it
            # at 5% of the class mean so the geometric mean does not erase the Hessian's signal.
            ctx_hat = max(m.context / mc, 0.05)
            sens = m.omega / mo if ordering == "hessian" else float(np.sqrt((m.omega / mo) * ctx_hat))
            m.score = sens / max(m.bytes_saved, 1) * 1e6  # sensitivity per MB saved
        out += sorted(cls, key=lambda m: m.score)
    return out


def word_embeddings(lm) -> dict:
    """The token-embedding table(s): nn.Embedding modules named *word_embeddings* (BERT-style encoders), a causal
    LM's input embeddings."""
    if lm.task == "text-generation":
        emb = lm.model.get_input_embeddings()
        return {n: m for n, m in lm.model.named_modules() if m is emb}
    return {n: m for n, m in lm.model.named_modules() if is_embedding(m) and n.endswith("word_embeddings")}


def lm_head(lm) -> dict:
    """A causal LM's output projection as its own layer (untied from the embeddings first, so the two can take
    different precisions)."""
    if lm.task != "text-generation" or lm.model.get_output_embeddings() is None:
        return {}
    untie(lm.model)
    head = lm.model.get_output_embeddings()
    return {n: m for n, m in lm.model.named_modules() if m is head}


def assignment_after(layers, moves: list[Move], k: int) -> dict[str, str]:
    a = {n: "float" for n in layers}
    for m in moves[:k]:
        a[m.layer] = m.dst
    return a


# ---- building and scoring the ONNX model -----------------------------------------------------------------


def build_onnx(
    src: Path,
    dst: Path,
    layers: dict,
    assignment: dict[str, str],
    node_of: dict[str, str],
    cfg: MixedQuant,
    ctx: OnnxContext,
) -> Path:
    """One ONNX model holding the assignment: MatMulNBits where int4, int8 (dynamic or QDQ) where int8."""

    formats = {
        "int4-weights": Int4Format(cfg.block_size, False, cfg.accuracy_level),
        "int8-weights": Int4Format(cfg.block_size, True, cfg.accuracy_level, bits=8),
    }
    int4 = {n: (onnx_weight(layers[n]), formats[p]) for n, p in assignment.items() if p in formats}  # MatMulNBits /
    # GatherBlockQuantized (4 or 8 bits)
    int8 = {node_of[n] for n, p in assignment.items() if p in ("int8-dynamic", "int8-qdq")}
    current = src
    if int4:
        current = dst.with_name(dst.stem + ".int4.onnx") if int8 else dst
        pack_int4(src, current, int4)
    if int8:
        import onnx

        # everything else that ORT could quantize stays float: other layers, position embeddings, ...
        graph = onnx.load(str(current), load_external_data=False).graph
        keep_float = tuple(n.name for n in graph.node if n.op_type in ("MatMul", "Gather") and n.name not in int8)
        ops = ("MatMul", "Gather")
        if any(p == "int8-qdq" for p in assignment.values()):
            apply_static(StaticQuant(op_types=ops, exclude=keep_float), current, dst, ctx)
        else:
            apply_dynamic(DynamicQuant(op_types=ops, exclude=keep_float), current, dst, ctx)
        if current != src:
            current.unlink(missing_ok=True)
    elif not int4:
        import shutil

        shutil.copy2(src, dst)
    return dst


@dataclass
class Search:
    """What the bisection saw; every probe is a real ONNX model scored by the pipeline's evaluator."""

    base_score: float
    budget: tuple[float, float]  # (min_drop, max_drop) in points of the metric
    trajectory: list[dict] = field(default_factory=list)
    seen: set = field(default_factory=set)  # distinct assignments this search needed scored
    models: dict = field(default_factory=dict)  # frozenset(assignment) -> (path, score, bytes); may be shared


def _probe(k: int, moves, layers, node_of, src: Path, work: Path, cfg, ctx, search: Search, progress) -> dict:
    import hashlib

    a = assignment_after(layers, moves, k)
    key = frozenset(a.items())
    search.seen.add(key)
    if key not in search.models or not Path(search.models[key][0]).exists():
        path = work / f"mixed-{hashlib.sha1(repr(sorted(a.items())).encode()).hexdigest()[:12]}.onnx"
        build_onnx(src, path, layers, a, node_of, cfg, ctx)
        search.models[key] = (str(path), ctx.scorer.score(path), file_bytes(path))
    path, score, size = search.models[key]
    drop = search.base_score - score
    counts = {p: sum(v == p for v in a.values()) for p in ladder(cfg)}
    row = {
        "k": k,
        "score": round(score, 4),
        "drop": round(drop, 4),
        "bytes": size,
        "layers": counts,
        "feasible": drop <= search.budget[1],
        "path": str(path),
    }
    search.trajectory.append(row)
    progress(
        f"quant.mixed: probe {len(search.trajectory)}: k={k}/{len(moves)} {counts} drop {drop:+.3f} "
        f"({'inside' if row['feasible'] else 'outside'} budget)"
    )
    return row


def bisect(n_moves: int, probe: Callable[[int], dict], budget: tuple[float, float]) -> int:
    """Largest k in [0, n_moves] whose measured drop <= max_drop (k = 0 is the float model, drop 0 by definition).
    With min_drop > 0 the range is a tolerance band: the first probe inside [min_drop, max_drop] ends the search.
    ``probe(k)`` builds and scores configuration k and returns {"drop", "feasible"}. Assumes the drop grows with
    k; the trajectory in the report lets users check that it did. ceil(log2(n_moves + 1)) + 1 probes at most."""
    lo, hi = 0, n_moves + 1  # lo: known feasible; hi: known infeasible (n + 1: none known yet)
    k = n_moves  # try everything first: one evaluation when the budget is generous
    while True:
        row = probe(k)
        if row["feasible"]:
            lo = k
            if 0 < budget[0] <= row["drop"]:
                return k
        else:
            hi = k
        if hi - lo <= 1:
            return lo
        k = (lo + hi) // 2


def class_boundaries(moves: list[Move]) -> list[int]:
    """k values where a precision class ends (e.g. every layer int8, nothing int4 yet)."""
    return [k for k in range(1, len(moves)) if moves[k].src != moves[k - 1].src]


def _latency_pick(rows: list[dict], cfg: MixedQuant, progress) -> tuple[dict, list[dict]]:

    feasible = list({r["k"]: r for r in rows if r["feasible"]}.values())
    progress(f"quant.mixed: timing {len(feasible)} feasible probes interleaved (latency-aware)")
    lat = measure_latency(
        {f"k{r['k']}": Path(r["path"]) for r in feasible}, ProfileConfig(shapes=(Shape(1, 128),), runs=cfg.latency_runs)
    )
    for r in feasible:
        r["p50_ms"] = round(lat[f"k{r['k']}"][0].p50_ms, 3)
    best = min(feasible, key=lambda r: (r["p50_ms"], -r["k"]))
    return best, feasible


@dataclass(frozen=True)
class Plan:
    """The search's inputs, computed once: layers, their ONNX nodes, the ordered moves, the sensitivities."""

    layers: dict
    node_of: dict
    moves: list
    info: dict


def apply_mixed(cfg: MixedQuant, src: Path, dst: Path, ctx: OnnxContext) -> dict:
    return run_search(cfg, plan_search(cfg, src, ctx), src, dst, ctx)


def plan_search(cfg: MixedQuant, src: Path, ctx: OnnxContext) -> Plan:
    import onnx

    if ctx.torch_model is None or ctx.scorer is None:
        raise StageError("quant.mixed needs the torch model and an evaluator: run it through `compress run`")
    lm = ctx.torch_model
    progress = ctx.progress or (lambda msg: None)
    patterns = default_layers(lm, cfg.layers)
    layers = {n: m for n, m in linear_layers(lm, patterns).items() if m.in_features % 2 == 0}
    if not layers:
        raise StageError(f"quant.mixed: no nn.Linear matches {list(patterns)}: set layers to patterns of module names")
    if not cfg.layers:
        layers = {**layers, **lm_head(lm)}
    if cfg.embeddings:
        layers = {**word_embeddings(lm), **layers}
    node_of = layer_nodes(onnx.load(str(src)), {n: onnx_weight(m) for n, m in layers.items()})
    lost = sorted(set(layers) - set(node_of))
    if lost:
        raise StageError(
            f"quant.mixed: no MatMul in the export for {len(lost)} layer(s), e.g. {lost[0]}: "
            "narrow `layers` to the model's Linear layers"
        )
    texts = list(ctx.calibration_texts[: cfg.calibration_samples])
    if not texts:
        raise StageError("quant.mixed needs calibration text: pass --data FILE or keep the shipped sentences")
    moves, info = rank_moves(cfg, lm, layers, texts, progress)
    return Plan(layers, node_of, moves, info)


def run_search(
    cfg: MixedQuant,
    plan: Plan,
    src: Path,
    dst: Path,
    ctx: OnnxContext,
    work: Path | None = None,
    models: dict | None = None,
    base: float | None = None,
) -> dict:
    """Bisection (and the latency-aware pick) over a plan; writes the chosen model to dst and returns the account.
    ``work`` / ``models`` / ``base`` let several searches share built and scored models (benchmarks)."""
    import shutil

    layers, node_of, moves, info = plan.layers, plan.node_of, plan.moves, plan.info
    progress = ctx.progress or (lambda msg: None)
    t_start = time.perf_counter()
    own_work = work is None
    work = work or dst.parent / (dst.stem + "-search")
    work.mkdir(parents=True, exist_ok=True)
    try:
        base = ctx.scorer.score(src) if base is None else base
        scale = abs(base) / 100 if cfg.relative else 1.0
        search = Search(
            base_score=base,
            budget=(cfg.min_drop * scale, cfg.max_drop * scale),
            models=models if models is not None else {},
        )
        t0 = time.perf_counter()
        k = bisect(
            len(moves),
            lambda k: _probe(k, moves, layers, node_of, src, work, cfg, ctx, search, progress),
            search.budget,
        )
        evaluations = len(search.seen) + 1  # distinct models scored + the float model
        chosen = next((r for r in search.trajectory if r["k"] == k), None)
        timed: list[dict] = []
        if cfg.latency_aware and k > 0:
            # the class boundaries below k (e.g. all int8) are feasible too when the drop grows with k: probe them,
            # since a lower precision is not always faster (int4 MatMulNBits vs int8 on a CPU without VNNI)
            for b in class_boundaries(moves):
                if b < k:
                    _probe(b, moves, layers, node_of, src, work, cfg, ctx, search, progress)
            evaluations = len(search.seen) + 1
            chosen, timed = _latency_pick(search.trajectory, cfg, progress)
            k = chosen["k"]
        assignment = assignment_after(layers, moves, k)
        if chosen is None:  # k = 0: nothing fits the budget: the float model, said plainly
            shutil.copy2(src, dst)
        else:
            shutil.copy2(chosen["path"], dst)
        alone = _measure_alone(cfg, layers, node_of, src, work, ctx, base, progress) if cfg.measure_alone else {}
        search_seconds = time.perf_counter() - t0
    finally:
        if own_work:
            shutil.rmtree(work, ignore_errors=True)

    per_layer = _per_layer(cfg, layers, moves, info["traces"], assignment, alone)
    first_bad = next((r for r in search.trajectory if not r["feasible"]), None)
    breaking = [m.layer + f" ({m.src}->{m.dst})" for m in moves[k : k + 3]] if k < len(moves) else []
    verdict = (
        "every layer took the most aggressive candidate inside the budget"
        if k == len(moves)
        else "no layer could be quantized inside the budget: the float model is kept"
        if k == 0
        else f"{k} of {len(moves)} moves fit the budget"
    )
    for r in search.trajectory:
        r.pop("path", None)
    return {
        "metric": ctx.scorer.name,
        "base_score": round(base, 4),
        "budget_points": [round(v, 4) for v in search.budget],
        "ordering": cfg.ordering,
        "moves_applied": k,
        "moves_total": len(moves),
        "verdict": verdict,
        "chosen_drop": None if chosen is None else chosen["drop"],
        "within_budget": chosen is None or chosen["feasible"],
        "next_moves_that_break_budget": breaking if first_bad else [],
        "evaluations": evaluations,
        "latency_timed": [{"k": r["k"], "p50_ms": r["p50_ms"]} for r in timed],
        "layers": {p: sum(v == p for v in assignment.values()) for p in ladder(cfg)},
        "bytes_before": file_bytes(src),
        "bytes": file_bytes(dst),
        "hessian_seconds": info["hessian_seconds"],
        "context_seconds": info["context_seconds"],
        "search_seconds": round(search_seconds, 1),
        "seconds": round(time.perf_counter() - t_start + info["hessian_seconds"] + info["context_seconds"], 1),
        "trajectory": search.trajectory,
        "per_layer": per_layer,
        "order": [m.as_dict() for m in moves],
    }


def _measure_alone(cfg, layers, node_of, src, work, ctx, base, progress) -> dict[str, float]:
    """The search metric's drop with one layer alone at the most aggressive candidate, others float."""
    top = ladder(cfg)[-1]
    out = {}
    for i, name in enumerate(layers):
        progress(f"quant.mixed: {name} alone at {top} ({i + 1}/{len(layers)})")
        path = work / "alone.onnx"
        build_onnx(src, path, layers, {n: (top if n == name else "float") for n in layers}, node_of, cfg, ctx)
        out[name] = round(base - ctx.scorer.score(path), 4)
    return out


def _per_layer(cfg, layers, moves, traces, assignment, alone) -> list[dict]:
    by_layer: dict[str, dict] = {}
    for m in moves:
        by_layer.setdefault(m.layer, {})[m.dst] = m
    rows = []
    for name, mod in layers.items():
        row = {
            "layer": name,
            "trace": round(traces[name]["trace"], 6),
            "trace_stderr": round(traces[name]["stderr"], 6),
            "precision": assignment[name],
            "bytes": stored_bytes(mod, assignment[name], cfg),
        }
        for dst, m in by_layer.get(name, {}).items():
            row[f"omega_{dst}"] = float(f"{m.omega:.4g}")
            row[f"context_{dst}"] = float(f"{m.context:.4g}")
            row[f"score_{dst}"] = float(f"{m.score:.4g}")
        if name in alone:
            row["drop_alone"] = alone[name]
        rows.append(row)
    return rows
