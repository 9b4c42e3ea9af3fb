"""torch -> integer TFLite for Arm Ethos-U (optional extra ``[ethos]``): litert-torch converts the float model,
ai-edge-quantizer quantizes it statically (int16 activations x int8 weights by default, or int8 x int8).

Library calls as they are: ``litert_torch.convert`` (torch.export -> float TFLite), ai-edge-quantizer's
``static_wi8_ai16`` / ``static_wi8_ai8`` recipes with its calibrator, and the LiteRT interpreter (``ai_edge_litert``)
for the accuracy check. What stands beside them: a wrapper that makes the model one function of
(input_ids, attention_mask) -> the task's output at one static (batch, seq), and the attention-mask fill rewrite
(float32's minimum -> -1e4, as runtimes/qnn.py does for ONNX): left in, its range swamps every activation's
quantization scale and the embeddings come out unrelated to the float ones.
Not litert-torch's own PT2E quantizer: it leaves LayerNorm, Softmax, the attention and the pooling float (README,
Targets, has what that cost).
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np

from compress.core.errors import CompressError, first_line
from compress.core.models import LoadedModel

ACTIVATIONS = ("int16", "int8")
CALIBRATION_SAMPLES = 64
MASK_FILL_LIMIT, MASK_FILL = -1e9, -1e4
INSTALL_HINT = 'pip install "edge-compress[ethos]"'


def require_litert() -> str:
    try:
        import litert_torch
    except ImportError:
        raise CompressError(f"target needs litert-torch (torch -> TFLite): {INSTALL_HINT}") from None
    return f"litert-torch {litert_torch.__version__}"


def task_module(lm: LoadedModel):
    """(input_ids, attention_mask) -> the task's output tensor, as compress.core.models.torch_outputs defines it."""
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

    enc = lm.tokenizer(
        texts + [""] * (batch - len(texts)), padding="max_length", truncation=True, max_length=seq, return_tensors="pt"
    )
    return enc["input_ids"].to(torch.int64), enc["attention_mask"].to(torch.int64)


def clamp_mask_fill(src: Path, dst: Path) -> int:
    """Rewrite float32 scalar constants below MASK_FILL_LIMIT (the attention-mask fill) to MASK_FILL; returns how many."""
    from ai_edge_litert.tools import flatbuffer_utils
    from ai_edge_quantizer.utils import tfl_flatbuffer_utils

    model = tfl_flatbuffer_utils.read_model(src)
    changed = 0
    for graph in model.subgraphs:
        for t in graph.tensors:
            buf = model.buffers[t.buffer] if t.buffer < len(model.buffers) else None
            if t.type != 0 or buf is None or buf.data is None or len(buf.data) != 4:  # 0: FLOAT32
                continue
            if np.frombuffer(bytes(buf.data), dtype=np.float32)[0] < MASK_FILL_LIMIT:
                buf.data = np.frombuffer(np.float32(MASK_FILL).tobytes(), dtype=np.uint8)
                changed += 1
    dst.write_bytes(flatbuffer_utils.convert_object_to_bytearray(model))
    return changed


def _signature(path: Path) -> tuple[str, list[str]]:
    from ai_edge_litert.interpreter import Interpreter

    it = Interpreter(model_path=str(path))
    key = next(iter(it.get_signature_list()))
    return key, sorted(it.get_signature_runner(key).get_input_details())  # args_0 (input_ids), args_1 (mask)


def export_int_tflite(
    lm: LoadedModel,
    dst: Path,
    calibration: list[str],
    batch: int = 1,
    seq: int = 128,
    activations: str = "int16",
    progress=lambda msg: None,
) -> dict:
    """Float TFLite (litert-torch) -> mask fill clamped -> static integer quantization (ai-edge-quantizer) -> ``dst``."""
    tool = require_litert()
    if activations not in ACTIVATIONS:
        raise CompressError(f"Ethos-U activations '{activations}': use one of {', '.join(ACTIVATIONS)}")
    import litert_torch
    from ai_edge_quantizer import quantizer, recipe

    module = task_module(lm)
    args = token_args(lm, calibration[:batch], batch, seq)
    samples = calibration[:CALIBRATION_SAMPLES]
    with tempfile.TemporaryDirectory(prefix="tflite-") as tmp:
        progress(f"litert_torch.convert at static {batch}x{seq} (float TFLite)")
        try:
            edge = litert_torch.convert(module, args)
        except Exception as e:  # torch.export / lowering raise many types for untraceable code
            raise CompressError(
                f"litert-torch could not convert this model ({type(e).__name__}: "
                f"{first_line(e)[:200]}): the Ethos-U path needs an exportable model"
            ) from None
        float_path, clamped = Path(tmp) / "float.tflite", Path(tmp) / "clamped.tflite"
        edge.export(str(float_path))
        n_clamped = clamp_mask_fill(float_path, clamped)
        key, names = _signature(clamped)
        progress(
            f"ai-edge-quantizer static {activations} activations x int8 weights, calibrated on {len(samples)} sentences"
        )
        feeds = []
        for i in range(0, len(samples), batch):
            ids, mask = token_args(lm, samples[i : i + batch], batch, seq)
            feeds.append({names[0]: ids.numpy().astype(np.int32), names[1]: mask.numpy().astype(np.int32)})
        q = quantizer.Quantizer(
            clamped, recipe.static_wi8_ai16() if activations == "int16" else recipe.static_wi8_ai8()
        )
        result = q.quantize(q.calibrate({key: feeds}, num_threads=1))
        dst.write_bytes(bytes(result.quantized_model))
    from importlib.metadata import version

    return {
        "tool": f"{tool}, ai-edge-quantizer {version('ai-edge-quantizer')}",
        "quantizer": f"ai-edge-quantizer static_wi8_a{activations[3:]} (min/max, calibrated)",
        "activations": activations,
        "weights": "int8",
        "calibration_samples": len(samples),
        "mask_fill_clamped": n_clamped,
        "batch": batch,
        "seq": seq,
        "bytes": dst.stat().st_size,
    }


def tflite_outputs(path: Path, lm: LoadedModel, texts: list[str], batch: int, seq: int) -> np.ndarray:
    """Run the TFLite on the CPU (LiteRT interpreter): one (dequantized) output row per text."""
    from ai_edge_litert.interpreter import Interpreter

    it = Interpreter(model_path=str(path), num_threads=1)
    runner = it.get_signature_runner()
    inputs = sorted(runner.get_input_details())  # args_0 (input_ids), args_1 (attention_mask)
    out = []
    for i in range(0, len(texts), batch):
        chunk = texts[i : i + batch]
        ids, mask = token_args(lm, chunk, batch, seq)
        dtypes = [runner.get_input_details()[n]["dtype"] for n in inputs]
        res = runner(**{inputs[0]: ids.numpy().astype(dtypes[0]), inputs[1]: mask.numpy().astype(dtypes[1])})
        ((name, value),) = res.items()
        scale, zero = runner.get_output_details()[name].get("quantization", (0.0, 0))
        value = np.asarray(value, dtype=np.float32)
        out.append(((value - zero) * scale if scale else value)[: len(chunk)])
    return np.concatenate(out)
