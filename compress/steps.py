"""The steps every flow shares, in the order a run takes them:

    inputs (model, evals, calibration / held-out text) -> stage contexts, filled by what the stages declare they
    need -> torch stages -> gated export (a float export must match torch or the run fails) -> int4 packing ->
    ONNX stages -> report header.

A flow (``compress.flows``) strings these together for one kind of model and target; nothing here knows which
flow calls it or names a stage.
"""

from __future__ import annotations

import copy
import json
import re
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx

from compress.core import Progress, silent
from compress.core.data import PairSet, calibration_and_heldout, read_labelled, read_stsb, read_texts, shipped_sentences
from compress.core.errors import CompressError, first_line
from compress.core.evaluate import EvalSpec, parse_eval, search_score
from compress.core.kinds import ENCODER_GRAPH, ModelKind, encoder_graph
from compress.core.models import LoadedModel, detect_task, load_model, max_positions, resolve_path, torch_outputs
from compress.recipe import Recipe, StageSpec
from compress.stages import OnnxContext, Scorer, StageError, TorchContext
from export.genai_graph import GenaiWeights, NBits, Table, build, graft
from export.int4_pack import gather_table, op_weight, ort_quantize, pack_int4
from export.onnx_export import export_onnx
from export.verify import FLOAT_COSINE_MIN, Parity, verify_against_torch
from profiles import DeviceProfile
from runtimes.encode import ort_outputs
from runtimes.host import host_info
from runtimes.ort import cpu_session
from runtimes.profiler import ProfileConfig
from runtimes.roofline import RooflineError, estimate


@dataclass(frozen=True)
class RunConfig:
    """What the user asked for (the CLI's options), before anything is checked."""

    model: str
    target: str = "cpu"
    recipe: str = "cpu-default"
    out: Path | None = None
    evals: tuple[str, ...] = ("fidelity",)
    task: str | None = None
    data: Path | None = None
    base: str | None = None  # the base model a fine-tuned MODEL came from (delta stages)
    train: str | None = None  # labelled pairs for a recovery's task loss: "stsb:PATH"
    overrides: tuple[tuple[str, str], ...] = ()  # (stage parameter, value text): compress.recipe.apply_overrides
    override_flags: tuple[tuple[str, str], ...] = ()  # (stage parameter, the option it came from), for messages
    force: bool = False
    formats: tuple[str, ...] = ("onnx",)  # "ort" adds onnx/model.ort (ORT Mobile) beside the ONNX graph
    latency: ProfileConfig = field(default_factory=ProfileConfig)
    new_tokens: int = 32  # generative models: tokens generated per timed run
    # generative models: timed runs per shape and model (None: GEN_RUNS; the CLI's --runs sets it and latency.runs)
    gen_runs: int | None = None
    max_ppl_rise: float = 10.0  # causal LMs: the perplexity gate, percent above the float model's


# Each timed run of a generative model is a whole generation (smollm2 fp32 at 32x128: ~12 s): 10 runs keep the
# default `compress run smollm2 --target cpu` near 5 minutes (50 took 20, mostly timing the float model at batch 32)
GEN_RUNS = 10


@dataclass(frozen=True)
class Run:
    """A run validated before any heavy work: the recipe with its overrides, the target, the output folder, the
    model kind that picked the flow."""

    cfg: RunConfig
    recipe: Recipe
    profile: DeviceProfile
    out: Path
    kind: ModelKind


def default_out(cfg: RunConfig) -> Path:
    slug = re.sub(r"[^A-Za-z0-9_.-]+", "-", Path(cfg.model).name or cfg.model).strip("-")
    return Path("runs") / f"{slug}-{Path(cfg.recipe).stem}-{Path(cfg.target).stem}"


# ---- inputs ---------------------------------------------------------------------------------------------------


@dataclass
class Inputs:
    """An encoder run's inputs: the loaded model, the parsed evals, calibration and held-out text (never shared),
    labelled training pairs when --train gives them."""

    lm: LoadedModel
    evals: list[EvalSpec]
    calibration: list[str]
    heldout: list[str]
    labelled: PairSet | None = None


def read_labelled_pairs(spec: str) -> PairSet:
    """--train: "stsb:PATH" (sentence pairs with gold similarity scores, STS-B format)."""
    kind, _, path = spec.partition(":")
    if kind != "stsb" or not path:
        raise CompressError(f"--train {spec!r}: give labelled pairs as stsb:PATH (an STS-B format file)")
    return read_stsb(path)


