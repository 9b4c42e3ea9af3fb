"""The encoder artefact folder: one layout that every consumer loads unchanged, and what it says about itself.

    onnx/model.onnx                    the graph, whatever its precision: the only name sentence-transformers
                                       (``backend="onnx"``), Optimum (``ORTModel*.from_pretrained``) and transformers.js
                                       all find without arguments (ship exactly one graph: Optimum warns on several)
    config.json                        the exported model's config + ``"transformers.js_config": {"dtype": "fp32"}``
    tokenizer files                    tokenizer.json, tokenizer_config.json, vocab / merges, special tokens
    modules.json, 1_Pooling/..., sentence_bert_config.json, config_sentence_transformers.json
                                       sentence-embedding models only: copied from the source pipeline, so
                                       sentence-transformers pools and normalises as the original does (without them it
                                       guesses mean pooling and no Normalize, silently)

``"transformers.js_config": {"dtype": "fp32"}`` is a file-name selector, not the numeric precision: transformers.js
loads ``onnx/model{suffix}.onnx`` with the suffix of its dtype (fp32 -> none, q8 -> ``_quantized``, ...). Its default
is fp32 in Node but q8 in the browser (wasm), which would look for ``onnx/model_quantized.onnx``; pinning "fp32" makes
every runtime load the one graph, int8 or not.

Stands beside the consumers' own file lookup: sentence-transformers ``backend/utils.py`` (``model.onnx`` at the root,
else ``onnx/``), optimum's ``ORTModel`` (``**/*.onnx``), transformers.js ``src/models/session.js``.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import onnx

from compress.core.kinds import ENCODER_GRAPH
from export.onnx_export import copy_app_files

TRANSFORMERS_JS_CONFIG = {"dtype": "fp32"}  # selects onnx/model.onnx (no suffix) in every transformers.js runtime
SBERT_CONFIG = "sentence_bert_config.json"  # the Transformer module's max_seq_length, do_lower_case
ST_VERSIONS = "config_sentence_transformers.json"


def write_encoder_layout(
    graph: Path, float_dir: Path, source: Path, out: Path, sentence_transformers: bool, max_length: int
) -> dict:
    """Put ``graph`` at ``out/onnx/model.onnx`` beside the tokenizer and config of ``float_dir`` (the float export)
    and, for a sentence-embedding model, the sentence-transformers module files of ``source``. Returns what was
    written, for the report."""
    (out / ENCODER_GRAPH).parent.mkdir(parents=True, exist_ok=True)
    shutil.copy2(graph, out / ENCODER_GRAPH)
    copy_app_files(float_dir, out)
    fix_tokenizer_json(out / "tokenizer.json", max_length)
    config = out / "config.json"
    if config.is_file():
        cfg = json.loads(config.read_text())
        cfg["transformers.js_config"] = dict(TRANSFORMERS_JS_CONFIG)
        config.write_text(json.dumps(cfg, indent=2) + "\n")
    st = copy_sentence_transformers_files(source, out) if sentence_transformers else []
    return {"graph": ENCODER_GRAPH, "transformers_js_config": dict(TRANSFORMERS_JS_CONFIG), "sentence_transformers": st}


def fix_tokenizer_json(path: Path, max_length: int) -> None:
    """Truncation at the model's length and padding to the longest text of a batch, written into tokenizer.json.

    A fast tokenizer saves whatever truncation / padding its last call used (e.g. a fixed 128 after a calibration
    pass); the ``tokenizers`` library applies them as they are, so a consumer without transformers would get them."""
    if not path.is_file():
        return
    tok = json.loads(path.read_text())
    tok["truncation"] = {"direction": "Right", "max_length": max_length, "strategy": "LongestFirst", "stride": 0}
    pad_token, pad_id = _pad_token(path.parent, tok)
    if pad_token is not None:
        tok["padding"] = {
            "strategy": "BatchLongest",
            "direction": (tok.get("padding") or {}).get("direction", "Right"),
            "pad_to_multiple_of": None,
            "pad_id": pad_id,
            "pad_type_id": 0,
            "pad_token": pad_token,
        }
    path.write_text(json.dumps(tok, ensure_ascii=False, indent=2) + "\n")
    cfg_path = path.parent / "tokenizer_config.json"
    if cfg_path.is_file():  # transformers records the truncation it was loaded with as "max_length": keep it in step
        cfg = json.loads(cfg_path.read_text())
        cfg["model_max_length"] = max_length
        if "max_length" in cfg:
            cfg["max_length"] = max_length
        cfg_path.write_text(json.dumps(cfg, ensure_ascii=False, indent=2) + "\n")


def _pad_token(folder: Path, tok: dict) -> tuple[str | None, int]:
    """The pad token named in tokenizer_config.json and its id in tokenizer.json (None when there is none)."""
    cfg = folder / "tokenizer_config.json"
    pad = json.loads(cfg.read_text()).get("pad_token") if cfg.is_file() else None
    pad = pad.get("content") if isinstance(pad, dict) else pad
    if not pad:
        return None, 0
    ids = {t["content"]: t["id"] for t in tok.get("added_tokens", [])}
    vocab = (tok.get("model") or {}).get("vocab")
    if isinstance(vocab, dict):
        ids = {**vocab, **ids}
    return (pad, int(ids[pad])) if pad in ids else (None, 0)


def copy_sentence_transformers_files(source: Path, out: Path) -> list[str]:
    """modules.json and every module's configuration from a sentence-transformers folder; returns the files written.

    The Transformer module is the ONNX graph now: its entry points at the folder root (where ``onnx/`` is), whatever
    sub-folder the source kept it in (older pipelines use ``0_Transformer/``), and its ``sentence_bert_config.json``
    (max_seq_length, do_lower_case) goes to the root. Other modules (Pooling, Normalize, Dense) are copied whole."""
    modules_file = source / "modules.json"
    if not modules_file.is_file():
        return []
    modules = json.loads(modules_file.read_text())
    written = []
    for mod in modules:
        path = mod.get("path", "")
        if mod.get("type", "").rpartition(".")[2] == "Transformer":
            if (source / path / SBERT_CONFIG).is_file():
                shutil.copy2(source / path / SBERT_CONFIG, out / SBERT_CONFIG)
                written.append(SBERT_CONFIG)
            mod["path"] = ""
        elif path and (source / path).is_dir():
            shutil.copytree(source / path, out / path, dirs_exist_ok=True)
            written += sorted(str(f.relative_to(out)) for f in (out / path).rglob("*") if f.is_file())
    (out / "modules.json").write_text(json.dumps(modules, indent=2) + "\n")
    if (source / ST_VERSIONS).is_file():
        shutil.copy2(source / ST_VERSIONS, out / ST_VERSIONS)
        written.append(ST_VERSIONS)
    return ["modules.json", *sorted(set(written))]


def pooling(folder: Path) -> dict:
    """How a sentence-transformers folder turns token vectors into one sentence vector (from its module files)."""
    if not (folder / "modules.json").is_file():
        return {}
    modules = json.loads((folder / "modules.json").read_text())
    kinds = [m.get("type", "").rpartition(".")[2] for m in modules]
    out: dict = {"modules": kinds, "normalize": "Normalize" in kinds}
    for m in modules:
        cfg = folder / m.get("path", "") / "config.json"
        if m.get("type", "").endswith("Pooling") and cfg.is_file():
            modes = json.loads(cfg.read_text())
            out["mode"] = ", ".join(
                k[len("pooling_mode_") :] for k, v in modes.items() if k.startswith("pooling_mode_") and v
            )
            out["dimension"] = modes.get("word_embedding_dimension")
    sbert = folder / SBERT_CONFIG
    if sbert.is_file():
        out["max_seq_length"] = json.loads(sbert.read_text()).get("max_seq_length")
    return out


def graph_io(path: Path) -> dict:
    """The graph's inputs and outputs: names, element types and dimensions (symbolic names for dynamic axes)."""

    def describe(values) -> list[dict]:
        out = []
        for v in values:
            t = v.type.tensor_type
            dims = [d.dim_param or (d.dim_value if d.HasField("dim_value") else "?") for d in t.shape.dim]
            out.append({"name": v.name, "type": onnx.TensorProto.DataType.Name(t.elem_type).lower(), "shape": dims})
        return out

    graph = onnx.load(str(path), load_external_data=False).graph
    inits = {t.name for t in graph.initializer}
    return {"inputs": describe([i for i in graph.input if i.name not in inits]), "outputs": describe(graph.output)}
