"""ONNX Runtime sessions on the CPU execution provider, and feeds shaped for a session's inputs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort

CPU_EP = "CPUExecutionProvider"


# ORT graph-optimisation levels by name (what a consumer may run an artefact at; ORT's default is "all").
LEVELS = {
    "disable_all": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
    "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
    "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
    "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
}


def cpu_session(
    path: str | Path, threads: int, profile_prefix: str | None = None, level: str = "all"
) -> ort.InferenceSession:
    """A CPU session with fixed intra-op threads (the measurement stays comparable across variants), at one of
    ORT's graph-optimisation ``LEVELS``."""
    so = ort.SessionOptions()
    so.graph_optimization_level = LEVELS[level]
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.log_severity_level = 3
    if profile_prefix:
        so.enable_profiling = True
        so.profile_file_prefix = profile_prefix
    return ort.InferenceSession(str(path), sess_options=so, providers=[CPU_EP])


def input_names(session: ort.InferenceSession) -> list[str]:
    return [i.name for i in session.get_inputs()]


def synthetic_feeds(
    session: ort.InferenceSession, batch: int, seq: int, vocab: int = 1000, seed: int = 0
) -> dict[str, np.ndarray]:
    """Token-id feeds of an exact (batch, seq) shape for timing: random ids, full attention mask."""
    rng = np.random.default_rng(seed)
    feeds = {}
    for i in session.get_inputs():
        if i.name == "attention_mask":
            feeds[i.name] = np.ones((batch, seq), dtype=np.int64)
        elif i.name == "token_type_ids":
            feeds[i.name] = np.zeros((batch, seq), dtype=np.int64)
        elif i.name == "position_ids":
            feeds[i.name] = np.broadcast_to(np.arange(seq, dtype=np.int64), (batch, seq)).copy()
        else:
            feeds[i.name] = rng.integers(1000, 1000 + vocab, size=(batch, seq), dtype=np.int64)
    return feeds


def select_feeds(session: ort.InferenceSession, encoded: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Keep the tokenizer outputs the graph takes; add zero token_type_ids when the graph wants them."""
    feeds = {}
    for name in input_names(session):
        if name in encoded:
            feeds[name] = np.asarray(encoded[name], dtype=np.int64)
        elif name == "token_type_ids":
            feeds[name] = np.zeros_like(np.asarray(encoded["input_ids"], dtype=np.int64))
        else:
            raise ValueError(f"the ONNX graph wants input '{name}', which the tokenizer does not produce")
    return feeds


def tensor_ranges(
    path: str | Path, names: list[str], feeds: list[dict[str, np.ndarray]]
) -> dict[str, tuple[float, float]]:
    """(min, max) of intermediate tensors over calibration feeds, the graph run unoptimised (every tensor exists).
    Token positions the attention mask marks as padding do not count (tensors shaped [batch, seq, ...])."""
    import onnx

    model = onnx.load(str(path))
    for name in names:
        model.graph.output.append(onnx.helper.make_value_info(name, onnx.TypeProto()))
    so = ort.SessionOptions()
    so.graph_optimization_level = LEVELS["disable_all"]
    so.log_severity_level = 3
    sess = ort.InferenceSession(model.SerializeToString(), so, providers=[CPU_EP])
    lo, hi = dict.fromkeys(names, np.inf), dict.fromkeys(names, -np.inf)
    for feed in feeds:
        mask = np.asarray(feed["attention_mask"]).astype(bool) if "attention_mask" in feed else None
        for name, value in zip(names, sess.run(names, select_feeds(sess, feed))):
            if mask is not None and value.shape[: mask.ndim] == mask.shape:
                value = value[mask]
            if value.size:
                lo[name], hi[name] = min(lo[name], float(value.min())), max(hi[name], float(value.max()))
    return {n: (lo[n], hi[n]) for n in names}
