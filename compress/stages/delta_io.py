"""The deployable delta: the kept entries of θ_ft − θ_base in one safetensors file, and the rebuild base + delta.

File layout (``delta.safetensors``), per pruned tensor NAME (a state_dict key of the model):
  ``NAME.indices``  flat positions in the tensor, int32 (int64 for tensors of 2^31+ entries)   (k,)
  ``NAME.values``   what is added at those positions (already rescaled), float32 or float16      (k,)
plus one metadata entry ``compress.delta``: JSON with format, method, p, q, seed, base, task, model_type,
shapes (every floating-point tensor of the model, for the architecture check) and base_sha256 (the
fingerprint of the base weights the delta was made against, so a wrong base is refused, not silently used).

The stage (``compress.stages.delta``) and the rebuild (``compress.pipeline.rebuild_from_delta``, the CLI's
``apply-delta``) add a delta with the same function (``add_delta``), so a rebuilt model is bit-identical to the one
the stage produced.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any

from compress.core.errors import CompressError
from compress.core.fs import shippable

FORMAT = "compress.delta/1"
META_KEY = "compress.delta"
INDEX_SUFFIX, VALUE_SUFFIX = ".indices", ".values"

# name -> (flat indices (k,), values (k,), full tensor shape)
Kept = dict[str, tuple[Any, Any, tuple[int, ...]]]


def delta_tensors(model) -> dict[str, Any]:
    """The floating-point tensors of a module's state_dict, by name; integer buffers (position ids) are skipped.

    Tensors sharing storage (tied weights) appear once, under their first name, so a delta is never added twice.
    """
    seen: set[tuple[int, tuple[int, ...]]] = set()
    out = {}
    for name, t in model.state_dict().items():
        if not t.dtype.is_floating_point:
            continue
        key = (t.data_ptr(), tuple(t.shape))
        if t.numel() and key in seen:
            continue
        seen.add(key)
        out[name] = t
    return out


def first_mismatch(
    expected: dict[str, tuple[int, ...]], tensors: dict[str, Any], actual: str = "the base", wanted: str = "the delta"
) -> str | None:
    """The first difference in names or shapes between two models' floating-point tensors, in words; None if none."""
    for name, shape in expected.items():
        if name not in tensors:
            return f"{name} is in {wanted} but not in {actual}"
        if tuple(tensors[name].shape) != tuple(shape):
            return f"{name} is {list(tensors[name].shape)} in {actual} but {list(shape)} in {wanted}"
    extra = [n for n in tensors if n not in expected]
    return f"{extra[0]} is in {actual} but not in {wanted}" if extra else None


def fingerprint(tensors: dict[str, Any]) -> str:
    """sha256 over names, dtypes, shapes and raw bytes of the tensors (in name order)."""
    import torch

    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{list(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().data)
    return h.hexdigest()


def add_delta(base, indices, values):
    """base + delta as a new tensor of base's dtype and shape; the addition is done in float32."""
    out = base.detach().float().reshape(-1).clone()
    out[indices.long()] += values.float()
    return out.reshape(base.shape).to(base.dtype)


def save_delta(path: str | Path, kept: Kept, metadata: dict) -> int:
    """Write the kept entries and metadata to ``path`` (atomically); returns the file's size in bytes."""
    from safetensors.torch import save_file

    path = Path(path)
    tensors = {}
    for name, (idx, vals, _shape) in kept.items():
        tensors[name + INDEX_SUFFIX] = idx.contiguous()
        tensors[name + VALUE_SUFFIX] = vals.contiguous()
    meta = {"format": FORMAT, **metadata, "kept_shapes": {n: list(s) for n, (_, _, s) in kept.items()}}
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        # One metadata key: safetensors writes a multi-key map in no fixed order, and the same seed must give
        # the same bytes.
        save_file(tensors, tmp, metadata={META_KEY: json.dumps(meta, sort_keys=True)})
        shippable(Path(tmp))  # mkstemp made it 0600; the artefact gets the user's umask
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path.stat().st_size


def load_delta(path: str | Path) -> tuple[Kept, dict]:
    """(kept, metadata) from a file written by ``save_delta``; anything else is refused with one line."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise CompressError(f"delta file {path} not found: pass the delta.safetensors a prune.delta run wrote")
    try:
        with safe_open(str(path), framework="pt") as f:
            raw = (f.metadata() or {}).get(META_KEY)
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:
        raise CompressError(
            f"{path} is not a readable safetensors file ({type(e).__name__}): "
            "pass the delta.safetensors a prune.delta run wrote"
        ) from None
    try:
        meta = json.loads(raw) if raw else None
    except json.JSONDecodeError:
        meta = None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise CompressError(
            f"{path} is not a delta file written by prune.delta (no '{META_KEY}' metadata "
            f"of format {FORMAT}): pass the delta.safetensors a prune.delta run wrote"
        )
    kept: Kept = {}
    for name, shape in meta["kept_shapes"].items():
        idx, vals = tensors.get(name + INDEX_SUFFIX), tensors.get(name + VALUE_SUFFIX)
        if idx is None or vals is None or idx.shape != vals.shape:
            raise CompressError(
                f"{path} is damaged: indices/values of {name} are missing or differ in length; "
                "re-create it with compress run --recipe delta-..."
            )
        kept[name] = (idx, vals, tuple(shape))
    return kept, meta


def apply_kept(tensors: dict[str, Any], base: dict[str, Any], kept: Kept) -> None:
    """Set every tensor to base + its kept delta (tensors without a kept entry are set to base)."""
    import torch

    with torch.no_grad():
        for name, t in tensors.items():
            if name in kept:
                idx, vals, _ = kept[name]
                t.copy_(add_delta(base[name], idx, vals))
            else:
                t.copy_(base[name])
