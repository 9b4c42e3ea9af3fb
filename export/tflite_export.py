"""torch -> int8 TFLite for Arm Ethos-U (optional extra ``[ethos]``), through litert-torch with its PT2E quantizer.

Library calls as they are: ``torch.export``, torchao's ``prepare_pt2e`` / ``convert_pt2e`` with litert-torch's
``PT2EQuantizer`` (symmetric int8, per-channel weights, histogram-observed activations), ``litert_torch.convert``
and the LiteRT interpreter (``ai_edge_litert``) for the accuracy check. What stands beside them: a wrapper that
makes the model one tensor-in/tensor-out function of (input_ids, attention_mask) with the task's output, at
one static (batch, seq).

litert-torch's quantizer annotates linear/conv/add/mul-like ops; LayerNorm, Softmax, pooling and the embedding
lookup stay float, and Vela leaves float ops to the Cortex-M CPU: the Vela report says which.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from compress.errors import CompressError
from compress.models import LoadedModel

INSTALL_HINT = 'pip install "edge-compress[ethos]"'


def require_litert() -> str:
    try:
        import litert_torch
    except ImportError:
        raise CompressError(f"target needs litert-torch (torch -> TFLite): {INSTALL_HINT}") from None
    return f"litert-torch {litert_torch.__version__}"


def task_module(lm: LoadedModel):
    """(input_ids, attention_mask) -> the task's output tensor, as compress.models.torch_outputs defines it."""
    import torch

    class SentenceEmbedding(torch.nn.Module):
        def __init__(self, st):
            super().__init__()
            self.st = st

        def forward(self, input_ids, attention_mask):
            return self.st({"input_ids": input_ids, "attention_mask": attention_mask})["sentence_embedding"]

    class Encoder(torch.nn.Module):
        def __init__(self, model, task):
            super().__init__()
            self.model, self.task = model, task

        def forward(self, input_ids, attention_mask):
            out = self.model(input_ids=input_ids, attention_mask=attention_mask)
            if self.task == "text-classification":
                return out.logits
            m = attention_mask.unsqueeze(-1).to(out.last_hidden_state.dtype)
            return (out.last_hidden_state * m).sum(1) / m.sum(1).clamp(min=1e-9)

    mod = SentenceEmbedding(lm.model) if lm.task == "sentence-embedding" else Encoder(lm.model, lm.task)
    return mod.eval()


def token_args(lm: LoadedModel, texts: list[str], batch: int, seq: int):
    import torch

    enc = lm.tokenizer(texts + [""] * (batch - len(texts)), padding="max_length", truncation=True, max_length=seq,
                       return_tensors="pt")
    return enc["input_ids"].to(torch.int64), enc["attention_mask"].to(torch.int64)


def export_int8_tflite(lm: LoadedModel, dst: Path, calibration: list[str], batch: int = 1, seq: int = 128,
                       progress=lambda msg: None) -> dict:
    """Static int8 PT2E quantization calibrated on ``calibration`` and conversion to ``dst`` (.tflite)."""
    tool = require_litert()
    import litert_torch
    import torch
    from litert_torch.quantize import pt2e_quantizer, quant_config
    from torchao.quantization.pt2e import quantize_pt2e

    module = task_module(lm)
    args = token_args(lm, calibration[:batch], batch, seq)
    progress(f"torch.export at static {batch}x{seq}")
    try:
        exported = torch.export.export(module, args).module()
    except Exception as e:   # torch.export raises many types for untraceable code
        raise CompressError(f"torch.export failed on this model ({type(e).__name__}: {str(e).splitlines()[0][:200]}): "
                            "the Ethos-U path needs an exportable model") from None
    quantizer = pt2e_quantizer.PT2EQuantizer().set_global(
        pt2e_quantizer.get_symmetric_quantization_config(is_per_channel=True))
    prepared = quantize_pt2e.prepare_pt2e(exported, quantizer)
    progress(f"PT2E int8 calibration on {len(calibration)} sentences")
    with torch.no_grad():
        for i in range(0, len(calibration), batch):
            prepared(*token_args(lm, calibration[i:i + batch], batch, seq))
    converted = quantize_pt2e.convert_pt2e(prepared, fold_quantize=False)
    progress("litert_torch.convert -> int8 TFLite")
    edge = litert_torch.convert(converted, args, quant_config=quant_config.QuantConfig(pt2e_quantizer=quantizer))
    edge.export(str(dst))
    return {"tool": tool, "quantizer": "litert-torch PT2EQuantizer (int8 symmetric, per-channel weights)",
            "calibration_samples": len(calibration), "batch": batch, "seq": seq, "bytes": dst.stat().st_size}


def tflite_outputs(path: Path, lm: LoadedModel, texts: list[str], batch: int, seq: int) -> np.ndarray:
    """Run the TFLite on the CPU (LiteRT interpreter): one output row per text."""
    from ai_edge_litert.interpreter import Interpreter

    it = Interpreter(model_path=str(path), num_threads=1)
    runner = it.get_signature_runner()
    inputs = sorted(runner.get_input_details())          # args_0 (input_ids), args_1 (attention_mask)
    out = []
    for i in range(0, len(texts), batch):
        chunk = texts[i:i + batch]
        ids, mask = token_args(lm, chunk, batch, seq)
        dtypes = [runner.get_input_details()[n]["dtype"] for n in inputs]
        res = runner(**{inputs[0]: ids.numpy().astype(dtypes[0]), inputs[1]: mask.numpy().astype(dtypes[1])})
        out.append(np.asarray(next(iter(res.values())), dtype=np.float32)[:len(chunk)])
    return np.concatenate(out)
