"""Every consumer of an encoder artefact folder, called the way its users call it, on the folder unchanged.

Used by ``tests/test_consumers.py`` (each consumer against the torch original and against the others) and
``benchmarks/consumers.py`` (the agreement table in the README). Each consumer embeds a list of texts two ways:
``single`` (one text per call) and ``batch`` (the consumer's own batching, 32 texts per call).

- ``onnxruntime``: ``tokenizers`` + ``onnxruntime`` (no torch, no transformers): the graph's ``sentence_embedding``.
- ``optimum``: ``ORTModelForCustomTasks`` (every graph output, ``sentence_embedding`` included).
- ``optimum-feature-extraction``: ``ORTModelForFeatureExtraction`` (only ``last_hidden_state``), pooled as the
  folder's ``1_Pooling`` says.
- ``sentence-transformers``: ``SentenceTransformer(folder, backend="onnx")``.
- ``transformers.js``: ``@huggingface/transformers`` in Node (the feature-extraction pipeline, pooled as the folder
  says, and ``AutoModel``'s ``sentence_embedding``), installed with npm into a cache folder
  (``ONNXRUNTIME_NODE_INSTALL=skip``: onnxruntime-node's CPU binary ships in the npm package; the install script only
  fetches CUDA extras). Skipped (None) where node or the install is unavailable.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np

from compress.core.kinds import ENCODER_GRAPH
from compress.core.numerics import row_cosine

Embed = Callable[[list[str]], np.ndarray]
BATCH = 32
TRANSFORMERS_JS = "@huggingface/transformers@4.3.2"  # the version the layout was checked with
NODE_CACHE = Path(os.environ.get("EDGE_COMPRESS_NODE_CACHE", Path.home() / ".cache" / "edge-compress" / "node"))


def _pooling(folder: Path) -> dict:
    cfg = folder / "1_Pooling" / "config.json"
    modes = json.loads(cfg.read_text()) if cfg.is_file() else {"pooling_mode_mean_tokens": True}
    modules = json.loads((folder / "modules.json").read_text()) if (folder / "modules.json").is_file() else []
    return {
        "cls": bool(modes.get("pooling_mode_cls_token")),
        "normalize": any(m.get("type", "").endswith("Normalize") for m in modules),
    }


def _pool(hidden: np.ndarray, mask: np.ndarray, how: dict) -> np.ndarray:
    if how["cls"]:
        out = hidden[:, 0]
    else:
        m = mask[..., None].astype(np.float32)
        out = (hidden * m).sum(1) / np.clip(m.sum(1), 1e-9, None)
    return out / np.linalg.norm(out, axis=1, keepdims=True) if how["normalize"] else out


def onnxruntime_consumer(folder: Path) -> Embed:
    import onnxruntime as ort
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(folder / "tokenizer.json"))  # truncation and padding as the folder saved them
    sess = ort.InferenceSession(str(folder / ENCODER_GRAPH), providers=["CPUExecutionProvider"])
    names = {i.name for i in sess.get_inputs()}

    def embed(texts: list[str]) -> np.ndarray:
        enc = tok.encode_batch(texts)
        feeds = {
            "input_ids": np.array([e.ids for e in enc], np.int64),
            "attention_mask": np.array([e.attention_mask for e in enc], np.int64),
            "token_type_ids": np.array([e.type_ids for e in enc], np.int64),
        }
        return sess.run(["sentence_embedding"], {k: v for k, v in feeds.items() if k in names})[0]

    return embed


def optimum_consumer(folder: Path) -> Embed:
    from optimum.onnxruntime import ORTModelForCustomTasks
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(folder))
    model = ORTModelForCustomTasks.from_pretrained(str(folder))
    return lambda texts: model(**tok(texts, padding=True, truncation=True, return_tensors="np")).sentence_embedding


def optimum_feature_extraction_consumer(folder: Path) -> Embed:
    from optimum.onnxruntime import ORTModelForFeatureExtraction
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(folder))
    model = ORTModelForFeatureExtraction.from_pretrained(str(folder))
    how = _pooling(folder)

    def embed(texts: list[str]) -> np.ndarray:
        enc = tok(texts, padding=True, truncation=True, return_tensors="np")
        return _pool(np.asarray(model(**enc).last_hidden_state), enc["attention_mask"], how)

    return embed


def sentence_transformers_consumer(folder: Path) -> Embed:
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(str(folder), backend="onnx", device="cpu", local_files_only=True)
    return lambda texts: model.encode(texts, batch_size=BATCH, convert_to_numpy=True, show_progress_bar=False)


PYTHON_CONSUMERS: dict[str, Callable[[Path], Embed]] = {
    "onnxruntime": onnxruntime_consumer,
    "optimum": optimum_consumer,
    "optimum-feature-extraction": optimum_feature_extraction_consumer,
    "sentence-transformers": sentence_transformers_consumer,
}


def single_and_batch(embed: Embed, texts: list[str], own_batching: bool = False) -> dict[str, np.ndarray]:
    """One text per call, and 32 texts per call (or the whole list when the consumer batches by itself)."""
    batch = (
        embed(texts)
        if own_batching
        else np.concatenate([embed(texts[i : i + BATCH]) for i in range(0, len(texts), BATCH)])
    )
    return {"single": np.concatenate([embed([t]) for t in texts]), "batch": np.asarray(batch)}


def python_embeddings(folder: Path, texts: list[str]) -> dict[str, np.ndarray]:
    """{"<consumer>:single|batch": (n, dim)} for every Python consumer."""
    out = {}
    for name, make in PYTHON_CONSUMERS.items():
        res = single_and_batch(make(folder), texts, own_batching=name == "sentence-transformers")
        out |= {f"{name}:{k}": v for k, v in res.items()}
    return out


# ---- transformers.js in Node ------------------------------------------------------------------------------------

NODE_SCRIPT = """
import { env, pipeline, AutoModel, AutoTokenizer } from "@huggingface/transformers";
import fs from "node:fs";
import path from "node:path";

