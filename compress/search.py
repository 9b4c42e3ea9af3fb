"""``compress search``: the fastest model on a target whose accuracy drop stays inside a budget, found by a
multi-objective search over structured compression and precision, and checked on data the search never scored.

    compress search minilm --target cpu --max-drop 0.5 --eval stsb:sts-dev.csv --train stsb:sts-train.csv --budget 60m

How it decides (README, "Compression search"):
1. **Splits.** The --eval file is split by row parity: even rows are the *selection* split every trial is scored on,
   odd rows the *held-out* split only the winner is scored on (or --holdout FILE). Training uses --train / the
   calibration text only.
2. **Anchors**, once: the fp32 export and ORT dynamic int8 of the original (``quantize_dynamic``, per channel), scored
   on the selection split and timed on the target.
3. **Trials** (Optuna: a multi-objective TPE sampler over blocks kept, FFN neurons kept, heads kept, precision,
   low-rank rank; its RDB or journal storage makes the study resumable and shareable). A trial first builds its
   *architecture* from the original weights without training (prune.layers, one-shot prune.gradual, the
   quantization) and times it on the target, interleaved with the int8 anchor: latency does not depend on the
   weights' values, so this cheap probe decides whether the expensive training is worth it (a candidate that
   cannot beat the fastest model already inside the budget is not trained; it stays in the study with its
   latency). Then the recipe runs for real (recovery training with the task loss when --train gives labels) and
   the artefact is scored on the selection split.
4. **Winner**: the lowest p50 among trained trials whose selection drop, plus z(--confidence) times its paired
   bootstrap standard error, is <= --max-drop (batch-consistent quantization only, unless --allow-batch-dependent).
   The margin answers the winner's curse: the fastest of many candidates scored on one noisy split is the one
   whose luck was best (a run picked +0.37 on the selection split that was +0.67 held out). Its drop is measured
   again on the held-out split; that is the number reported against the budget. The frontier (selection drop x
   p50 x MB), a plot, and a recipe file that reproduces the winner with ``compress run`` go to the output folder.
Targets this host cannot measure are ranked by the analytic roofline, calibrated on this host first
(``runtimes.calibration``), and every latency is labelled with its source.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import itertools
import json
import re
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from statistics import NormalDist

import numpy as np
from scipy.stats import rankdata, spearmanr

from compress.core import Progress, silent
from compress.core.data import calibration_and_heldout, read_stsb, shipped_sentences
from compress.core.errors import CompressError
from compress.core.evaluate import EvalSpec, parse_eval, spearman_x100, stsb_cosines
from compress.core.fs import check_out_dir, file_bytes, staged_folder, write_text
from compress.core.models import LoadedModel, detect_task, load_model, resolve_path
from compress.core.numerics import row_cosine
from compress.recipe import parse_recipe
from compress.report import versions
from compress.stages.recover import Recover
from compress.steps import (
    apply_onnx_stages,
    apply_torch_stages,
    gated_export,
    onnx_context,
    read_labelled_pairs,  # fmt: skip
)
from export.layout import write_encoder_layout
from profiles import DeviceProfile, load_profile
from runtimes.encode import ort_outputs
from runtimes.host import host_info
from runtimes.ort import cpu_session
from runtimes.profiler import ProfileConfig, Shape, measure_latency
from runtimes.roofline import estimate, host_calibration

# The space: what a trial chooses. Precisions: "int8-hybrid" (quant.hybrid, what cpu-default holds: calibrated fixed
# scales + per-token scales for the FFN down-projection; the same embedding whatever the batch), "int8-fused-hybrid"
# (the same after ORT's transformer fusions, graph.optimize: one QAttention per layer; fewer nodes, faster at batch 1),
# "int8-static" (calibrated QDQ: batch-independent too, slower here), "int8-dynamic" (ORT dynamic int8:
# batch-dependent, only with --allow-batch-dependent). README, "Batch-independent embeddings".
SPACE: dict[str, tuple] = {
    "blocks": (2, 3, 4, 5, 6),
    "ffn_keep": (0.25, 0.5, 0.75, 1.0),
    "heads_keep": (0.75, 1.0),
    "precision": ("int8-hybrid", "int8-fused-hybrid", "int8-static", "int8-dynamic"),
}
BATCH_CONSISTENT = ("int8-hybrid", "int8-fused-hybrid", "int8-static")
QUANT_STAGES = {
    "int8-hybrid": [{"type": "quant.hybrid"}],
    "int8-fused-hybrid": [{"type": "graph.optimize", "opt_level": 1}, {"type": "quant.hybrid"}],
    "int8-static": [{"type": "quant.static", "exclude": ["*[0-9]/output/dense/MatMul"]}],
    "int8-dynamic": [{"type": "quant.dynamic"}],
}
PRECISION_TIE = 1.15  # a trained structure's precisions probed within 15% of its fastest are re-timed on it
PRECISION_RUNS = 60  # runs for that comparison (the probes take 30)
PROBE_SHARE = 0.3  # at most this share of the budget goes to timing architectures before any training
MAX_SKIPS = 40  # the sampler's proposals that cannot win in a row before the search stops early


@dataclass(frozen=True)
class SearchConfig:
    model: str
    eval: str  # stsb:PATH (the selection / held-out split source)
    target: str = "cpu"
    max_drop: float = 0.5
    holdout: Path | None = None
    train: str | None = None  # stsb:PATH: labelled pairs for the recovery's task loss
    budget_s: float = 3600.0
    trials: int = 0  # 0: as many as the budget allows
    steps: int = 400  # recovery steps per trained trial
    teacher: str = "tuned"  # recover's teacher when --train is given ("original" without it)
    storage: str | None = None  # sqlite:///file.db | postgresql://... | journal:FILE (default: a journal beside --out)
    study: str | None = None
    out: Path | None = None
    force: bool = False
    allow_batch_dependent: bool = False
    confidence: float = 0.6  # one-sided: a trial is inside the budget when drop + z * se <= max_drop (0.5: no margin)
    latency: ProfileConfig = field(default_factory=lambda: ProfileConfig(shapes=(Shape(1, 128),), runs=30))
    seed: int = 0


@dataclass
class Anchors:
    fp32: Path
    int8: Path
    fp32_score: float  # selection split
    int8_score: float
    fp32_cosines: np.ndarray | None = None  # per selection pair: the paired bootstrap of a trial's drop uses them
    p50: dict[str, float] = field(default_factory=dict)  # label -> ms at the first shape


# ---- recipes a trial runs -------------------------------------------------------------------------------------


def trial_stages(params: dict, n_blocks: int, steps: int, labelled: bool, teacher: str,
                 train: bool = True) -> list[dict]:  # fmt: skip
    """The recipe of a trial as [[stages]] tables. ``train`` False: structure and quantization only (the probe)."""
    stages: list[dict] = []
    if params["blocks"] < n_blocks:
        stages.append({"type": "prune.layers", "keep": params["blocks"], "importance": "block_influence"})
    for granularity, keep in (("channel", params["ffn_keep"]), ("head", params["heads_keep"])):
        if keep < 1.0:
            stages.append({"type": "prune.gradual", "granularity": granularity, "final_sparsity": round(1 - keep, 4),
                           "begin_step": 0, "end_step": 0, "total_steps": 0, "importance": "magnitude"})  # fmt: skip
    if train and stages:
        stages.append({"type": "recover", "steps": steps, "task_loss": 1.0 if labelled else 0.0,
                       "teacher": teacher if labelled else "original"})  # fmt: skip
    stages += copy.deepcopy(QUANT_STAGES[params["precision"]])
    return stages


def recipe_toml(name: str, description: str, stages: list[dict]) -> str:
    """A recipe file ``compress run --recipe FILE`` reads (flat keys only, as recipes are)."""

    def value(v) -> str:
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, (list, tuple)):
            return "[" + ", ".join(json.dumps(str(x)) for x in v) + "]"
        return json.dumps(v)

    lines = [f"name = {json.dumps(name)}", f"description = {json.dumps(description)}", ""]
    for s in stages:
        lines.append("[[stages]]")
        lines += [f"{k} = {value(v)}" for k, v in s.items()]
        lines.append("")
    return "\n".join(lines)


# ---- splits and scoring ---------------------------------------------------------------------------------------


def split_eval(spec: EvalSpec, holdout: Path | None, work: Path) -> tuple[Path, Path]:
    """(selection file, held-out file). Without --holdout, STS-B rows alternate: even -> selection, odd -> held out."""
    if holdout is not None:
        read_stsb(holdout)
        return spec.path, holdout
    rows = [line for line in spec.path.read_text(encoding="utf-8").splitlines(keepends=True) if line.strip()]
    sel, held = work / "selection.csv", work / "heldout.csv"
    sel.write_text("".join(rows[0::2]), encoding="utf-8")
    held.write_text("".join(rows[1::2]), encoding="utf-8")
    read_stsb(sel), read_stsb(held)
    return sel, held


def pair_cosines(path: Path, lm: LoadedModel, stsb: Path) -> tuple[np.ndarray, np.ndarray]:
    """(cosine per pair, gold scores) of an ONNX artefact in ORT on an STS-B file (``stsb_cosines``)."""
    sess = cpu_session(path, 0)
    return stsb_cosines(lambda t: ort_outputs(sess, lm.tokenizer, t, lm.task, lm.max_length), stsb)


def score(path: Path, lm: LoadedModel, stsb: Path) -> float:
    """STS-B Spearman x100 of an ONNX artefact in ORT (the same way a run's evaluation scores it:
    ``compress.core.evaluate.stsb_spearman``)."""
    return spearman_x100(*pair_cosines(path, lm, stsb))


def drop_se(base: np.ndarray, cand: np.ndarray, gold: np.ndarray, rounds: int = 300, seed: int = 0) -> float:
    """Standard error of the Spearman drop (x100) from ``base`` to ``cand`` cosines, by a paired bootstrap over the
    pairs (both models resampled on the same pairs, so what they share cancels)."""
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(gold), size=(rounds, len(gold)))

    def rho(x: np.ndarray) -> np.ndarray:  # Spearman of each resample = Pearson of ranks
        rx, rg = rankdata(x[idx], axis=1), rankdata(gold[idx], axis=1)
        rx -= rx.mean(1, keepdims=True)
        rg -= rg.mean(1, keepdims=True)
        return (rx * rg).sum(1) / np.sqrt((rx**2).sum(1) * (rg**2).sum(1))

    return float(np.std((rho(base) - rho(cand)) * 100, ddof=1))


def margin_z(confidence: float) -> float:
    """How many standard errors a trial's selection drop is raised by before it is held against the budget."""
    return NormalDist().inv_cdf(confidence)