def check_inputs(cfg: RunConfig) -> None:
    """What can be checked before an encoder loads: each --eval (kind, file, encoding, format, fit to the task) and
    the latency shapes against the model's positions."""
    path = resolve_path(cfg.model)
    try:
        task = cfg.task or detect_task(path)
    except json.JSONDecodeError:
        return  # loading the model reports the broken config.json in its own words
    for text in cfg.evals:
        spec = parse_eval(text, task)
        if spec.kind == "stsb":
            read_stsb(spec.path)
        elif spec.kind == "accuracy":
            read_labelled(spec.path)
    limit = max_positions(path)
    longest = max(s.seq for s in cfg.latency.shapes)
    if limit and longest > limit:
        raise CompressError(
            f"--shapes asks for sequences of {longest} tokens, past the model's {limit} positions: "
            f"use lengths <= {limit}"
        )


def load_inputs(cfg: RunConfig, progress: Progress = silent) -> Inputs:
    progress(f"loading {cfg.model}")
    lm = load_model(cfg.model, cfg.task)
    evals = [parse_eval(e, lm.task) for e in cfg.evals]
    calibration, heldout = calibration_and_heldout(shipped_sentences())
    if cfg.data is not None:
        calibration = read_texts(cfg.data)
    return Inputs(lm, evals, calibration, heldout, read_labelled_pairs(cfg.train) if cfg.train else None)


def tokenized_batches(lm: LoadedModel, texts: list[str], batch: int = 8, seq: int = 128) -> tuple[dict, ...]:
    """Calibration feeds padded to one fixed length: ORT's entropy/percentile calibrators stack all batches."""
    seq = min(seq, lm.max_length)
    return tuple(
        dict(
            lm.tokenizer(
                texts[i : i + batch], padding="max_length", truncation=True, max_length=seq, return_tensors="np"
            )
        )
        for i in range(0, len(texts), batch)
    )


# ---- stage contexts, filled by need ---------------------------------------------------------------------------


def _needs(stages: list[StageSpec]) -> set[str]:
    return {n for s in stages for n in s.type.needs_for(s.config)}


def torch_context(stages: list[StageSpec], lm: LoadedModel, calibration: list[str], progress: Progress = silent,
                  **inputs) -> TorchContext:  # fmt: skip
    """The read-only context of the torch stages, filled by need: an untouched copy of the model and the base model
    only when a stage needs them. ``inputs``: artifact_dir, base_model, labelled, memo (TorchContext's fields)."""
    needs = _needs(stages)
    return TorchContext(
        calibration=tuple(calibration),
        original=copy.deepcopy(lm) if "original" in needs else None,
        artifact_dir=inputs.get("artifact_dir"),
        base_model=inputs.get("base_model") if "base" in needs else None,
        labelled=inputs.get("labelled"),  # "labels" in needs: refused up front when --train is missing
        memo=inputs.get("memo"),
        progress=progress,
    )


def onnx_context(
    stages: list[StageSpec],
    lm: LoadedModel,
    calibration: list[str],
    profile: DeviceProfile | None = None,
    search_eval: EvalSpec | None = None,
    progress: Progress | None = None,
) -> OnnxContext:
    """The read-only context of the ONNX stages; the torch model and the scorer only when a stage needs them."""
    needs = _needs(stages)
    if "scorer" in needs and search_eval is None:
        raise CompressError("a search stage needs an evaluation to score candidates: pass --eval")
    c = lm.config
    return OnnxContext(
        calibration=tokenized_batches(lm, calibration),
        host=host_info(),
        model_type=getattr(c, "model_type", ""),
        num_heads=int(getattr(c, "num_attention_heads", 0)),
        hidden_size=int(getattr(c, "hidden_size", 0)),
        calibration_texts=tuple(calibration),
        precisions=profile.precisions if profile else (),
        torch_model=lm if "torch_model" in needs else None,
        scorer=make_scorer(search_eval, lm, calibration) if "scorer" in needs else None,
        progress=progress,
    )


def make_scorer(spec: EvalSpec, lm: LoadedModel, texts: list[str]) -> Scorer:
    """The search metric of a run (its first --eval) on any ONNX file, run in ORT like the final evaluation."""
    reference = torch_outputs(lm, texts) if spec.kind == "fidelity" else None

    def score(path: Path) -> float:
        sess = cpu_session(path, 0)
        return search_score(
            spec, lambda t: ort_outputs(sess, lm.tokenizer, t, lm.task, lm.max_length), texts, reference
        )

    name = (
        "fidelity x100 (mean cosine to the original on the calibration text)" if spec.kind == "fidelity" else str(spec)
    )
    return Scorer(name=name, score=score)


# ---- stage loops ----------------------------------------------------------------------------------------------


def _stage_report(spec: StageSpec, metrics: dict, t0: float, **extra) -> dict:
    return {
        "name": spec.name,
        "level": spec.type.level,
        "params": spec.params(),
        "metrics": metrics,
        "seconds": round(time.perf_counter() - t0, 2),
        **extra,
    }


