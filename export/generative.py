"""Export generative models (decoder-only with past, encoder-decoder) to an app-ready folder, and check
that ONNX Runtime generates the same greedy tokens as torch.

Stands beside optimum's exporter (``optimum.exporters.onnx.onnx_export_from_model`` with task
``text-generation-with-past`` / ``text2text-generation-with-past``) and optimum's runtime classes
(``optimum.onnxruntime.ORTModelForCausalLM`` / ``ORTModelForSeq2SeqLM``), which load the folder unchanged.
This file picks the files an app needs and compares greedy generations.

Folder layout (what optimum writes and loads):
- decoder-only: ``model.onnx`` (one graph with past key/values inputs; the prefill feeds an empty past)
- encoder-decoder: ``encoder_model.onnx``, ``decoder_model.onnx`` (first step), ``decoder_with_past_model.onnx``
plus ``config.json``, ``generation_config.json`` and the tokenizer files.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from compress.core.errors import CompressError, first_line
from compress.core.kinds import ONNX_FILES, GenKind
from compress.core.models import check_finite, prepare_tokenizer

OPTIMUM_TASK = {
    "text-generation": "text-generation-with-past",
    "text2text-generation": "text2text-generation-with-past",
}
# A greedy step where torch's best two logits are closer than this is a tie: float rounding may pick either.
TIE_MARGIN = 1e-4


def load_torch(path: Path, kind: GenKind) -> tuple[Any, Any]:
    """(model, tokenizer) from a local folder; decoder-only tokenizers pad on the left for batched generation."""
    from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM, AutoTokenizer

    cls = AutoModelForCausalLM if kind == "text-generation" else AutoModelForSeq2SeqLM
    try:
        model = cls.from_pretrained(str(path), local_files_only=True).eval()
        tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    except Exception as e:
        raise CompressError(
            f"could not load the generative model at {path} ({type(e).__name__}: {first_line(e)[:200]}): "
            "check that its weights and tokenizer files are complete"
        ) from None
    check_finite(model, path)
    prepare_tokenizer(tokenizer, kind)
    return model, tokenizer


def export_generative(model: Any, tokenizer: Any, kind: GenKind, out_dir: Path, opset: int | None = None) -> list[Path]:
    """Write the ONNX files, config, generation config and tokenizer to ``out_dir``; returns the ONNX paths."""
    import copy

    from optimum.exporters.onnx import onnx_export_from_model

    out_dir.mkdir(parents=True, exist_ok=True)
    model = copy.deepcopy(model)  # optimum's export flips config flags (use_cache) on the model it is given
    if not model.config.architectures:  # save_pretrained records it; a model built in memory has none yet
        model.config.architectures = [type(model).__name__]
    # no_post_process for seq2seq: keep decoder and decoder-with-past as two graphs (no merged If-graph), which
    # ORT's quantizer and our profiler handle as plain graphs; ORTModelForSeq2SeqLM loads either layout.
    onnx_export_from_model(
        model,
        out_dir,
        task=OPTIMUM_TASK[kind],
        opset=opset,
        do_validation=False,
        device="cpu",
        no_post_process=kind == "text2text-generation",
    )
    for extra in out_dir.glob("decoder_model_merged.onnx*"):
        extra.unlink()
    for f in ONNX_FILES[kind]:
        if (out_dir / f).is_file():
            materialise_transposed_weights(out_dir / f)
    tokenizer.save_pretrained(str(out_dir))
    if not (out_dir / "generation_config.json").is_file() and getattr(model, "generation_config", None) is not None:
        model.generation_config.save_pretrained(str(out_dir))
    paths = [out_dir / f for f in ONNX_FILES[kind]]
    missing = [p.name for p in paths if not p.is_file()]
    if missing:
        raise CompressError(
            f"optimum's export wrote no {', '.join(missing)} into {out_dir}: report this model's architecture as a bug"
        )
    return paths


def materialise_transposed_weights(path: Path, max_bytes: int = 1_500_000_000) -> int:
    """MatMul(x, Transpose(W)) with W an initializer -> MatMul(x, W^T), W^T stored as its own initializer.

    With ``accelerate`` installed, optimum de-duplicates tied weights: GPT-2's LM head then reads
    Transpose(wte) and ORT's quantizer (which quantizes only MatMuls whose B is an initializer) leaves it fp32.
    ORT constant-folds that Transpose at session load anyway, so this costs file size, not memory or time.
    Files near protobuf's 2 GB limit are left as they are. Returns the number of Transposes folded.
    """
    import onnx
    from onnx import numpy_helper

    if path.stat().st_size > max_bytes:
        return 0
    model = onnx.load(str(path))
    graph = model.graph
    inits = {t.name: t for t in graph.initializer}
    matmul_b = {n.input[1] for n in graph.node if n.op_type == "MatMul"}
    folded = []
    for t in graph.node:
        if t.op_type != "Transpose" or t.input[0] not in inits or t.output[0] not in matmul_b:
            continue
        w = numpy_helper.to_array(inits[t.input[0]])
        perm = next((list(a.ints) for a in t.attribute if a.name == "perm"), None)
        if w.ndim == 2 and perm in (None, [1, 0]):
            # the Transpose's output becomes an initializer of the same name: every consumer reads it unchanged
            graph.initializer.append(numpy_helper.from_array(np.ascontiguousarray(w.T), t.output[0]))
            folded.append(t)
    for t in folded:
        graph.node.remove(t)
    if folded:
        onnx.save(model, str(path))
    return len(folded)


def load_ort(folder: Path, kind: GenKind, threads: int = 0) -> Any:
    """The folder as an app loads it: optimum's ORTModelForCausalLM / ORTModelForSeq2SeqLM on the CPU EP."""
    import onnxruntime as ort
    from optimum.onnxruntime import ORTModelForCausalLM, ORTModelForSeq2SeqLM

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.log_severity_level = 3
    cls = ORTModelForCausalLM if kind == "text-generation" else ORTModelForSeq2SeqLM
    return cls.from_pretrained(str(folder), session_options=so, provider="CPUExecutionProvider", use_io_binding=False)


