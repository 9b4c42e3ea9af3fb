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
    """The ModuleList of transformer blocks: ``encoder.layer`` in BERT-style encoders, the decoder layers
    (``model.layers``) of a causal LM."""
    found = decoder_blocks(lm)
    if found is not None:
        return found[1]
    encoder = getattr(transformer(lm), "encoder", None)
    if encoder is None or not hasattr(encoder, "layer"):
        raise StageError(
            f"no encoder.layer blocks in this {lm.config.model_type} model: depth and width pruning "
            "take BERT-style encoders and Llama-style decoders"
        )
    return encoder.layer


def keep_blocks(lm, keep: list[int]) -> None:
    """Keep only the blocks at ``keep`` (indices into the current blocks, in order) and say so in the config. In a
    decoder the kept attention layers are renumbered (their ``layer_idx`` indexes the KV cache) and a per-layer
    ``layer_types`` list in the config is cut to match."""
    import torch

    found = decoder_blocks(lm)
    current = list(found[1] if found is not None else blocks(lm))
    kept = torch.nn.ModuleList([current[i] for i in keep])
    if found is None:
        model = transformer(lm)
        model.encoder.layer = kept
        model.config.num_hidden_layers = len(keep)
        return
    prefix = found[0].rstrip(".")
    parent_name, _, attr = prefix.rpartition(".")
    setattr(lm.model.get_submodule(parent_name) if parent_name else lm.model, attr, kept)
    for new_idx, block in enumerate(kept):
        for mod in block.modules():
            if hasattr(mod, "layer_idx"):
                mod.layer_idx = new_idx
    for config in {id(c): c for c in (lm.model.config, transformer(lm).config)}.values():
        config.num_hidden_layers = len(keep)
        types = getattr(config, "layer_types", None)
        if isinstance(types, list | tuple) and len(types) == len(current):
            config.layer_types = [types[i] for i in keep]


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
