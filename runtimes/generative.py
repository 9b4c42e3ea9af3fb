"""Measured generation latency on the CPU: time to first token (TTFT) and steady-state tokens/s.

Methodology (``../shared/notes/algorithms.md``, "Return of the Encoder"):
- TTFT: input ids -> first output token. Decoder-only: the prefill of the whole prompt (empty past).
  Encoder-decoder: the encoder pass + the first decoder step. Tokenization is not included.
- Steady state: the decode steps after the first token (KV cache in use), tokens/s per sequence and for the batch.
- Swept over input length and batch, each point with a fixed number of new tokens (greedy, EOS ignored,
  so every variant does the same work); variants are interleaved round by round like ``runtimes.profiler``.

The decode loop drives the exported graphs with ONNX Runtime sessions directly (fixed threads, no
framework overhead between steps); optimum's ``ORTModelFor*`` run the same graphs for apps and for the
parity check (``export.generative``). Peak RSS is measured in a fresh process per artefact.
"""

from __future__ import annotations

import json
import resource
import subprocess
import sys
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnxruntime as ort

from compress.core.errors import CompressError
from compress.core.kinds import ONNX_FILES, GenKind, artifact_kind
from runtimes.host import host_info
from runtimes.ort import cpu_session
from runtimes.profiler import settle

ORT_DTYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16}


@dataclass(frozen=True)
class GenPoint:
    batch: int
    input_len: int

    def __str__(self) -> str:
        return f"{self.batch}x{self.input_len}"


@dataclass(frozen=True)
class GenProfileConfig:
    points: tuple[GenPoint, ...] = (GenPoint(1, 32), GenPoint(1, 128), GenPoint(4, 128))
    new_tokens: int = 32  # tokens generated per run: 1 from the first step, new_tokens - 1 decode steps
    runs: int = 5  # timed generations per point and variant
    warmup: int = 1
    threads: int = 0  # 0: the host's physical cores

    def __post_init__(self) -> None:
        if self.runs < 1 or self.warmup < 0 or self.threads < 0 or self.new_tokens < 2:
            raise CompressError(
                "--runs must be >= 1, warm-up and --threads >= 0, --new-tokens >= 2 (one decode step at least)"
            )


@dataclass
class GenLatency:
    batch: int
    input_len: int
    new_tokens: int
    runs: int
    ttft_p50_ms: float
    ttft_p90_ms: float
    ttft_min_ms: float
    decode_ms_per_step_p50: float  # median over runs of the mean decode-step time (KV cache in use)
    tokens_per_s: float  # steady state, per sequence: 1000 / decode_ms_per_step_p50
    tokens_per_s_batch: float  # steady state, all sequences of the batch together
    total_ms_p50: float  # TTFT + all decode steps
    threads: int
    source: str = "measured"
    tool: str = ""
    device: str = ""
    caveats: list[str] = field(default_factory=list)