def drop_bound(attrs: dict, z: float) -> float:
    """What decides whether a trained trial is inside the budget: its selection drop plus z standard errors (the
    margin is recomputed from the stored s.e., so a resumed study may change --confidence)."""
    return attrs["drop"] + z * attrs.get("drop_se", 0.0)


# ---- the search -----------------------------------------------------------------------------------------------


class Search:
    """One search: anchors, trials (probe, then maybe train), winner, report. Trial artefacts live in ``work``."""

    def __init__(self, cfg: SearchConfig, profile: DeviceProfile, work: Path, progress: Progress = silent,
                 on_latency=None):  # fmt: skip
        self.cfg, self.profile, self.work, self.progress, self.on_latency = cfg, profile, work, progress, on_latency
        self.t0 = time.perf_counter()
        self.memo: dict = {}
        self.last_float: tuple | None = None  # (torch stages, float export, model, reports) of the last probe build
        self.lm = load_model(cfg.model)
        self.spec = parse_eval(cfg.eval, self.lm.task)
        if self.spec.kind != "stsb":
            raise CompressError("compress search scores STS-B style pairs: pass --eval stsb:PATH")
        self.selection, self.heldout = split_eval(self.spec, cfg.holdout, work)
        self.labelled = read_labelled_pairs(cfg.train) if cfg.train else None
        self.calibration = _calibration_text(self.labelled)
        self.heldout_text = calibration_and_heldout(shipped_sentences())[1]  # the parity gate's sentences
        self.n_blocks = int(self.lm.config.num_hidden_layers)
        self.progress("calibrating the roofline on this host (GEMM efficiency by row count; cached)")
        self.roofline_cal = host_calibration(cfg.latency.threads)
        saved = work / "probes.json"
        self.probes: dict[str, dict] = json.loads(saved.read_text()) if saved.is_file() else {}

    def elapsed(self) -> float:
        return time.perf_counter() - self.t0

    # -- anchors ---------------------------------------------------------------------------------------------
    def anchors(self) -> Anchors:
        self.progress("anchors: fp32 export and ORT dynamic int8 of the original")
        fp32, _ = gated_export(self.lm, self.work / "anchor-fp32", self.heldout_text)
        stages = list(parse_recipe({"stages": [{"type": "quant.dynamic"}]}, "int8", "int8").stages)
        int8, _ = apply_onnx_stages(stages, fp32, self.work / "anchor-fp32", None)
        cos, gold = pair_cosines(fp32, self.lm, self.selection)
        a = Anchors(fp32, int8, spearman_x100(cos, gold), score(int8, self.lm, self.selection), cos)
        lat = self.time({"fp32": fp32, "ort-int8": int8})
        a.p50 = {k: v for k, v in lat.items()}
        self.progress(f"anchors: fp32 {a.fp32_score:.3f} / int8 {a.int8_score:.3f} on the selection split; p50 "
                      f"{a.p50['fp32']:.2f} / {a.p50['ort-int8']:.2f} ms")  # fmt: skip
        return a

    def time(self, models: dict[str, Path], runs: int | None = None) -> dict[str, float]:
        """p50 at the first shape: measured on this host, interleaved (or the roofline where it cannot measure)."""
        shape = self.cfg.latency.shapes[0]
        if self.profile.latency_source == "measured" and self.profile.kind == "cpu":
            cfg = dataclasses.replace(self.cfg.latency, shapes=(shape,), runs=runs or self.cfg.latency.runs)
            res = measure_latency(models, cfg)
            return {k: rows[0].p50_ms for k, rows in res.items()}
        return {k: self.estimate(p, True) for k, p in models.items()}

    def estimate(self, path: Path, calibrated: bool) -> float:
        """The roofline p50 of a graph on the search's target at its shape (calibrated on this host, or not)."""
        shape = self.cfg.latency.shapes[0]
        cal = self.roofline_cal if calibrated else None
        return estimate(path, self.profile, shape.batch, shape.seq, calibration=cal)["p50_ms"]

    # -- one trial -------------------------------------------------------------------------------------------
    def build(self, stages: list[dict], folder: Path, train: bool) -> tuple[Path, LoadedModel, list[dict]]:
        """Run a trial's recipe on a copy of the original: torch stages, gated export, ONNX stages. Untrained builds
        (probes) reuse the float export of the previous one when its torch stages were the same (the grid varies the
        precision innermost, so each structure is exported once)."""
        recipe = parse_recipe({"stages": stages}, folder.name, folder.name)
        torch_stages = [s for s in recipe.stages if s.type.level == "torch"]
        onnx_stages = [s for s in recipe.stages if s.type.level == "onnx"]
        key = json.dumps([s for s in stages if s["type"] not in {t.name for t in onnx_stages}], sort_keys=True)
        last = self.last_float
        if train or last is None or last[0] != key or not last[1].is_file():
            lm, reports = apply_torch_stages(torch_stages, copy.deepcopy(self.lm), self.calibration,
                                             self.progress if train else silent, labelled=self.labelled,
                                             memo=self.memo)  # fmt: skip
            float_path, _ = gated_export(lm, folder / "float", self.heldout_text,
                                         what="the float export of the candidate")  # fmt: skip
            if not train:
                shutil.rmtree(self.work / "probes" / "last-float", ignore_errors=True)
                shutil.copytree(float_path.parent, self.work / "probes" / "last-float")
                self.last_float = (key, self.work / "probes" / "last-float" / float_path.name, lm, reports)
        else:
            _, cached, lm, reports = last
            shutil.copytree(cached.parent, folder / "float", dirs_exist_ok=True)
            float_path = folder / "float" / cached.name
        ctx = onnx_context(onnx_stages, lm, self.calibration[:64])
        path, more = apply_onnx_stages(onnx_stages, float_path, folder / "float", ctx)
        return path, lm, reports + more

    def pick_precision(self, params: dict, stages: list[dict], path: Path, lm: LoadedModel, anchors: Anchors
                       ) -> tuple[dict, list[dict], Path, dict]:  # fmt: skip
        """The precision of a trained structure, chosen on its trained float export (``path``'s ``float/model.onnx``,
        where ``build`` exported it) by a longer interleaved measurement than the probes' (their 30 runs tell
        precisions within ~5% apart by chance): every allowed precision whose probe was within PRECISION_TIE of this
        structure's fastest is quantized and timed with the int8 anchor (PRECISION_RUNS runs). Returns (params,
        stages, artefact, timing row) of the fastest."""
        folder = path.parent  # build's float/ folder: the float export and the chosen precision's stages
        structure_stages = stages[: len(stages) - len(QUANT_STAGES[params["precision"]])]
        probed = {p: self.probes.get(arch_key({**params, "precision": p})) for p in self.space()["precision"]}
        fastest = min((r["p50_ms"] for r in probed.values() if r), default=None)
        options = {params["precision"]: (stages, path)}
        for p, row in probed.items():
            if p in options or row is None or fastest is None or row["p50_ms"] > PRECISION_TIE * fastest:
                continue
            onnx_stages = list(parse_recipe({"stages": QUANT_STAGES[p]}, p, p).stages)  # all ONNX-level
            work = folder.parent / f"precision-{p}"
            work.mkdir(parents=True, exist_ok=True)
            ctx = onnx_context(onnx_stages, lm, self.calibration[:64])
            alt_path, _ = apply_onnx_stages(onnx_stages, folder / "model.onnx", work, ctx)
            options[p] = (structure_stages + copy.deepcopy(QUANT_STAGES[p]), alt_path)
        models = {p: pth for p, (_, pth) in options.items()} | {"ort-int8": anchors.int8}
        lat = self.time(models, runs=max(self.cfg.latency.runs, PRECISION_RUNS))
        ratios = {p: lat[p] / lat["ort-int8"] for p in options}
        best = min(ratios, key=ratios.get)
        p50 = ratios[best] * anchors.p50["ort-int8"]
        timing = {"p50_ms": round(p50, 3), "ratio_int8": round(ratios[best], 4),
                  "ratio_fp32": round(p50 / anchors.p50["fp32"], 4),
                  "precision_ratios_int8": {p: round(r, 4) for p, r in ratios.items()}}  # fmt: skip
        return {**params, "precision": best}, options[best][0], options[best][1], timing

    def probe(self, params: dict, anchors: Anchors) -> dict:
        """Time an architecture before any training (the weights' values do not change latency): structure from the
        original weights, export, quantization, p50 interleaved with the int8 anchor. Cached per architecture."""
        key = arch_key(params)
        if key in self.probes:
            return self.probes[key]
        folder = self.work / "probes" / key
        shutil.rmtree(folder, ignore_errors=True)
        path, _, _ = self.build(trial_stages(params, self.n_blocks, 0, False, "original", train=False), folder, False)
        lat = self.time({"candidate": path, "ort-int8": anchors.int8})
        ratio = lat["candidate"] / lat["ort-int8"]
        p50 = ratio * anchors.p50["ort-int8"]  # on the anchors' scale
        row = {"params": params, "p50_ms": round(p50, 3), "ratio_int8": round(ratio, 4),
               "ratio_fp32": round(p50 / anchors.p50["fp32"], 4), "mb": round(file_bytes(path) / 1e6, 2)}  # fmt: skip
        if self.profile.latency_source == "measured":  # the roofline beside the measurement: how well it ranks
            row["roofline_ms"] = round(self.estimate(path, False), 3)
            row["roofline_calibrated_ms"] = round(self.estimate(path, True), 3)
        self.probes[key] = row
        shutil.rmtree(folder, ignore_errors=True)
        write_text(self.work / "probes.json", json.dumps(self.probes, indent=1))
        return row

    def probe_grid(self, anchors: Anchors) -> list[dict]:
        """Phase 1: time the architectures of the space (within PROBE_SHARE of the budget), fastest first."""
        grid = [dict(zip(self.space(), combo)) for combo in itertools.product(*self.space().values())]
        for i, params in enumerate(grid):
            if arch_key(params) not in self.probes:
                if self.elapsed() > PROBE_SHARE * self.cfg.budget_s:
                    self.progress(f"probing stopped at {i}/{len(grid)} architectures: {PROBE_SHARE:.0%} of the budget")
                    break
                row = self.probe(params, anchors)
                self.progress(f"probe {i + 1}/{len(grid)} {params}: {row['ratio_int8']:.2f}x int8, "
                              f"{row['ratio_fp32']:.2f}x fp32")  # fmt: skip
        return sorted(self.probes.values(), key=lambda r: r["p50_ms"])

    def trial(self, trial, anchors: Anchors, best: dict | None, trained: set[str]) -> tuple[float, float]:
        import optuna

        params = {k: trial.suggest_categorical(k, list(v)) for k, v in self.space().items()}
        probe = self.probe(params, anchors)
        for k in ("p50_ms", "ratio_int8", "ratio_fp32", "mb", "roofline_ms", "roofline_calibrated_ms"):
            if k in probe:
                trial.set_user_attr(k, probe[k])
        consistent = params["precision"] in BATCH_CONSISTENT
        why = None
        if arch_key(params) in trained:
            why = "trained already in this study"
        elif best is not None and probe["ratio_int8"] >= probed_ratio(best):
            why = f"p50 {probe['ratio_int8']:.2f}x int8 >= the best model inside the budget ({probed_ratio(best):.2f}x)"
        elif not consistent and not self.cfg.allow_batch_dependent:
            why = "batch-dependent precision (pass --allow-batch-dependent to consider it)"
        if why:
            trial.set_user_attr("skipped", why + ": not trained")
            raise optuna.TrialPruned()
        labelled = self.labelled is not None
        teacher = self.cfg.teacher if labelled else "original"
        stages = trial_stages(params, self.n_blocks, self.cfg.steps, labelled, teacher)
        self.progress(f"trial {trial.number}: {params}: {probe['ratio_int8']:.2f}x int8 ({probe['p50_ms']:.1f} ms): "
                      "training")  # fmt: skip
        folder = self.work / "trials" / f"{trial.number:03d}"
        shutil.rmtree(folder, ignore_errors=True)
        path, lm, reports = self.build(stages, folder, train=True)
        chosen, stages, path, timing = self.pick_precision(params, stages, path, lm, anchors)
        if chosen["precision"] != params["precision"]:
            self.progress(f"trial {trial.number}: {chosen['precision']} is faster on the trained model "
                          f"({timing['ratio_int8']:.2f}x int8)")  # fmt: skip
        probe = {**probe, **timing}
        for k, v in timing.items():
            trial.set_user_attr(k, v)
        trial.set_user_attr("precision", chosen["precision"])
        chosen_probe = self.probes.get(arch_key(chosen), probe)  # compared with other probes (same runs, same load)
        trial.set_user_attr("probe_p50_ms", chosen_probe["p50_ms"])
        trial.set_user_attr("probe_ratio_int8", chosen_probe["ratio_int8"])
        consistent = chosen["precision"] in BATCH_CONSISTENT
        cos, gold = pair_cosines(path, self.lm, self.selection)
        sel = spearman_x100(cos, gold)
        drop = anchors.fp32_score - sel
        se = drop_se(anchors.fp32_cosines, cos, gold)
        margin = margin_z(self.cfg.confidence) * se
        attrs = {"selection_score": round(sel, 3), "drop": round(drop, 3), "drop_se": round(se, 3),
                 "mb": round(file_bytes(path) / 1e6, 2),
                 "stages": stages, "path": str(path), "batch_consistent": consistent,
                 "fidelity": round(self.fidelity(path, anchors), 4),
                 "train_minutes": round(sum(r["metrics"].get("training_minutes", 0) for r in reports), 2)}  # fmt: skip
        for k, v in attrs.items():
            trial.set_user_attr(k, v)
        self.progress(f"trial {trial.number}: selection drop {drop:+.3f} (+ margin {margin:.3f} = {drop + margin:+.3f} "
                      f"against the budget), {probe['ratio_int8']:.2f}x int8, "
                      f"{attrs['mb']:.1f} MB, fidelity to the original {attrs['fidelity']:.3f}")  # fmt: skip
        return drop, probe["ratio_int8"]

    def fidelity(self, path: Path, anchors: Anchors) -> float:
        """Mean cosine of the candidate's embeddings to the original fp32 export's on held-out shipped sentences:
        whether an index built with the original still works (a task loss may rotate the space)."""
        tok, task, n = self.lm.tokenizer, self.lm.task, self.lm.max_length
        a = ort_outputs(cpu_session(anchors.fp32, 0), tok, self.heldout_text, task, n)
        b = ort_outputs(cpu_session(path, 0), tok, self.heldout_text, task, n)
        return float(row_cosine(a, b).mean())

    def space(self) -> dict[str, tuple]:
        """The search space for this model: no more blocks than it has; batch-dependent precisions only when the
        user allowed them."""
        space = dict(SPACE)
        space["blocks"] = tuple(b for b in SPACE["blocks"] if b <= self.n_blocks)
        if not self.cfg.allow_batch_dependent:
            space["precision"] = tuple(p for p in SPACE["precision"] if p in BATCH_CONSISTENT)
        return space