def apply_torch_stages(stages: list[StageSpec], lm: LoadedModel, calibration: list[str], progress: Progress = silent,
                       **inputs) -> tuple[LoadedModel, list[dict]]:  # fmt: skip
    """Apply torch-level stages in order; each sees the untouched original model and the calibration text
    (``inputs``: see torch_context)."""
    if not stages:
        return lm, []
    ctx = torch_context(stages, lm, calibration, progress, **inputs)
    reports = []
    for i, spec in enumerate(stages):
        progress(f"stage {i + 1}/{len(stages)}: {spec.name}")
        t0 = time.perf_counter()
        try:
            lm, metrics = spec.type.apply(spec.config, lm, ctx)
        except StageError as e:
            raise CompressError(f"stage {spec.name} failed: {e}") from None
        reports.append(_stage_report(spec, metrics, t0))
    return lm, reports


def apply_onnx_stages(
    stages: list[StageSpec], src: Path, work: Path, ctx: OnnxContext | None, progress: Progress = silent
) -> tuple[Path, list[dict]]:
    """Apply ONNX-level stages in order, each writing a new file in ``work``; returns the last file and reports."""
    current, reports = src, []
    for i, spec in enumerate(stages):
        progress(f"stage {i + 1}/{len(stages)}: {spec.name}")
        dst = work / f"stage{i + 1}-{spec.name}.onnx"
        t0 = time.perf_counter()
        try:
            metrics = spec.type.apply(spec.config, current, dst, ctx)
        except StageError as e:
            raise CompressError(f"stage {spec.name} failed: {e}") from None
        reports.append(_stage_report(spec, metrics, t0))
        current = dst
    return current, reports


def pack_int4_layers(lm: LoadedModel, src: Path, work: Path) -> tuple[Path, dict]:
    """Pack the layers a stage put on the int4 grid into MatMulNBits (export.int4_pack)."""
    t0 = time.perf_counter()
    modules = dict(lm.model.named_modules())
    weights = {name: (op_weight(modules[name]), fmt) for name, fmt in lm.int4_layers.items()}
    dst = work / "int4-packed.onnx"
    tables = {name: (t.packed, t.scales, t.zero_points) for name, t in lm.int4_tables.items()}
    metrics = pack_int4(src, dst, weights, tables)
    return dst, {
        "name": "export.int4_pack",
        "level": "onnx",
        "params": {},
        "metrics": metrics,
        "seconds": round(time.perf_counter() - t0, 2),
    }


def _nbits(w: np.ndarray, f, table=None) -> NBits:
    """A Linear's (out, in) grid weight packed as MatMulNBits holds it: the stage's own table (GPTQ) where it chose
    one, else ORT's packing of the weight (lossless: it is on ORT's grid already)."""
    if table is not None:
        return NBits(table.packed, table.scales, table.zero_points, f.bits, f.block_size, f.accuracy_level)
    packed, scales, zp = ort_quantize(w.T, f.block_size, f.symmetric, f.bits)
    return NBits(packed, scales, None if f.symmetric else zp, f.bits, f.block_size, f.accuracy_level)


def genai_weights(lm: LoadedModel) -> GenaiWeights:
    """The torch stages' numbers, as MatMulNBits / GatherBlockQuantized hold them, by Hugging Face module name: every
    Linear a stage put on a grid (``lm.int4_layers``; a low-rank-wrapped one as ``NAME.base``), the low-rank factors
    (A, B) of wrapped Linears, and the head / token embeddings (float where no stage quantized them)."""
    model = lm.model
    modules = dict(model.named_modules())
    names = {id(m): n for n, m in modules.items()}
    head_mod, emb_mod = model.get_output_embeddings(), model.get_input_embeddings()
    head, emb = names[id(head_mod)], names[id(emb_mod)]
    linears = {}
    for name, fmt in lm.int4_layers.items():
        if name in (head, emb):
            continue
        w = modules[name].weight.detach().float().numpy()
        linears[name.removesuffix(".base")] = _nbits(w, fmt, lm.int4_tables.get(name))
    low_rank = {n: (m.lowrank_A.weight.detach().float().numpy(), m.lowrank_B.weight.detach().float().numpy())
                for n, m in modules.items() if hasattr(m, "lowrank_A")}  # fmt: skip
    w_head = head_mod.weight.detach().float().numpy()
    w_emb = emb_mod.weight.detach().float().numpy()
    fmt = lm.int4_layers.get(emb)
    if fmt is not None:
        bits = getattr(fmt, "bits", 4)
        embeddings = Table(*gather_table(w_emb, fmt.block_size, bits), w_emb.shape, fmt.block_size, bits)
    else:
        embeddings = w_emb
    fmt = lm.int4_layers.get(head)
    head_table = _nbits(w_head, fmt, lm.int4_tables.get(head)) if fmt is not None else w_head
    return GenaiWeights(linears, low_rank, head_table, embeddings)


