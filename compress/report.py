"""What every report records about the artefact and the software: sizes, hashes, versions.

report.json is written by the pipeline; each flow writes its own report.md and plots (``compress.flows``).
"""

from __future__ import annotations

import hashlib
import platform
import tempfile
import zipfile
from importlib import metadata
from pathlib import Path

PACKAGES = (
    "edge-compress",
    "torch",
    "onnx",
    "onnxruntime",
    "optimum",
    "optimum-onnx",
    "transformers",
    "sentence-transformers",
    "neural-compressor-pt",
    "numpy",
)
# Back-end extras, recorded when installed.
EXTRAS = ("onnxruntime-qnn", "ethos-u-vela", "litert-torch", "ai-edge-litert")


def versions(extras: bool = False) -> dict:
    """Python and package versions; ``extras`` adds the target back-ends' packages that are installed."""
    out = {"python": platform.python_version()}
    for name in PACKAGES + (EXTRAS if extras else ()):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return out


def zipped_bytes(path: Path) -> int:
    """Size after deflate: what sparsity buys on disk and over the air even where no kernel skips zeros."""
    with tempfile.TemporaryFile() as f:
        with zipfile.ZipFile(f, "w", compression=zipfile.ZIP_DEFLATED) as z:
            z.write(path, path.name)
        return f.tell()


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def markdown_head(title: str, intro: str, findings: list[str]) -> list[str]:
    """The first lines of every report.md: title, one line of context, the findings as bullets."""
    return [f"# {title}", "", intro, "", "## Findings", "", *(f"- {f}" for f in findings)]
