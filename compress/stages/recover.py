"""``recover``: train a structurally pruned model back toward the original (or toward the task), after
``prune.layers`` / one-shot ``prune.gradual`` channels or heads.

Loss per step, on a batch of B labelled pairs from --train (2B sentences) or of B unlabelled calibration sentences:

    task_loss      * CoSENT(cos(student(a), student(b)), gold)            labels only (Su 2022)
  + embedding_loss * mean(1 - cos(student output, teacher output))        every sentence (a causal LM: the
                                                                          next-token KL(teacher || student)
                                                                          over real tokens)
  + hidden_loss    * mean_j ||h_s[j] - h_t[m(j)]||^2 / ||h_t[m(j)]||^2   over real tokens (intermediate layers)

m(j), the teacher hidden state student block j is held to: with ``prune.layers``' kept blocks k_0 < k_1 < ...,
block j answers for the segment of teacher blocks up to k_{j+1} - 1 (the last block for the teacher's last):
"segment-end" mapping, as in the depth-pruning recovery of Sajjad et al. / LLM-Pruner. Without depth pruning m(j) =
j. The teacher is the untouched original, or (``teacher = "tuned"``) the original first fine-tuned on the --train
pairs with CoSENT for ``teacher_steps`` steps (computed once per process and reused: a search's trials share it).
AdamW (weight decay 0.01), linear warm-up over ``warmup`` of the steps then constant, gradient norm clipped at 1,
word / position embeddings frozen by default. Sentences are length-bucketed inside a batch (same maths, fewer padded
tokens). ``minutes`` > 0 stops early at that wall time and says so.
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass

import numpy as np

from compress.core.evaluate import EMBEDDING_TASKS
from compress.core.numerics import task_output
from compress.stages.base import StageError, TorchContext
from compress.stages.distil import cosent, distil_loss, training
from compress.stages.structure import blocks, transformer

TEACHERS = ("original", "tuned")


@dataclass(frozen=True)
class Recover:
    steps: int = 400
    learning_rate: float = 1e-4
    batch_size: int = 32  # labelled pairs per step (2x sentences), or sentences without labels
    warmup: float = 0.05  # share of the steps with a linearly rising learning rate
    task_loss: float = 1.0  # CoSENT weight on the --train pairs; 0: distillation only (no labels needed)
    embedding_loss: float = 1.0
    hidden_loss: float = 1.0
    teacher: str = "original"  # original | tuned (fine-tuned on the --train pairs first)
    # MiniLM on STS-B train (selection / held-out halves of dev, torch): original 86.45 / 86.97; 100 steps at 5e-5
    # 87.04 / 86.79; 300 at 2e-5 86.55 / 86.54; 300 at 5e-5 87.84 / 88.02; 300 at 1e-4 87.89 / 88.31; 600 at 5e-5
    # 87.65 / 87.99 (3.5 min per 300 steps on 2 cores; `python benchmarks/teacher.py STEPS:LR ...`). A stronger
    # teacher is what lets 3-block students recover.
    teacher_steps: int = 300
    teacher_learning_rate: float = 1e-4
    freeze_embeddings: bool = True
    minutes: float = 0.0  # wall-time budget (0: none)
    seed: int = 0

    def __post_init__(self) -> None:
        if self.steps < 1 or self.batch_size < 2 or self.learning_rate <= 0 or not 0 <= self.warmup < 1:
            raise StageError("recover: need steps >= 1, batch_size >= 2, learning_rate > 0, 0 <= warmup < 1")
        if min(self.task_loss, self.embedding_loss, self.hidden_loss) < 0 or not (
            self.task_loss or self.embedding_loss or self.hidden_loss
        ):
            raise StageError("recover: loss weights must be >= 0 and one of them > 0")
        if self.teacher not in TEACHERS:
            raise StageError(f"recover: teacher='{self.teacher}' is not one of {', '.join(TEACHERS)}")
        if self.teacher_steps < 1 or self.minutes < 0:
            raise StageError("recover: teacher_steps must be >= 1 and minutes >= 0")


def recover_needs(cfg: Recover) -> frozenset[str]:
    labels = cfg.task_loss > 0 or cfg.teacher == "tuned"
    return frozenset({"original", *(("labels",) if labels else ())})


def forward(lm, enc, hidden: bool):
    """(task output, hidden states or None) of a tokenized batch, with gradients."""
    if lm.task == "sentence-embedding":
        config = transformer(lm).config
        before = config.output_hidden_states
        config.output_hidden_states = hidden  # sentence-transformers then returns all_layer_embeddings
        try:
            features = lm.model(dict(enc))
        finally:
            config.output_hidden_states = before
        return features["sentence_embedding"], features.get("all_layer_embeddings") if hidden else None
    if lm.task == "text-generation":  # next-token logits (B, T, V); the hidden states of the decoder
        res = lm.model(**enc, output_hidden_states=hidden, use_cache=False)
        return res.logits, res.hidden_states if hidden else None
    res = lm.model(**enc, output_hidden_states=hidden)
    outputs = (
        {"logits": res.logits} if lm.task == "text-classification" else {"last_hidden_state": res.last_hidden_state}
    )
    return task_output(outputs, enc["attention_mask"], lm.task), res.hidden_states if hidden else None


def hidden_map(kept: tuple[int, ...], n_student: int, n_teacher: int) -> list[int]:
    """Teacher hidden-state index (1-based over block outputs) each student block output is held to."""
    if not kept:
        return list(range(1, n_student + 1))
    return [kept[j + 1] for j in range(len(kept) - 1)] + [n_teacher]


def _batches(texts: list[str], size: int, rng: np.random.Generator):
    order, cursor = rng.permutation(len(texts)), 0
    while True:
        if cursor + size > len(order):
            order, cursor = rng.permutation(len(texts)), 0
        yield order[cursor : cursor + size]
        cursor += size


def _encode_bucketed(lm, sentences: list[str], chunk: int, hidden: bool):
    """Forward length-sorted chunks (each padded to its own length); outputs back in input order. A causal LM's
    per-token logits cannot be concatenated across lengths: its batch goes through in one piece."""
    import torch

    if lm.task == "text-generation":
        enc = lm.tokenizer(sentences, padding=True, truncation=True, max_length=lm.max_length, return_tensors="pt")
        out, h = forward(lm, enc, hidden)
        return out, [(enc["attention_mask"], h, np.arange(len(sentences)))]
    by_len = np.argsort([len(s) for s in sentences], kind="stable")
    outs, masks, hs, order = [], [], [], []
    for c in range(0, len(sentences), chunk):
        pos = by_len[c : c + chunk]
        enc = lm.tokenizer([sentences[p] for p in pos], padding=True, truncation=True, max_length=lm.max_length,
                           return_tensors="pt")  # fmt: skip
        out, h = forward(lm, enc, hidden)
        outs.append(out)
        masks.append(enc["attention_mask"])
        hs.append(h)
        order.append(pos)
    inverse = torch.from_numpy(np.argsort(np.concatenate(order), kind="stable"))
    return torch.cat(outs)[inverse], list(zip(masks, hs, order))


def _tuned_teacher(ctx: TorchContext, cfg: Recover):
    """The original fine-tuned on the labelled pairs with CoSENT (memoised per process)."""
    import torch

    pairs = ctx.labelled
    key = ("recover.tuned-teacher", len(pairs.scores), pairs.first[0], cfg.teacher_steps, cfg.teacher_learning_rate,
           cfg.seed)  # fmt: skip
    memo = ctx.memo if ctx.memo is not None else {}
    if key in memo:
        return memo[key]
    teacher = copy.deepcopy(ctx.original)
    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    params = [p for p in teacher.model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.teacher_learning_rate, weight_decay=0.01)
    teacher.model.train()
    batches = _batches(list(range(len(pairs.scores))), cfg.batch_size, rng)
    for step in range(cfg.teacher_steps):
        idx = next(batches)
        sentences = [pairs.first[i] for i in idx] + [pairs.second[i] for i in idx]
        emb, _ = _encode_bucketed(teacher, sentences, 16, False)
        loss = cosent(emb[: len(idx)], emb[len(idx) :], torch.tensor([pairs.scores[i] for i in idx]))
        opt.zero_grad()
        loss.backward()
        opt.step()
        if ctx.progress and (step + 1) % max(cfg.teacher_steps // 5, 1) == 0:
            ctx.progress(f"  teacher fine-tuning on the --train pairs: step {step + 1}/{cfg.teacher_steps}")
    teacher.model.eval()
    memo[key] = teacher
    return teacher


@training
def apply_recover(cfg: Recover, lm, ctx: TorchContext):
    import torch

    labelled = cfg.task_loss > 0 or cfg.teacher == "tuned"
    if labelled and lm.task not in EMBEDDING_TASKS:
        raise StageError(f"recover: the task loss takes sentence-pair labels (STS-B); this model is {lm.task}: "
                         "set task_loss = 0 and teacher = 'original'")  # fmt: skip
    if ctx.original is None or (labelled and ctx.labelled is None):
        raise StageError("recover needs the original model and, for its task loss, --train stsb:PATH")
    t0 = time.perf_counter()
    lm_logits = lm.task == "text-generation"
    teacher = _tuned_teacher(ctx, cfg) if cfg.teacher == "tuned" else ctx.original
    n_student = len(blocks(lm)) if cfg.hidden_loss else 0
    n_teacher = len(blocks(teacher)) if cfg.hidden_loss else 0
    targets = hidden_map(lm.kept_blocks, n_student, n_teacher) if cfg.hidden_loss else []
    pairs = ctx.labelled if labelled else None
    texts = list(ctx.calibration)
    n_items = len(pairs.scores) if pairs else len(texts)
    if n_items < cfg.batch_size:
        raise StageError(f"recover: {n_items} training items < batch_size {cfg.batch_size}: pass more --data / --train")

    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    if cfg.freeze_embeddings:  # a decoder's token embeddings (tied to its LM head in small LMs)
        model = transformer(lm)
        embeddings = model.get_input_embeddings() if lm_logits else model.embeddings
        for p in embeddings.parameters():
            p.requires_grad_(False)
    params = [p for p in lm.model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.learning_rate, weight_decay=0.01)
    warm = max(1, int(cfg.warmup * cfg.steps))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warm))
    batches = _batches(list(range(n_items)), cfg.batch_size, rng)
    trajectory, stopped, step = [], None, 0
    lm.model.train()
    try:
        for step in range(1, cfg.steps + 1):
            idx = next(batches)
            sentences = (
                [pairs.first[i] for i in idx] + [pairs.second[i] for i in idx] if pairs else [texts[i] for i in idx]
            )
            emb, chunks = _encode_bucketed(lm, sentences, 16, bool(cfg.hidden_loss))
            parts = {}
            if pairs is not None and cfg.task_loss:
                gold = torch.tensor([pairs.scores[i] for i in idx])
                parts["task"] = cosent(emb[: len(idx)], emb[len(idx) :], gold)
            if cfg.embedding_loss or cfg.hidden_loss:
                with torch.no_grad():
                    ref, ref_chunks = _encode_bucketed(teacher, sentences, 16, bool(cfg.hidden_loss))
                if cfg.embedding_loss:  # a causal LM: next-token KL over the real tokens
                    parts["embedding"] = distil_loss(emb, ref, lm.task, chunks[0][0] if lm_logits else None)
                if cfg.hidden_loss:
                    parts["hidden"] = _hidden_loss(chunks, ref_chunks, targets)
            weights = {"task": cfg.task_loss, "embedding": cfg.embedding_loss, "hidden": cfg.hidden_loss}
            loss = sum(weights[k] * v for k, v in parts.items())
            opt.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            sched.step()
            if step % max(cfg.steps // 20, 1) == 0 or step == cfg.steps:
                row = {"step": step, **{k: round(float(v), 5) for k, v in parts.items()}}
                trajectory.append(row)
                if ctx.progress:
                    shown = "  ".join(f"{k} {v:.4f}" for k, v in row.items() if k != "step")
                    ctx.progress(f"  step {step}/{cfg.steps}  {shown}")
            if cfg.minutes and time.perf_counter() - t0 > cfg.minutes * 60:
                stopped = f"stopped at step {step} of {cfg.steps}: the {cfg.minutes:g}-minute budget ran out"
                break
    finally:
        lm.model.eval()
        for p in lm.model.parameters():
            p.requires_grad_(True)
    return lm, {
        "steps": step,
        "stopped": stopped,
        "training_minutes": round((time.perf_counter() - t0) / 60, 2),
        "losses": {
            k: v
            for k, v in {"task": cfg.task_loss, "embedding": cfg.embedding_loss, "hidden": cfg.hidden_loss}.items()
            if v
        },  # fmt: skip
        "teacher": cfg.teacher,
        "hidden_map": targets,
        "training_items": n_items,
        "torch_threads": torch.get_num_threads(),
        "labelled": pairs is not None,
        "trajectory": trajectory,
    }


def _hidden_loss(chunks, ref_chunks, targets: list[int]):
    """mean over student blocks of the relative squared error to the mapped teacher hidden state (real tokens)."""
    num = [0.0] * len(targets)
    den = [0.0] * len(targets)
    for (mask, hs, _), (_, ht, _) in zip(chunks, ref_chunks):
        m = mask.unsqueeze(-1).to(hs[0].dtype)
        for j, t in enumerate(targets):
            num[j] = num[j] + (((hs[j + 1] - ht[t]) * m) ** 2).sum()
            den[j] = den[j] + ((ht[t] * m) ** 2).sum()
    return sum(n / d for n, d in zip(num, den)) / len(targets)