def _past_shape(inp, batch: int, past_len: int, config: dict | None = None) -> tuple[int, ...]:
    """An empty/placeholder past tensor shape: (batch, heads, past_len, head_dim) with the graph's fixed dims; a
    symbolic head count / head size (onnxruntime-genai's builder names the last one kv_cache_dim) from the model's
    config.json."""
    config = config or {}
    heads = config.get("num_key_value_heads") or config.get("num_attention_heads")
    n_heads, hidden = config.get("num_attention_heads"), config.get("hidden_size")
    head_dim = config.get("head_dim") or (hidden // n_heads if n_heads and hidden else None)
    fill = {0: batch, 1: heads, 2: past_len, 3: head_dim}
    dims = [d if isinstance(d, int) else None for d in inp.shape]
    shape = tuple(fill[i] if i in (0, 2) or d is None else d for i, d in enumerate(dims))
    if any(d is None for d in shape):
        raise ValueError(f"{inp.name}: symbolic dims {inp.shape} and no config.json to size them")
    return shape


class OrtGenerator:
    """Greedy generation over an artefact folder's ONNX graphs, timing the first token and each decode step."""

    def __init__(self, folder: Path, kind: GenKind | None = None, threads: int = 0):
        kind = kind or artifact_kind(folder)
        if kind is None:
            raise ValueError(
                f"{folder} holds no generative ONNX layout ({' / '.join(ONNX_FILES['text-generation'])} "
                f"or {', '.join(ONNX_FILES['text2text-generation'])}, plus config.json)"
            )
        self.kind = kind
        self.threads = threads or host_info().physical_cores
        self.config = json.loads((folder / "config.json").read_text())
        self.sessions = {Path(f).stem: cpu_session(folder / f, self.threads) for f in ONNX_FILES[kind]}

    @property
    def vocab_size(self) -> int:
        return int(self.config.get("vocab_size", 1000))

    def _feeds(self, sess: ort.InferenceSession, state: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        feeds = {}
        for inp in sess.get_inputs():
            if inp.name not in state:
                raise ValueError(f"the graph wants input '{inp.name}', which the generation loop does not produce")
            feeds[inp.name] = state[inp.name]
        return feeds

    def _run(self, name: str, state: dict) -> np.ndarray:
        sess = self.sessions[name]
        outs = sess.run(None, self._feeds(sess, state))
        logits = None
        for meta, value in zip(sess.get_outputs(), outs):
            if meta.name == "logits":
                logits = value
            elif meta.name.startswith("present"):
                state["past_key_values" + meta.name[len("present") :]] = value
            else:
                state[meta.name] = value  # encoder: last_hidden_state
        return logits

    def generate(self, input_ids: np.ndarray, new_tokens: int) -> tuple[np.ndarray, float, list[float]]:
        """(generated ids (B, new_tokens), TTFT seconds, decode-step seconds); full attention mask, EOS ignored."""
        batch, seq = input_ids.shape
        mask = np.ones((batch, seq), dtype=np.int64)
        out = np.zeros((batch, new_tokens), dtype=np.int64)
        steps = []
        if self.kind == "text-generation":
            sess = self.sessions["model"]
            state = {
                "input_ids": input_ids,
                "attention_mask": mask,
                "position_ids": np.broadcast_to(np.arange(seq, dtype=np.int64), (batch, seq)).copy(),
            }
            for inp in sess.get_inputs():
                if inp.name.startswith("past_key_values"):
                    shape = _past_shape(inp, batch, 0, self.config)
                    state[inp.name] = np.zeros(shape, dtype=ORT_DTYPES.get(inp.type, np.float32))
            t0 = time.perf_counter()
            out[:, 0] = self._run("model", state)[:, -1].argmax(-1)
            ttft = time.perf_counter() - t0
            for k in range(1, new_tokens):
                t0 = time.perf_counter()
                state["input_ids"] = out[:, k - 1 : k]
                state["attention_mask"] = np.ones((batch, seq + k), dtype=np.int64)
                state["position_ids"] = np.full((batch, 1), seq + k - 1, dtype=np.int64)
                out[:, k] = self._run("model", state)[:, -1].argmax(-1)
                steps.append(time.perf_counter() - t0)
            return out, ttft, steps
        start = int(self.config.get("decoder_start_token_id", self.config.get("pad_token_id", 0)) or 0)
        state = {"input_ids": input_ids, "attention_mask": mask, "encoder_attention_mask": mask}
        t0 = time.perf_counter()
        self._run("encoder_model", state)
        state["encoder_hidden_states"] = state["last_hidden_state"]
        state["input_ids"] = np.full((batch, 1), start, dtype=np.int64)
        out[:, 0] = self._run("decoder_model", state)[:, -1].argmax(-1)
        ttft = time.perf_counter() - t0
        for k in range(1, new_tokens):
            t0 = time.perf_counter()
            state["input_ids"] = out[:, k - 1 : k]
            out[:, k] = self._run("decoder_with_past_model", state)[:, -1].argmax(-1)
            steps.append(time.perf_counter() - t0)
        return out, ttft, steps


class PrefillLogits:
    """``logits(ids)`` of a decoder-only graph with past inputs: one sequence, one prefill from an empty KV cache
    (what perplexity and next-token fidelity score, ``compress.core.lm_eval``). Takes the .onnx file alone."""

    def __init__(self, path: Path, threads: int = 0):
        self.threads = threads or host_info().physical_cores
        self.session = cpu_session(path, self.threads)
        self.inputs = self.session.get_inputs()
        config = path.parent / "config.json"
        self.config = json.loads(config.read_text()) if config.is_file() else {}

    def __call__(self, ids: np.ndarray) -> np.ndarray:
        seq = len(ids)
        state = {
            "input_ids": ids[None].astype(np.int64),
            "attention_mask": np.ones((1, seq), dtype=np.int64),
            "position_ids": np.arange(seq, dtype=np.int64)[None],
        }
        feeds = {}
        for inp in self.inputs:
            if inp.name.startswith("past_key_values"):
                feeds[inp.name] = np.zeros(
                    _past_shape(inp, 1, 0, self.config), dtype=ORT_DTYPES.get(inp.type, np.float32)
                )
            elif inp.name in state:
                feeds[inp.name] = state[inp.name]
            else:
                raise ValueError(f"the graph wants input '{inp.name}', which a prefill does not produce")
        names = [o.name for o in self.session.get_outputs()]
        return self.session.run(["logits"] if "logits" in names else names[:1], feeds)[0][0].astype(np.float32)


def check_lengths(config: dict, cfg: GenProfileConfig) -> None:
    """Refuse input + output lengths past the model's learned positions (GPT-2 style) before any timing."""
    limit = config.get("n_positions") or config.get("max_position_embeddings")
    if config.get("is_encoder_decoder") or not limit:
        return  # relative / rotary positions: no hard limit in the graph
    longest = max(p.input_len for p in cfg.points) + cfg.new_tokens
    if longest > int(limit):
        raise CompressError(
            f"input length + new tokens = {longest} exceeds the model's {limit} positions: "
            "use shorter --shapes or fewer --new-tokens"
        )


def random_ids(batch: int, seq: int, vocab: int, seed: int = 0) -> np.ndarray:
    """Prompt ids for timing (the content does not change the work done; the length does)."""
    rng = np.random.default_rng(seed)
    low = min(100, vocab // 2)
    return rng.integers(low, vocab, size=(batch, seq), dtype=np.int64)


def _summarise(
    ttfts: list[float], steps: list[list[float]], point: GenPoint, new_tokens: int, threads: int
) -> GenLatency:
    ttft_ms = np.asarray(ttfts) * 1e3
    step_ms = np.asarray([np.mean(s) for s in steps]) * 1e3
    total_ms = ttft_ms + np.asarray([np.sum(s) for s in steps]) * 1e3
    p50_step = float(np.median(step_ms))
    caveats = ["tokenization not included; greedy argmax on the host; EOS ignored (fixed work per run)"]
    if len(ttfts) < 10:
        caveats.append(f"only {len(ttfts)} timed runs per point: percentiles are rough, compare ratios")
    return GenLatency(
        batch=point.batch,
        input_len=point.input_len,
        new_tokens=new_tokens,
        runs=len(ttfts),
        ttft_p50_ms=round(float(np.median(ttft_ms)), 3),
        ttft_p90_ms=round(float(np.percentile(ttft_ms, 90)), 3),
        ttft_min_ms=round(float(ttft_ms.min()), 3),
        decode_ms_per_step_p50=round(p50_step, 3),
        tokens_per_s=round(1e3 / p50_step, 2),
        tokens_per_s_batch=round(point.batch * 1e3 / p50_step, 2),
        total_ms_p50=round(float(np.median(total_ms)), 3),
        threads=threads,
        tool=f"onnxruntime {ort.__version__} CPUExecutionProvider",
        device=host_info().cpu_model,
        caveats=caveats,
    )


def measure_generation(
    models: dict[str, Path],
    cfg: GenProfileConfig = GenProfileConfig(),
    on_progress: Callable[[int, int], None] | None = None,
) -> dict[str, list[GenLatency]]:
    """Time every artefact folder at every point, interleaved round by round. {label: [GenLatency per point]}."""
    gens = {label: OrtGenerator(path, threads=cfg.threads) for label, path in models.items()}
    for g in gens.values():
        check_lengths(g.config, cfg)
    labels = list(gens)
    total, done = len(cfg.points) * cfg.runs, 0
    results: dict[str, list[GenLatency]] = {label: [] for label in labels}
    for point in cfg.points:
        ids = {label: random_ids(point.batch, point.input_len, g.vocab_size) for label, g in gens.items()}
        for label in labels:
            for _ in range(cfg.warmup):
                gens[label].generate(ids[label], cfg.new_tokens)
        ttfts: dict[str, list[float]] = defaultdict(list)
        steps: dict[str, list[list[float]]] = defaultdict(list)
        for r in range(cfg.runs):
            for k in range(len(labels)):  # rotate the order every round
                label = labels[(r + k) % len(labels)]
                settle()  # the previous generator's spinning workers sleep first (runtimes.profiler)
                _, ttft, st = gens[label].generate(ids[label], cfg.new_tokens)
                ttfts[label].append(ttft)
                steps[label].append(st)
            done += 1
            if on_progress:
                on_progress(done, total)
        for label in labels:
            results[label].append(_summarise(ttfts[label], steps[label], point, cfg.new_tokens, gens[label].threads))
    return results


def peak_rss_mb(folder: Path, point: GenPoint, new_tokens: int, threads: int = 0) -> dict:
    """Peak resident memory of a fresh process that loads the artefact and generates once at ``point``.

    ``baseline_mb``: the same process after its imports, before any session; ``model_mb`` = peak - baseline.
    """
    root = Path(__file__).resolve().parents[1]
    cmd = [
        sys.executable,
        "-m",
        "runtimes.generative",
        str(Path(folder).resolve()),
        str(point.batch),
        str(point.input_len),
        str(new_tokens),
        str(threads),
    ]
    res = subprocess.run(cmd, cwd=root, capture_output=True, text=True, timeout=1800)
    if res.returncode != 0:
        tail = (res.stderr.strip().splitlines() or ["no output"])[-1]
        raise RuntimeError(f"peak-RSS child failed: {tail}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def _vm_hwm_mb() -> float:
    """Peak RSS of this process image (VmHWM). Not ru_maxrss: on Linux that survives fork + exec, so a child
    started from a large parent would report the parent's peak."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # no procfs: best effort


def _rss_child(folder: str, batch: str, seq: str, new_tokens: str, threads: str) -> None:
    base = _vm_hwm_mb()
    gen = OrtGenerator(Path(folder), threads=int(threads))
    gen.generate(random_ids(int(batch), int(seq), gen.vocab_size), int(new_tokens))
    peak = _vm_hwm_mb()
    print(
        json.dumps(
            {
                "peak_mb": round(peak, 1),
                "baseline_mb": round(base, 1),
                "model_mb": round(peak - base, 1),
                "batch": int(batch),
                "input_len": int(seq),
                "new_tokens": int(new_tokens),
                "source": "measured",
                "tool": "VmHWM of a fresh process (/proc/self/status)",
            }
        )
    )


if __name__ == "__main__":
    _rss_child(*sys.argv[1:6])
