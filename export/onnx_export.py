"""Export a loaded model to a self-contained folder: model.onnx + tokenizer + config.

Stands beside optimum's exporter (``optimum.exporters.onnx.onnx_export_from_model``), which covers the
transformers architectures and sentence-transformers pipelines; ``torch.onnx.export`` is the fallback
for a model optimum does not cover. Knows nothing about pruning or quantization.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import onnx

from compress.core.errors import CompressError
from compress.core.models import LoadedModel

MODEL_FILE = "model.onnx"
# optimum's sentence-transformers export calls the token embeddings "token_embeddings"; Optimum's
# ORTModelForFeatureExtraction reads "last_hidden_state". Renaming makes the folder load unchanged there.
TOKEN_OUTPUT = "last_hidden_state"
OPTIMUM_TASK = {
    "sentence-embedding": "feature-extraction",
    "feature-extraction": "feature-extraction",
    "text-classification": "text-classification",
}


def rename_output(path: Path, old: str, new: str) -> None:
    model = onnx.load(str(path))
    if old not in [o.name for o in model.graph.output]:
        return
    for node in model.graph.node:
        node.input[:] = [new if x == old else x for x in node.input]
        node.output[:] = [new if x == old else x for x in node.output]
    for o in model.graph.output:
        if o.name == old:
            o.name = new
    onnx.save(model, str(path))


def export_onnx(lm: LoadedModel, out_dir: Path, opset: int | None = None) -> Path:
    """Write ``out_dir/model.onnx`` (dynamic batch and sequence axes) plus tokenizer and config files."""
    out_dir.mkdir(parents=True, exist_ok=True)
    try:
        _export_with_optimum(lm, out_dir, opset)
    except (KeyError, ValueError, NotImplementedError) as e:  # optimum: "... is not supported yet ..."
        if lm.task == "sentence-embedding":
            raise
        logging.getLogger(__name__).info("optimum does not cover this model (%s); exporting with torch.onnx", e)
        _export_with_torch(lm, out_dir, opset or 17)
    path = out_dir / MODEL_FILE
    if not path.is_file():
        raise CompressError(f"export wrote no {MODEL_FILE} into {out_dir}: report this model's architecture as a bug")
    rename_output(path, "token_embeddings", TOKEN_OUTPUT)
    return path


def _export_with_optimum(lm: LoadedModel, out_dir: Path, opset: int | None) -> None:
    from optimum.exporters.onnx import onnx_export_from_model

    library = "sentence_transformers" if lm.task == "sentence-embedding" else "transformers"
    onnx_export_from_model(
        lm.model,
        out_dir,
        task=OPTIMUM_TASK[lm.task],
        library_name=library,
        opset=opset,
        do_validation=False,
        device="cpu",
    )
    if lm.task == "sentence-embedding":
        # Tokenizer files come from the folder the pipeline was loaded from, so the artefact's tokenizer is its own.
        lm.tokenizer.save_pretrained(str(out_dir))


def _export_with_torch(lm: LoadedModel, out_dir: Path, opset: int) -> None:
    """torch.onnx.export of a transformers model's forward, inputs named as the tokenizer names them."""
    import torch

    enc = lm.tokenizer(["an example sentence", "another one"], padding=True, return_tensors="pt")
    names = [n for n in ("input_ids", "attention_mask", "token_type_ids") if n in enc]
    out_name = "logits" if lm.task == "text-classification" else TOKEN_OUTPUT

    class Wrapper(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, input_ids, attention_mask=None, token_type_ids=None):
            res = self.inner(input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids)
            return res.logits if out_name == "logits" else res.last_hidden_state

    # torch.export-based exporter: the legacy tracer bakes the example's attention-mask shape into the graph.
    batch, seq = torch.export.Dim("batch_size"), torch.export.Dim("sequence_length")
    shapes = {n: {0: batch, 1: seq} for n in names}
    torch.onnx.export(
        Wrapper(lm.model).eval(),
        (),
        str(out_dir / MODEL_FILE),
        kwargs={n: enc[n] for n in names},
        input_names=names,
        output_names=[out_name],
        dynamic_shapes=shapes,
        opset_version=max(opset, 18),
        dynamo=True,
        external_data=False,
    )
    lm.tokenizer.save_pretrained(str(out_dir))
    lm.config.save_pretrained(str(out_dir))


def copy_app_files(src_dir: Path, dst_dir: Path) -> None:
    """Copy everything but the ONNX model (tokenizer, config) from one artefact folder to another."""
    dst_dir.mkdir(parents=True, exist_ok=True)
    for f in src_dir.iterdir():
        if f.is_file() and not f.name.endswith((".onnx", ".onnx.data", ".onnx_data")):
            shutil.copy2(f, dst_dir / f.name)
