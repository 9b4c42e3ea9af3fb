"""``graph.optimize``: transformer fusions (attention, layer norm, GELU) from ONNX Runtime's optimizer.

Stands beside ``onnxruntime.transformers.optimizer.optimize_model``; this file only picks its arguments
and counts what changed.
"""

from __future__ import annotations

import contextlib
import io
from dataclasses import dataclass
from pathlib import Path

from compress.core.fs import file_bytes, scratch_cwd
from compress.core.onnx_ops import op_counts
from compress.stages.base import OnnxContext, StageError

# model types ORT's transformer optimizer knows (onnxruntime.transformers.optimizer.MODEL_TYPES, encoder-only subset)
ORT_ENCODER_TYPES = {"bert", "roberta", "distilbert", "albert", "xlm-roberta", "electra", "deberta-v2", "mpnet"}
ORT_TYPE_ALIAS = {
    "roberta": "bert",
    "xlm-roberta": "bert",
    "electra": "bert",
    "albert": "bert",
    "mpnet": "bert",
    "deberta-v2": "bert",
    "distilbert": "bert",
}


@dataclass(frozen=True)
class GraphOptimize:
    opt_level: int = (
        1  # ORT graph optimisation level applied with the fusions: 0, 1 or 2 (2 adds CPU-specific layout ops)
    )
    model_type: str = "auto"  # ORT optimizer model type; auto = from the model's config

    def __post_init__(self) -> None:
        if self.opt_level not in (0, 1, 2):
            raise StageError(f"graph.optimize: opt_level={self.opt_level} is not 0, 1 or 2")


def apply_graph_optimize(cfg: GraphOptimize, src: Path, dst: Path, ctx: OnnxContext) -> dict:
    from onnxruntime.transformers.optimizer import optimize_model

    model_type = cfg.model_type if cfg.model_type != "auto" else ORT_TYPE_ALIAS.get(ctx.model_type, ctx.model_type)
    if model_type != "bert" and ctx.model_type not in ORT_ENCODER_TYPES and cfg.model_type == "auto":
        raise StageError(
            f"graph.optimize: ORT's transformer optimizer has no fusions for model type '{ctx.model_type}': "
            "drop the stage or set model_type explicitly"
        )
    src, dst = src.resolve(), dst.resolve()
    before = op_counts(src)
    chatter = io.StringIO()
    with contextlib.redirect_stdout(chatter), scratch_cwd():  # ORT's optimizer prints; stages return metrics
        opt = optimize_model(
            str(src),
            model_type=model_type,
            num_heads=ctx.num_heads,
            hidden_size=ctx.hidden_size,
            opt_level=cfg.opt_level,
            use_gpu=False,
        )
        opt.save_model_to_file(str(dst.resolve()))
    after = op_counts(dst)
    fused = {op: n for op, n in after.items() if op not in before}
    notes = [line.strip() for line in chatter.getvalue().splitlines() if line.strip()]
    return {
        "nodes_before": sum(before.values()),
        "nodes_after": sum(after.values()),
        "fused_ops": fused,
        "bytes": file_bytes(dst),
        "optimizer_notes": notes,
    }
