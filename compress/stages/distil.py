"""Recovery by distillation from the original model on unlabelled text, shared by the training stages
(``prune.gradual``, ``prune.nm``).

The teacher is the untouched original (``ctx.original``); its outputs on the training text are computed
once and kept fixed. Loss: cosine distance on the sentence embedding / mean-pooled hidden state, MSE on
classifier logits; for causal language models the KL divergence KL(p_teacher || p_student) of the next-token
distributions at every real position (the teacher's logits computed per batch: a vocabulary per token is too
large to keep for the whole text). The student trains with AdamW (no weight decay, so pruned weights are not pulled
anywhere by it); the caller hooks in before each step (mask / schedule updates) and after each optimizer
step (re-applying a fixed mask). No task loss: the stages see unlabelled text only.
"""

from __future__ import annotations

import contextlib
import functools
import os
import time
from collections.abc import Callable, Iterator
from typing import Protocol

import numpy as np

from compress.core.models import torch_outputs
from compress.core.numerics import task_output
from compress.stages.base import StageError, TorchContext
from runtimes.host import host_info

Status = dict[str, "float | int | str"]


def student_outputs(lm, enc):
    """The task output of the torch model on a tokenized batch, with gradients (compress.core.numerics)."""
    if lm.task == "text-generation":
        return lm.model(**enc, use_cache=False).logits
    if lm.task == "sentence-embedding":
        return lm.model(dict(enc))["sentence_embedding"]
    res = lm.model(**enc)
    outputs = (
        {"logits": res.logits} if lm.task == "text-classification" else {"last_hidden_state": res.last_hidden_state}
    )
    return task_output(outputs, enc["attention_mask"], lm.task)


def distil_loss(student, teacher, task: str, mask=None):
    """Distance of the student's outputs to the teacher's (1 - cos, MSE on classifier logits, next-token KL for a
    causal LM averaged over the positions ``mask`` keeps)."""
    import torch.nn.functional as F

    if task == "text-generation":
        kl = F.kl_div(F.log_softmax(student.float(), -1), F.log_softmax(teacher.float(), -1), log_target=True,
                      reduction="none").sum(-1)  # fmt: skip
        if mask is None:
            return kl.mean()
        m = mask.to(kl.dtype)
        return (kl * m).sum() / m.sum().clamp(min=1)
    if task == "text-classification":
        return F.mse_loss(student, teacher)
    return (1 - F.cosine_similarity(student, teacher, dim=-1)).mean()


@contextlib.contextmanager
def training_threads() -> Iterator[int]:
    """Torch intra-op threads for a training loop: the physical cores on a quiet host, one thread when other work
    already loads it (1-minute load average above half the cores). With two threads on a busy 2-core host the
    threads spin-wait for each other: a MiniLM step took 4-10x longer than with one (measured, load average 5-6)."""
    import torch

    cores = host_info().physical_cores
    before = torch.get_num_threads()
    threads = 1 if os.getloadavg()[0] > cores / 2 else cores
    torch.set_num_threads(threads)
    try:
        yield threads
    finally:
        torch.set_num_threads(before)


def training(fn: Callable) -> Callable:
    """Run ``fn`` (a training or gradient loop) under ``training_threads``."""

    @functools.wraps(fn)
    def wrapped(*args, **kwargs):
        with training_threads():
            return fn(*args, **kwargs)

    return wrapped


def cosent(first, second, gold, scale: float = 20.0):
    """CoSENT (Su 2022): for every pair (i, j) whose gold score says i should be more similar than j, penalise
    scale * (cos_j - cos_i) through log(1 + sum exp(.)). first, second: (B, D) embeddings; gold: (B,)."""
    import torch

    cos = torch.nn.functional.cosine_similarity(first, second, dim=-1) * scale
    diff = cos[None, :] - cos[:, None]  # diff[i, j] = cos_j - cos_i
    diff = diff[gold[:, None] > gold[None, :]]
    return torch.logsumexp(torch.cat([torch.zeros(1, dtype=diff.dtype), diff]), dim=0)


def _show(status: Status) -> str:
    return "  ".join(f"{k} {v:.3f}" if isinstance(v, float) else f"{k} {v}" for k, v in status.items())


class Training(Protocol):
    """What a training stage's config carries for the recovery loop."""

    learning_rate: float
    batch_size: int
    seed: int


@training
def distil_train(lm, ctx: TorchContext, cfg: Training, stage: str, steps: int, before_step: Callable[[int], Status],
                 after_step: Callable[[int], None] | None = None) -> dict:  # fmt: skip
    """Train ``lm`` in place for ``steps`` optimizer steps on ``ctx.calibration`` (AdamW at ``cfg.learning_rate``,
    batches of ``cfg.batch_size``; torch and the batch order seeded from ``cfg.seed``).

    ``before_step(step)`` runs before every step and once more at ``step == steps`` (a last schedule update);
    it returns the status shown in progress lines and the trajectory (e.g. current sparsity).
    ``after_step(step)`` runs after every optimizer step.
    """
    import torch

    learning_rate, batch_size, seed = cfg.learning_rate, cfg.batch_size, cfg.seed
    if steps == 0:  # one-shot: the schedule's last update only, no training (a `recover` stage may follow)
        status = before_step(0)
        return {"trajectory": [{"step": 0, **status}], "training_minutes": 0.0, "steps": 0, "distillation": "none"}

    texts = list(ctx.calibration)
    if len(texts) < batch_size:
        raise StageError(f"{stage}: {len(texts)} training sentences < batch_size {batch_size}: pass --data")
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    lm_logits = lm.task == "text-generation"  # teacher per batch (a vocabulary per token), else fixed targets
    teacher = None if lm_logits else torch.from_numpy(torch_outputs(ctx.original, texts))  # (N, D)
    lm.model.train()
    params = [p for p in lm.model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=learning_rate, weight_decay=0.0)
    trajectory, t0, order, cursor = [], time.perf_counter(), rng.permutation(len(texts)), 0
    for step in range(steps + 1):
        status = before_step(step)
        if step == steps:
            break
        if cursor + batch_size > len(order):
            order, cursor = rng.permutation(len(texts)), 0
        idx = order[cursor : cursor + batch_size]
        cursor += batch_size
        enc = lm.tokenizer(
            [texts[i] for i in idx], padding=True, truncation=True, max_length=lm.max_length, return_tensors="pt"
        )
        if lm_logits:
            with torch.no_grad():
                target = student_outputs(ctx.original, enc)
            loss = distil_loss(student_outputs(lm, enc), target, lm.task, enc["attention_mask"])
        else:
            loss = distil_loss(student_outputs(lm, enc), teacher[idx], lm.task)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if after_step:
            after_step(step)
        if step % max(steps // 20, 1) == 0 or step == steps - 1:
            value = loss.item()
            trajectory.append({"step": step, "loss": round(value, 5), **status})
            if ctx.progress:
                ctx.progress(f"  step {step + 1}/{steps}  loss {value:.4f}  {_show(status)}")
    lm.model.eval()
    return {
        "trajectory": trajectory,
        "training_minutes": round((time.perf_counter() - t0) / 60, 2),
        "steps": steps,
        "distillation": {
            "text-classification": "MSE on logits",
            "text-generation": "next-token KL to the original",
        }.get(lm.task, "cosine to the original outputs"),
        "training_sentences": len(texts),
    }