const [folder, textsFile, out, poolingJson] = process.argv.slice(2);
const pooling = JSON.parse(poolingJson);
env.allowRemoteModels = false;
env.localModelPath = path.dirname(path.resolve(folder)) + "/";
const id = path.basename(path.resolve(folder));
const texts = JSON.parse(fs.readFileSync(textsFile, "utf8"));
const extractor = await pipeline("feature-extraction", id);
const res = { single: [], batch: [], automodel_single: [] };
for (const t of texts) res.single.push(Array.from((await extractor(t, pooling)).data));
for (let i = 0; i < texts.length; i += 32) res.batch.push(...(await extractor(texts.slice(i, i + 32), pooling)).tolist());
const tok = await AutoTokenizer.from_pretrained(id);
const model = await AutoModel.from_pretrained(id);
for (const t of texts) {
  const enc = await tok(t, { truncation: true });  // model_max_length from tokenizer_config.json
  res.automodel_single.push(Array.from((await model(enc)).sentence_embedding.data));
}
fs.writeFileSync(out, JSON.stringify(res));
"""


def install_transformers_js(cache: Path = NODE_CACHE, timeout: int = 600) -> Path | None:
    """A folder whose node_modules holds transformers.js (npm install once, then reused); None where node or npm is
    missing or the install fails (offline without the registry, for example)."""
    if not (shutil.which("node") and shutil.which("npm")):
        return None
    marker = cache / "node_modules" / "@huggingface" / "transformers" / "package.json"
    if marker.is_file():
        return cache
    cache.mkdir(parents=True, exist_ok=True)
    (cache / "package.json").write_text(json.dumps({"name": "edge-compress-consumers", "private": True}) + "\n")
    env = {**os.environ, "ONNXRUNTIME_NODE_INSTALL": "skip", "npm_config_fund": "false", "npm_config_audit": "false"}
    try:
        res = subprocess.run(
            ["npm", "install", "--no-save", TRANSFORMERS_JS],
            cwd=cache,
            env=env,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    return cache if res.returncode == 0 and marker.is_file() else None


def node_run(node_dir: Path, script: str, args: list[str], timeout: int = 600) -> subprocess.CompletedProcess:
    """Run an ES-module script from ``node_dir`` (so it resolves that folder's node_modules)."""
    with tempfile.NamedTemporaryFile("w", suffix=".mjs", dir=node_dir, delete=False) as f:
        f.write(script)
    try:
        return subprocess.run(["node", f.name, *args], capture_output=True, text=True, timeout=timeout, cwd=node_dir)
    finally:
        os.unlink(f.name)


def transformers_js_embeddings(folder: Path, texts: list[str], node_dir: Path) -> dict[str, np.ndarray]:
    """{"transformers.js:single|batch", "transformers.js-automodel:single"} from Node, the folder loaded unchanged."""
    how = _pooling(folder)
    pooling = {"pooling": "cls" if how["cls"] else "mean", "normalize": how["normalize"]}
    with tempfile.TemporaryDirectory() as tmp:
        src, out = Path(tmp) / "texts.json", Path(tmp) / "out.json"
        src.write_text(json.dumps(texts))
        res = node_run(node_dir, NODE_SCRIPT, [str(folder.resolve()), str(src), str(out), json.dumps(pooling)])
        if res.returncode != 0:
            raise RuntimeError(f"transformers.js failed: {res.stderr[-2000:]}")
        data = json.loads(out.read_text())
    return {
        "transformers.js:single": np.array(data["single"], np.float32),
        "transformers.js:batch": np.array(data["batch"], np.float32),
        "transformers.js-automodel:single": np.array(data["automodel_single"], np.float32),
    }


# ---- agreement ----------------------------------------------------------------------------------------------------


def agreement(embeddings: dict[str, np.ndarray], reference: str) -> dict:
    """Per consumer: min / mean cosine to ``reference`` and vector norms; and the worst pair of consumers."""
    ref = embeddings[reference]
    rows = {}
    for name, e in embeddings.items():
        cos = row_cosine(e, ref)
        norms = np.linalg.norm(e, axis=1)
        rows[name] = {
            "min_cos": round(float(cos.min()), 8),
            "mean_cos": round(float(cos.mean()), 8),
            "norm_min": round(float(norms.min()), 4),
            "norm_max": round(float(norms.max()), 4),
        }
    names = list(embeddings)
    pairs = [
        (float(row_cosine(embeddings[a], embeddings[b]).min()), a, b)
        for i, a in enumerate(names)
        for b in names[i + 1 :]
    ]
    worst = min(pairs) if pairs else (1.0, reference, reference)
    return {
        "reference": reference,
        "consumers": rows,
        "worst_pair": {"min_cos": round(worst[0], 8), "a": worst[1], "b": worst[2]},
    }