def save_plain(lm: LoadedModel, tokenizer, out: Path) -> Path:
    """The compressed model as a plain Hugging Face folder (grid weights, low-rank wrappers' base Linears, no factors):
    what onnxruntime-genai's builder reads."""
    from safetensors.torch import save_file

    model = lm.model
    state = {}
    for k, v in model.state_dict().items():
        if ".lowrank_A." in k or ".lowrank_B." in k:
            continue
        state[k.replace(".base.", ".")] = v.detach().float().contiguous().clone()
    if getattr(model.config, "tie_word_embeddings", False):
        state.pop("lm_head.weight", None)
    out.mkdir(parents=True)
    model.config.save_pretrained(out)
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.save_pretrained(out)
    tokenizer.save_pretrained(out)
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    return out


def genai_graph(lm: LoadedModel, tokenizer, work: Path, out: Path) -> tuple[Path, dict]:
    """The compressed causal LM in onnxruntime-genai's model-builder graph holding the recipe's tables exactly
    (``export.genai_graph``): ``out`` gets model.onnx, genai_config.json and the builder's tokenizer files."""
    t0 = time.perf_counter()
    fmt = next((f for n, f in lm.int4_layers.items() if ".layers." in n), None)
    block, level = (fmt.block_size, fmt.accuracy_level) if fmt else (32, 4)
    hf = save_plain(lm, tokenizer, work / "genai-hf")
    built = build(hf, work / "genai-builder", block, level, work / "genai-cache", fuse_gate_up=True)
    metrics = graft(built, genai_weights(lm), out)
    return out, {
        "name": "export.genai_graph",
        "level": "onnx",
        "params": {},
        "metrics": {"graph": "onnxruntime-genai model builder (int4, cpu)", **metrics},
        "seconds": round(time.perf_counter() - t0, 2),
    }


# ---- gated export ---------------------------------------------------------------------------------------------


def gated_export(
    lm: LoadedModel,
    out_dir: Path,
    heldout: list[str],
    reference: np.ndarray | None = None,
    what: str = "the float ONNX export",
) -> tuple[Path, Parity]:
    """Export to ``out_dir/model.onnx`` and hold it to the float gate against torch (cosine >= 0.999 on held-out
    text): a diverging export fails the run before anything is written."""
    path = export_onnx(lm, out_dir)
    parity = verify_against_torch(lm, path, heldout, FLOAT_COSINE_MIN, reference=reference)
    if not parity.passed:
        raise CompressError(
            f"{what} diverges from torch (min cosine {parity.cosine_min:.5f} < {FLOAT_COSINE_MIN}): "
            "report this model as an export bug; nothing was written"
        )
    return path, parity


# ---- the report's header and estimates ------------------------------------------------------------------------


def target_section(profile: DeviceProfile, description: bool = False) -> dict:
    out = {
        "name": profile.name,
        "kind": profile.kind,
        "runtime": profile.runtime,
        "execution_provider": profile.execution_provider,
        "profile": profile.source_file,
    }
    if description:
        out["description"] = profile.description
    return out


def estimate_row(path: Path, profile: DeviceProfile, batch: int, seq: int, precision: str = "auto") -> dict:
    """The analytic roofline for one shape; an estimator failure is reported, never fatal to a measured run."""
    try:
        est = estimate(path, profile, batch, seq, precision)
    except (RooflineError, ValueError) as e:  # ValueError: a graph the estimator does not cover yet
        return {"batch": batch, "seq": seq, "source": "analytic", "error": first_line(e)}
    keep = ("batch", "seq", "p50_ms", "source", "tool", "profile", "macs", "bytes", "bound", "caveats")
    return {k: est[k] for k in keep if k in est}


def onnx_file(path: Path) -> Path:
    """An artefact folder's graph (``onnx/model.onnx``, or ``model.onnx`` in older and NPU folders), or the .onnx
    file itself, checked to be a valid ONNX model."""
    if path.is_dir():
        path = encoder_graph(path)
    if not path.is_file():
        raise CompressError(
            f"{path} not found: pass an artefact folder holding {ENCODER_GRAPH} (or model.onnx), or an .onnx file"
        )
    try:
        onnx.checker.check_model(str(path))
    except Exception as e:
        raise CompressError(
            f"{path} is not a valid ONNX model ({type(e).__name__}): re-export it with compress run"
        ) from None
    return path