def _calibration_text(labelled) -> list[str]:
    """Unlabelled sentences for calibration and distillation: the --train sentences, or the shipped ones."""
    if labelled is None:
        return calibration_and_heldout(shipped_sentences())[0]
    rng = np.random.default_rng(0)
    texts = labelled.first + labelled.second
    return [texts[i] for i in rng.permutation(len(texts))[:2048]]


def roofline_rank(rows: list[dict]) -> dict | None:
    """Spearman rank correlation of the roofline's p50 (plain and calibrated) with the measured p50 over the probes:
    how far the analytic ranking can be trusted where nothing can be measured."""
    probes = [r for r in rows if "roofline_ms" in r and "p50_ms" in r]
    if len(probes) < 3:
        return None
    measured = [r["p50_ms"] for r in probes]
    return {
        "probes": len(probes),
        "spearman_plain": round(float(spearmanr(measured, [r["roofline_ms"] for r in probes]).statistic), 3),
        "spearman_calibrated": round(
            float(spearmanr(measured, [r["roofline_calibrated_ms"] for r in probes]).statistic), 3
        ),
        "ratio_plain": [round(r["roofline_ms"] / r["p50_ms"], 2) for r in probes],
        "ratio_calibrated": [round(r["roofline_calibrated_ms"] / r["p50_ms"], 2) for r in probes],
    }


