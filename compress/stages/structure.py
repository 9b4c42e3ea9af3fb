"""Where the transformer blocks of a loaded model live, for the stages that change its structure (prune.gradual's
channels and heads, prune.layers' blocks) and the recovery that distils hidden states (recover)."""

from __future__ import annotations

from typing import Any

from compress.stages.base import StageError


def transformer(lm) -> Any:
    """The transformers model inside the wrappers: the sentence-transformers pipeline's auto_model, or the
    ``base_model`` of a task head (BertModel inside BertForSequenceClassification)."""
    return lm.model[0].auto_model if lm.task == "sentence-embedding" else lm.model.base_model


def blocks(lm) -> Any:
    """The ModuleList of transformer blocks (BERT-style encoders: ``encoder.layer``)."""
    encoder = getattr(transformer(lm), "encoder", None)
    if encoder is None or not hasattr(encoder, "layer"):
        raise StageError(
            f"no encoder.layer blocks in this {lm.config.model_type} model: depth and width pruning "
            "take BERT-style encoders"
        )
    return encoder.layer


def keep_blocks(lm, keep: list[int]) -> None:
    """Keep only the blocks at ``keep`` (indices into the current blocks, in order) and say so in the config."""
    import torch

    model = transformer(lm)
    current = list(blocks(lm))
    model.encoder.layer = torch.nn.ModuleList([current[i] for i in keep])
    model.config.num_hidden_layers = len(keep)


def decoder_blocks(lm) -> tuple[str, Any] | None:
    """(module-name prefix, ModuleList) of a causal LM's decoder blocks (``model.layers`` in Llama-style models), or
    None for other models."""
    import torch

    if lm.task != "text-generation":
        return None
    for name, mod in lm.model.named_modules():
        if isinstance(mod, torch.nn.ModuleList) and name.rpartition(".")[2] in ("layers", "h") and len(mod):
            return name + ".", mod
    return None
