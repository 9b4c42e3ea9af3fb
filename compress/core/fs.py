"""Output folders and scratch directories.

- ``staged_folder``: every output folder (``compress run``, ``compress apply-delta``) is built in a temporary
  sibling and renamed into place when the work succeeds; any failure removes it, so nothing half-written is left,
  and an existing non-empty folder is replaced only when the caller allowed it (``--force``).
- ``scratch_cwd``: run a library call inside a throw-away working directory.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from compress.core.errors import CompressError


def check_out_dir(out: Path, force: bool) -> None:
    """Refuse an existing non-empty output path unless ``force``."""
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not force:
        raise CompressError(f"output {out} already exists and is not empty: pass --force to replace it or choose --out")


@contextlib.contextmanager
def staged_folder(out: Path, work: bool = True) -> Iterator[tuple[Path, Path | None]]:
    """Yield (staging, work dir): the output is built in a temporary sibling of ``out`` and renamed into place
    when the block ends; any failure removes it, so nothing half-written is left. ``work`` is a scratch folder
    removed at the end (None when ``work`` is False)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        if work:
            with tempfile.TemporaryDirectory(prefix="compress-work-") as work_dir:
                yield staging, Path(work_dir)
        else:
            yield staging, None
        commit_folder(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def commit_folder(staging: Path, out: Path) -> None:
    """Rename the finished folder into place; an old one (allowed by --force) is removed only after."""
    old = None
    if out.exists():
        old = out.with_name(f".{out.name}.old-{os.getpid()}")
        out.rename(old)
    staging.rename(out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True) if old.is_dir() else old.unlink()


@contextlib.contextmanager
def scratch_cwd() -> Iterator[Path]:
    """Run a library call inside a throw-away working directory.

    ORT's symbolic shape inference, when it gives up, saves ``sym_shape_infer_temp.onnx`` plus a 90 MB
    external-data file into the *current* directory and never removes them; this keeps the user's folder clean.
    """
    old = os.getcwd()
    with tempfile.TemporaryDirectory(prefix="compress-scratch-") as tmp:
        os.chdir(tmp)
        try:
            yield Path(tmp)
        finally:
            os.chdir(old)


def file_bytes(path: Path) -> int:
    """Size of an ONNX model including any external-data files next to it."""
    extra = sum(p.stat().st_size for p in path.parent.glob(path.name + "*.data"))
    return path.stat().st_size + extra