def arch_key(params: dict) -> str:
    return "-".join(f"{k}{params[k]}" for k in sorted(params))


STRUCTURE = ("blocks", "ffn_keep", "heads_keep")  # what a trial keeps of the model; more kept = no larger drop


def structure(params: dict) -> tuple:
    return tuple(params[k] for k in STRUCTURE if k in params)


def keeps_as_much(a: tuple, b: tuple) -> bool:
    """Structure ``a`` keeps at least what ``b`` keeps in every dimension."""
    return all(x >= y for x, y in zip(a, b))


def next_params(probes: list[dict], done: list, max_drop: float, consistent_only: bool, z: float = 0.0) -> dict | None:
    """The next architecture to train, by bisection over the probed architectures (fastest first) that can still win.

    Two facts shrink the list after every trained trial: accuracy is monotone in structure (an architecture that
    keeps no more blocks, FFN neurons and heads than one already outside the budget is outside it too: not trained),
    and the precision barely moves accuracy (every structure is tried at its fastest allowed precision). A trained
    candidate inside the budget removes everything slower than it. The candidate in the middle of what is left (by
    p50) is trained next; None when nothing is left (then the sampler proposes)."""
    allowed = sorted((p for p in probes if p["params"]["precision"] in BATCH_CONSISTENT or not consistent_only),
                     key=lambda r: r["p50_ms"])  # fmt: skip
    trained = {arch_key(t.params): t for t in done if "drop" in t.user_attrs}
    outside = [structure(t.params) for t in trained.values() if drop_bound(t.user_attrs, z) > max_drop]
    best = min((probed_p50(t.user_attrs) for t in trained.values() if feasible(t, max_drop, consistent_only, z)),
               default=float("inf"))  # fmt: skip
    fastest: dict[tuple, dict] = {}
    for p in allowed:
        fastest.setdefault(structure(p["params"]), p)
    left = [p for s, p in fastest.items()
            if p["p50_ms"] < best and arch_key(p["params"]) not in trained
            and not any(keeps_as_much(o, s) for o in outside)]  # fmt: skip
    return left[len(left) // 2]["params"] if left else None


def probed_p50(attrs: dict) -> float:
    """A trained trial's p50 as its probe measured it: what the untrained probes are compared with (a trained trial's
    own p50 comes from a longer re-timing, at another moment of the host's load, and is not on the probes' scale)."""
    return attrs.get("probe_p50_ms", attrs["p50_ms"])


def probed_ratio(attrs: dict) -> float:
    return attrs.get("probe_ratio_int8", attrs["ratio_int8"])


def feasible(t, max_drop: float, consistent_only: bool, z: float = 0.0) -> bool:
    a = t.user_attrs
    return "drop" in a and drop_bound(a, z) <= max_drop and (a.get("batch_consistent") or not consistent_only)


def pareto(rows: list[dict]) -> list[dict]:
    """Non-dominated trained trials over (drop, p50, MB), all minimised."""
    keys = ("drop", "p50_ms", "mb")
    front = []
    for r in rows:
        dominated = any(all(o[k] <= r[k] for k in keys) and any(o[k] < r[k] for k in keys) for o in rows if o is not r)
        if not dominated:
            front.append(r)
    return sorted(front, key=lambda r: r["p50_ms"])


def storage_for(spec: str | None, default: Path):
    """Optuna storage: an RDB URL (sqlite:///..., postgresql://...) or journal:FILE (default: ``default``)."""
    import optuna
    from optuna.storages.journal import JournalFileBackend

    if spec and not spec.startswith("journal:"):
        return spec  # optuna takes RDB URLs as they are
    path = Path(spec[len("journal:") :]) if spec else default
    path.parent.mkdir(parents=True, exist_ok=True)
    return optuna.storages.JournalStorage(JournalFileBackend(str(path)))


def study_name(cfg: SearchConfig) -> str:
    if cfg.study:
        return cfg.study
    key = json.dumps(
        [
            cfg.model,
            cfg.target,
            cfg.eval,
            str(cfg.holdout),
            cfg.train,
            cfg.steps,
            SPACE,
            cfg.allow_batch_dependent,
            cfg.teacher,
            (Recover.teacher_steps, Recover.teacher_learning_rate),
        ],
        default=str,
    )
    slug = re.sub(r"[^A-Za-z0-9_.-]+", "-", Path(cfg.model).name).strip("-")
    return f"{slug}-{Path(cfg.target).stem}-{hashlib.sha1(key.encode()).hexdigest()[:8]}"


def default_out(cfg: SearchConfig) -> Path:
    return (
        cfg.out
        or Path("runs") / f"{re.sub(r'[^A-Za-z0-9_.-]+', '-', Path(cfg.model).name)}-search-{Path(cfg.target).stem}"
    )


def search(cfg: SearchConfig, progress: Progress = silent) -> tuple[Path, dict]:
    """Check the inputs before any heavy work, then run the search (``run_search``)."""
    profile = load_profile(cfg.target)
    if profile.kind == "gpu" or (profile.kind == "cpu" and profile.latency_source != "measured"):
        raise CompressError(
            f"compress search measures the cpu target or ranks NPU targets by the roofline; "
            f"'{profile.name}' is neither: use --target cpu or an npu-* profile"
        )
    if not 0 <= cfg.max_drop:
        raise CompressError("--max-drop must be >= 0: it is the accuracy drop you accept")
    if not 0.5 <= cfg.confidence < 1:
        raise CompressError("--confidence must be in [0.5, 1): 0.5 takes the selection drop as it is, 0.6 adds 0.25 "
                            "standard errors")  # fmt: skip
    spec = parse_eval(cfg.eval, detect_task(resolve_path(cfg.model)))
    if spec.kind != "stsb":
        raise CompressError("compress search scores STS-B style pairs: pass --eval stsb:PATH")
    read_stsb(spec.path)
    if cfg.holdout is not None:
        read_stsb(cfg.holdout)
    if cfg.train:
        read_labelled_pairs(cfg.train)
    check_out_dir(default_out(cfg), cfg.force)
    return run_search(cfg, profile, progress)


def run_search(cfg: SearchConfig, profile: DeviceProfile, progress: Progress = silent) -> tuple[Path, dict]:
    """Search, pick, check on the held-out split, write the folder (report.json/md, frontier.png, winner.toml and
    the winner's artefact). The study storage and trial artefacts persist beside --out, so a rerun resumes."""
    import optuna

    out = default_out(cfg)
    keep = out.parent / f".{out.name}.search"  # trial artefacts: kept between runs of one study
    keep.mkdir(parents=True, exist_ok=True)
    storage = storage_for(cfg.storage, out.parent / f"{out.name}.journal")
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    search = Search(cfg, profile, keep, progress)
    anchors = search.anchors()
    study = optuna.create_study(study_name=study_name(cfg), storage=storage, load_if_exists=True,
                                directions=["minimize", "minimize"],
                                sampler=optuna.samplers.TPESampler(seed=cfg.seed, multivariate=True))  # fmt: skip
    consistent_only = not cfg.allow_batch_dependent
    z = margin_z(cfg.confidence)
    probes = search.probe_grid(anchors)
    per_trial: list[float] = []
    started = sum("drop" in t.user_attrs for t in study.trials)
    skips = 0
    while True:
        done = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
        inside = [t for t in done if feasible(t, cfg.max_drop, consistent_only, z)]
        best = min(inside, key=lambda t: t.user_attrs["ratio_int8"]).user_attrs if inside else None
        trained = {arch_key(t.params) for t in done}
        left = cfg.budget_s - search.elapsed()
        # The next trial's cost, with 10% to spare: the slowest trained trial after the first (the first also tuned
        # the teacher, which is memoised for the rest).
        next_cost = 1.1 * max(per_trial[1:] or per_trial, default=0.0)
        if (cfg.trials and len(done) - started >= cfg.trials) or left < next_cost \
                or left <= 0 or skips >= MAX_SKIPS:  # fmt: skip
            break
        params = next_params(probes, done, cfg.max_drop, consistent_only, z)
        if params is not None:  # the bisection over the probed architectures is still open: it decides
            study.enqueue_trial(params)
        frontier = f"best inside the budget: {best['ratio_int8']:.2f}x int8, drop {best['drop']:+.2f}" if best else \
            "nothing inside the budget yet"  # fmt: skip
        if not skips:
            progress(f"== trained {len(done) - started}{'/' + str(cfg.trials) if cfg.trials else ''}, "
                     f"{search.elapsed() / 60:.1f} of {cfg.budget_s / 60:.0f} min; {frontier}")  # fmt: skip
        t = time.perf_counter()
        study.optimize(lambda tr: search.trial(tr, anchors, best, trained), n_trials=1, catch=())
        if study.trials[-1].state == optuna.trial.TrialState.PRUNED:
            skips += 1
        else:
            skips = 0
            per_trial.append(time.perf_counter() - t)
    return finish(cfg, search, anchors, study, out, progress)


def finish(
    cfg: SearchConfig, search: Search, anchors: Anchors, study, out: Path, progress: Progress
) -> tuple[Path, dict]:
    import optuna

    consistent_only = not cfg.allow_batch_dependent
    trials = [t for t in study.trials if t.state in (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)]
    rows = [{"trial": t.number, **t.params, **{k: v for k, v in t.user_attrs.items() if k not in ("stages",)},
             "state": t.state.name.lower()} for t in trials]  # fmt: skip
    trained = [r for r in rows if "drop" in r]
    z = margin_z(cfg.confidence)
    inside = [t for t in trials if feasible(t, cfg.max_drop, consistent_only, z)]
    winner = min(inside, key=lambda t: t.user_attrs["p50_ms"]) if inside else None
    report: dict = {
        "schema": 1, "kind": "search", "model": cfg.model, "target": cfg.target, "max_drop": cfg.max_drop,
        "confidence": cfg.confidence,
        "eval": cfg.eval, "selection": str(search.selection), "heldout": str(cfg.holdout or "odd rows of --eval"),
        "train": cfg.train, "study": study.study_name, "trials": rows,
        "anchors": {"fp32": {"selection_score": round(anchors.fp32_score, 3), "p50_ms": round(anchors.p50["fp32"], 3)},
                    "ort-int8": {"selection_score": round(anchors.int8_score, 3),
                                 "p50_ms": round(anchors.p50["ort-int8"], 3)}},  # fmt: skip
        "frontier": [r["trial"] for r in pareto(trained)],
        "architectures": sorted(search.probes.values(), key=lambda r: r["p50_ms"]),
        "roofline_rank": roofline_rank(list(search.probes.values())),
        "latency_source": "measured" if search.profile.latency_source == "measured" else "analytic",
        "shape": str(cfg.latency.shapes[0]), "seconds": round(search.elapsed(), 1), "host": host_info().as_dict(),
        "versions": versions(), "consistent_only": consistent_only,
    }  # fmt: skip
    with staged_folder(out, cfg.force, progress=progress) as (staging, _):
        if winner is not None:
            w = winner.user_attrs
            progress(f"winner: trial {winner.number}; scoring it on the held-out split")
            path = Path(w["path"])
            if not path.is_file():  # a trial another worker ran: rebuild it from its recipe here
                progress(f"winner: trial {winner.number}'s artefact is not on this machine: rebuilding it")
                path, _, _ = search.build(w["stages"], search.work / "winner-rebuild", train=True)
            fp32_held = score(anchors.fp32, search.lm, search.heldout)
            held = score(path, search.lm, search.heldout)
            params = {**winner.params, "precision": w.get("precision", winner.params.get("precision"))}
            report["winner"] = {"trial": winner.number, "params": params, "selection_drop": w["drop"],
                                "selection_drop_se": w.get("drop_se"),
                                "heldout_score": round(held, 3), "heldout_fp32": round(fp32_held, 3),
                                "heldout_drop": round(fp32_held - held, 3),
                                "inside_budget": fp32_held - held <= cfg.max_drop, "p50_ms": w["p50_ms"],
                                "ratio_int8": w["ratio_int8"], "ratio_fp32": w["ratio_fp32"], "mb": w["mb"],
                                "recipe": "winner.toml"}  # fmt: skip
            write_text(staging / "winner.toml", recipe_toml(
                "search-winner", f"compress search winner (trial {winner.number}) for {cfg.model} on {cfg.target}",
                w["stages"]))  # fmt: skip
            lm = search.lm  # the winner in the folder layout every consumer loads (README, "What lands ...")
            write_encoder_layout(path, path.parent, lm.path, staging / "winner", lm.task == "sentence-embedding",
                                 lm.max_length)  # fmt: skip
        else:
            report["winner"] = None
        (staging / "report.json").write_text(json.dumps(report, indent=2, default=str) + "\n")
        (staging / "report.md").write_text(markdown(report))
        plot_frontier(report, staging / "frontier.png")
    return out, report


def markdown(report: dict) -> str:
    a = report["anchors"]
    lines = [f"# Compression search: {report['model']} on {report['target']}", "",
             f"Budget: drop <= {report['max_drop']} points of STS-B Spearman x100 (selection split of {report['eval']}); "
             f"inside means drop + z({report.get('confidence', 0.5)}) x its bootstrap s.e. <= the budget; "
             f"latency {report['latency_source']} at {report['shape']}; study `{report['study']}`; "
             f"{len(report['trials'])} trials in {report['seconds'] / 60:.1f} min.", ""]  # fmt: skip
    w = report["winner"]
    if w:
        verdict = "inside" if w["inside_budget"] else "OUTSIDE"
        lines += ["## Winner", "", f"Trial {w['trial']} {w['params']}: p50 {w['p50_ms']:.2f} ms = {w['ratio_fp32']:.2f}x "
                  f"fp32 and {w['ratio_int8']:.2f}x ORT dynamic int8; {w['mb']:.1f} MB. Drop on the selection split "
                  f"{w['selection_drop']:+.3f} (bootstrap s.e. {w.get('selection_drop_se') or 0:.3f}); **on the held-out split (never scored by the search) {w['heldout_drop']:+.3f} "
                  f"({w['heldout_score']:.3f} vs fp32 {w['heldout_fp32']:.3f}): {verdict} the budget**. Reproduce: "
                  "`compress run MODEL --recipe winner.toml --train ...`.", ""]  # fmt: skip
    else:
        lines += ["## Winner", "", "No trained trial stayed inside the budget on the selection split.", ""]
    rr = report.get("roofline_rank")
    if rr:
        lines += [f"Roofline vs measurement over {rr['probes']} probes: Spearman {rr['spearman_plain']} (fixed "
                  f"efficiency) / {rr['spearman_calibrated']} (calibrated on this host); estimate / measured "
                  f"{min(rr['ratio_calibrated'])}-{max(rr['ratio_calibrated'])} calibrated vs "
                  f"{min(rr['ratio_plain'])}-{max(rr['ratio_plain'])} plain.", ""]  # fmt: skip
    lines += ["## Architectures timed before training (fastest first)", "",
              "| blocks | FFN kept | heads kept | precision | p50 ms | x fp32 | x int8 | MB | roofline ms (plain / calibrated) |",
              "|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for r in report["architectures"]:
        p = r["params"]
        roof = f"{r['roofline_ms']:.2f} / {r['roofline_calibrated_ms']:.2f}" if "roofline_ms" in r else ""
        lines.append(f"| {p['blocks']} | {p['ffn_keep']} | {p['heads_keep']} | {p['precision']} | {r['p50_ms']:.2f} | "
                     f"{r['ratio_fp32']:.2f} | {r['ratio_int8']:.2f} | {r['mb']:.1f} | {roof} |")  # fmt: skip
    lines += ["", "## Trials (frontier marked *)", "",
              "| trial | blocks | FFN kept | heads kept | precision | selection drop (s.e.) | fidelity | p50 ms | x fp32 | x int8 | MB | state |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|",
              f"| anchor fp32 | | | | fp32 | 0 | 1.0000 | {a['fp32']['p50_ms']:.2f} | 1.00 | | | |",
              f"| anchor ORT int8 | | | | int8-dynamic | {a['fp32']['selection_score'] - a['ort-int8']['selection_score']:+.3f} | | "
              f"{a['ort-int8']['p50_ms']:.2f} | {a['ort-int8']['p50_ms'] / a['fp32']['p50_ms']:.2f} | 1.00 | | |"]  # fmt: skip
    for r in report["trials"]:
        star = "*" if r["trial"] in report["frontier"] else ""
        drop = f"{r['drop']:+.3f} ({r.get('drop_se', 0):.3f})" if "drop" in r else r.get("skipped", "")
        num = lambda k, d=2: f"{r[k]:.{d}f}" if isinstance(r.get(k), (int, float)) else ""
        lines.append(f"| {r['trial']}{star} | {r.get('blocks')} | {r.get('ffn_keep')} | {r.get('heads_keep')} | "
                     f"{r.get('precision')} | {drop} | {num('fidelity', 4)} | {num('p50_ms')} | {num('ratio_fp32')} | "
                     f"{num('ratio_int8')} | {num('mb', 1)} | {r['state']} |")  # fmt: skip
    return "\n".join(lines) + "\n"


def plot_frontier(report: dict, path: Path) -> None:
    """Selection drop vs p50 for every trained trial (marker area = MB), the frontier joined, the anchors marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in report["trials"] if "drop" in r]
    fig, ax = plt.subplots(figsize=(6.4, 4.4), dpi=120)
    a = report["anchors"]
    base = a["fp32"]["selection_score"]
    for label, key, color in (("fp32", "fp32", "tab:gray"), ("ORT int8", "ort-int8", "tab:orange")):
        ax.scatter([a[key]["p50_ms"]], [base - a[key]["selection_score"]], marker="s", color=color, label=label)
    if rows:
        ax.scatter([r["p50_ms"] for r in rows], [r["drop"] for r in rows], s=[20 + 6 * r["mb"] for r in rows],
                   alpha=0.5, color="tab:blue", label="trials")  # fmt: skip
        front = [r for r in rows if r["trial"] in report["frontier"]]
        ax.plot([r["p50_ms"] for r in front], [r["drop"] for r in front], "-", color="tab:blue", alpha=0.6)
    ax.axhline(report["max_drop"], color="tab:red", ls="--", lw=1, label="budget")
    if report.get("winner"):
        w = report["winner"]
        ax.scatter([w["p50_ms"]], [w["heldout_drop"]], marker="*", s=220, color="tab:green", label="winner, held out")
    ax.set_xlabel(f"p50 at {report['shape']} (ms, {report['latency_source']})")
    ax.set_ylabel("STS-B drop vs fp32 (points, selection split)")
    ax.set_title(f"{report['model']} on {report['target']}: search frontier", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