def prompts_from(texts: list[str], n: int = 8, words: int = 6) -> list[str]:
    """Short prompts: the first words of held-out sentences."""
    return [" ".join(t.split()[:words]) for t in texts[:n]]


def greedy(model: Any, tokenizer: Any, prompts: list[str], new_tokens: int, scores: bool = False,
           batched: bool = True) -> Any:  # fmt: skip
    """Greedy generation of exactly ``new_tokens`` tokens per prompt (EOS does not stop it). ``batched=False``: one
    prompt at a time, no padding (onnxruntime-genai's builder graph reads the attention mask as sequence lengths, so a
    left-padded batch gets wrong rotary positions; onnxruntime-genai itself does not pad)."""
    import numpy as np
    import torch

    if not batched:
        runs = [greedy(model, tokenizer, [p], new_tokens, scores) for p in prompts]
        if not scores:
            return np.concatenate(runs)
        return np.concatenate([r[0] for r in runs]), np.concatenate([r[1] for r in runs])

    enc = tokenizer(prompts, return_tensors="pt", padding=True, return_token_type_ids=False)
    with torch.inference_mode():
        out = model.generate(
            **enc,
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            do_sample=False,
            num_beams=1,
            pad_token_id=tokenizer.pad_token_id,
            output_scores=scores,
            return_dict_in_generate=scores,
        )
    seqs = out.sequences if scores else out
    start = 0 if model.config.is_encoder_decoder else enc["input_ids"].shape[1]
    gen = seqs[:, start:].numpy()
    if model.config.is_encoder_decoder:
        gen = gen[:, 1:]  # drop the decoder start token
    if not scores:
        return gen
    return gen, torch.stack(out.scores, 1).float().numpy()  # (B, new_tokens, vocab)


@dataclass(frozen=True)
class TokenParity:
    prompts: int
    new_tokens: int
    identical: int  # prompts whose whole continuation matches
    token_agreement: float  # mean fraction of positions before the first divergence
    ties: int  # divergences at a step where torch's top-2 logits were within TIE_MARGIN
    first_divergence: list[int | None]
    gated: bool
    passed: bool

    def as_dict(self) -> dict:
        return asdict(self)


def compare_tokens(
    reference: np.ndarray, candidate: np.ndarray, ref_scores: np.ndarray | None = None, gated: bool = True
) -> TokenParity:
    """Position-by-position comparison of two greedy generations; a gated check passes only when every
    prompt matches, except where torch itself was at a tie (top-2 logits within TIE_MARGIN) at the divergence."""
    first, ties, agree = [], 0, []
    n = reference.shape[1]
    for r, c, i in zip(reference, candidate, range(len(reference))):
        diff = np.nonzero(r != c)[0]
        d = int(diff[0]) if len(diff) else None
        first.append(d)
        agree.append(1.0 if d is None else d / n)
        if d is not None and ref_scores is not None:
            top2 = np.sort(ref_scores[i, d])[-2:]
            ties += int(top2[1] - top2[0] < TIE_MARGIN)
    identical = sum(d is None for d in first)
    passed = (not gated) or identical + ties == len(first)
    return TokenParity(
        prompts=len(first),
        new_tokens=n,
        identical=identical,
        token_agreement=round(float(np.mean(agree)), 4),
        ties=ties,
        first_divergence=first,
        gated=gated,
        passed=bool(passed),
    )


def check_generation(
    torch_model: Any,
    tokenizer: Any,
    folder: Path,
    kind: GenKind,
    prompts: list[str],
    new_tokens: int = 16,
    reference: tuple | None = None,
    gated: bool = True,
    batched: bool = True,
) -> tuple[TokenParity, np.ndarray]:
    """Greedy tokens of the ONNX folder (loaded with optimum) against torch's on the same prompts;
    returns the comparison and the folder's generated ids (prompts x new_tokens)."""
    ref, ref_scores = reference or greedy(torch_model, tokenizer, prompts, new_tokens, scores=True)
    got = greedy(load_ort(folder, kind), tokenizer, prompts, new_tokens, batched=batched)
    return compare_tokens(ref, got, ref_scores, gated=gated), got
