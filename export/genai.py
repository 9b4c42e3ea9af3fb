"""``genai_config.json`` for a decoder-only artefact, so onnxruntime-genai generates from the folder unchanged.

Stands beside onnxruntime-genai's own model builder (``onnxruntime_genai.models.builder``), which writes this file for
the graphs it builds itself; here the graph is optimum's ``text-generation-with-past`` export (one ``model.onnx``,
past key/values as inputs, ``present.N.key/value`` as outputs), possibly quantized afterwards. Everything comes from
``config.json``, ``generation_config.json`` and the graph's own tensor names; nothing is hand-written.

What onnxruntime-genai 0.18 needs, found by probing it (README, "Generative models"):
- ``"type": "decoder"``: the generic decoder-only model, whose tensor names come from this file (``"gpt2"`` expects
  other names and fails with "Model input was not found");
- ``context_length``, ``vocab_size`` and ``decoder.filename`` (it refuses to load without them);
- ``"past_present_share_buffer": false``: optimum's graph concatenates past and new keys into ``present`` instead of
  writing into a fixed-size buffer;
- ``tokenizer.json`` and ``tokenizer_config.json`` beside it (``config.json`` and ``generation_config.json`` are not
  read by onnxruntime-genai).
"""

from __future__ import annotations

import json
from pathlib import Path

import onnx

GENAI_CONFIG = "genai_config.json"


def _first(config: dict, *keys: str, default=None):
    return next((config[k] for k in keys if config.get(k) is not None), default)


def _one(value):
    return value[0] if isinstance(value, list) and value else value


def genai_config(folder: Path, onnx_name: str = "model.onnx") -> dict:
    """The configuration for ``folder`` (an optimum decoder-only export with past key/values)."""
    cfg = json.loads((folder / "config.json").read_text())
    gen_file = folder / "generation_config.json"
    gen = json.loads(gen_file.read_text()) if gen_file.is_file() else {}
    graph = onnx.load(str(folder / onnx_name), load_external_data=False).graph
    inputs, outputs = {i.name for i in graph.input}, {o.name for o in graph.output}
    if "past_key_values.0.key" not in inputs or "present.0.key" not in outputs:
        raise ValueError(f"{folder / onnx_name} is not an optimum decoder graph with past key/values")
    hidden = _first(cfg, "hidden_size", "n_embd", "d_model")
    heads = _first(cfg, "num_attention_heads", "n_head")
    context = _first(cfg, "max_position_embeddings", "n_positions", "n_ctx", default=2048)
    decoder_inputs = {
        "input_ids": "input_ids",
        "past_key_names": "past_key_values.%d.key",
        "past_value_names": "past_key_values.%d.value",
    }
    decoder_inputs |= {name: name for name in ("attention_mask", "position_ids") if name in inputs}
    eos = _first(gen, "eos_token_id", default=cfg.get("eos_token_id"))
    pad = _first(gen, "pad_token_id", default=cfg.get("pad_token_id"))
    return {
        "model": {
            "type": "decoder",
            "bos_token_id": _one(_first(gen, "bos_token_id", default=cfg.get("bos_token_id"))),
            "eos_token_id": eos,
            "pad_token_id": _one(pad if pad is not None else eos),
            "vocab_size": cfg["vocab_size"],
            "context_length": context,
            "decoder": {
                "filename": onnx_name,
                "session_options": {"log_id": "onnxruntime-genai", "provider_options": []},
                "hidden_size": hidden,
                "num_attention_heads": heads,
                "num_key_value_heads": _first(cfg, "num_key_value_heads", default=heads),
                "num_hidden_layers": _first(cfg, "num_hidden_layers", "n_layer"),
                "head_size": _first(cfg, "head_dim", default=hidden // heads if hidden and heads else None),
                "inputs": decoder_inputs,
                "outputs": {
                    "logits": "logits",
                    "present_key_names": "present.%d.key",
                    "present_value_names": "present.%d.value",
                },
            },
        },
        "search": {
            "do_sample": False,
            "num_beams": 1,
            "max_length": context,
            "min_length": 0,
            "past_present_share_buffer": False,
            "repetition_penalty": 1.0,
            "temperature": 1.0,
            "top_k": 1,
            "top_p": 1.0,
        },
    }


def write_genai_config(folder: Path, onnx_name: str = "model.onnx") -> Path:
    path = folder / GENAI_CONFIG
    path.write_text(json.dumps(genai_config(folder, onnx_name), indent=2) + "\n")
    return path
