"""Output folders that never lose data, and scratch directories.

Every output folder (``compress run``, ``compress apply-delta``) goes through ``staged_folder``:

1. **Lock.** ``.NAME.lock`` beside the output, ``flock``-ed for the whole run and holding the run's PID: a second run
   into the same folder is refused in one line naming that PID. The kernel drops the lock when a process dies.
2. **Stale siblings.** What a killed run (SIGKILL, power loss) left beside the output is found by the PID in its name
   and removed, saying so: staging folders ``.NAME.tmp-PID-*``, an old result ``.NAME.old-PID`` (from the fallback
   swap below; when the output itself is missing, the old result is put back instead), and scratch folders
   ``compress-work-PID-*`` in the temporary directory.
3. **Staging.** The result is built in ``.NAME.tmp-PID-*`` (created with the user's umask) and checked again at
   commit: a non-empty folder that appeared at the output while the run worked is kept and the run refused, unless
   ``--force``.
4. **Commit.** A new output is a plain rename. Replacing one (``--force``) swaps the two folders in one step with
   ``renameat2(RENAME_EXCHANGE)`` (Linux 3.15+), so the output path always holds a complete result, then removes the
   old one. Where the file system has no exchange, the old result is renamed to ``.NAME.old-PID`` first; a crash
   between the two renames is repaired by the next run (step 2).

Any failure or interruption (SIGINT, SIGTERM, an error) removes the staging and scratch folders and the folders
the run created for the output; an OSError while writing becomes one line naming the path and the reason.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import os
import re
import secrets
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from compress.core import Progress, silent
from compress.core.errors import CompressError, raise_if_signalled

WORK_PREFIX = "compress-work-"
_AT_FDCWD = -100
_RENAME_EXCHANGE = 2
# errno values of a write that the place cannot take (a full or read-only file system), wherever they happen, and
# of a place the user may not write to (only under the output's folder or the run's scratch folder).
FULL_ERRNOS = {errno.ENOSPC, errno.EROFS, errno.EDQUOT}
ACCESS_ERRNOS = {errno.EACCES, errno.EPERM, errno.ENOTDIR}


def check_out_dir(out: Path, force: bool) -> None:
    """Refuse an existing non-empty output path unless ``force``."""
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not force:
        raise CompressError(f"output {out} already exists and is not empty: pass --force to replace it or choose --out")


def write_error(e: OSError, what: str = "the output") -> CompressError:
    """One line for an OSError met while writing: the path and the reason."""
    where = getattr(e, "filename2", None) or e.filename or what  # a copy's destination, else the file
    return CompressError(
        f"cannot write {where}: {e.strerror or e}: free space, fix the permissions or choose another --out"
    )


def is_write_error(e: OSError, places: list[Path]) -> bool:
    """Whether an OSError is the output's (or scratch folder's) file system refusing a write: a user error."""
    if e.errno in FULL_ERRNOS:
        return True
    names = [str(n) for n in (e.filename, getattr(e, "filename2", None)) if n]
    return e.errno in ACCESS_ERRNOS and any(n.startswith(str(p)) for n in names for p in places if p is not None)


def write_text(path: Path, text: str) -> None:
    """Write a small file whole or not at all (temporary sibling + rename); an OSError becomes one line."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        tmp.write_text(text)
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise write_error(e, str(path)) from None


# ---- the lock -----------------------------------------------------------------------------------------------


def lock_path(out: Path) -> Path:
    return out.parent / f".{out.name}.lock"


@contextlib.contextmanager
def output_lock(out: Path) -> Iterator[None]:
    """Hold an exclusive lock on ``out`` for the block (the PID is written in the lock file)."""
    path = lock_path(out)
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 32).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise CompressError(
                f"{out} is being written by another compress run (PID {holder}): wait for it to "
                "finish or choose another --out"
            ) from None
        try:  # the file we locked must still be the one at the path (a finishing run unlinks it)
            same = os.stat(path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)
    try:
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        yield
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        os.close(fd)


# ---- stale siblings -------------------------------------------------------------------------------------------


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def clean_stale(out: Path, progress: Progress = silent) -> list[str]:
    """Remove (or, for a lost output, restore) what runs that died left beside ``out``; returns what was done."""
    done = []
    name = re.escape(out.name)
    pattern = re.compile(rf"^\.{name}\.(tmp|old)-(\d+)(-.*)?$")
    siblings = sorted(out.parent.iterdir()) if out.parent.is_dir() else []
    for p in siblings:
        m = pattern.match(p.name)
        if not m or pid_alive(int(m.group(2))):
            continue
        if m.group(1) == "old" and not out.exists():
            p.rename(out)
            done.append(
                f"restored {out} from {p.name}, left by a --force run (PID {m.group(2)}) that was killed "
                "between its two renames"
            )
        else:
            _remove(p)
            done.append(f"removed {p.name}, left by a run (PID {m.group(2)}) that was killed")
    tmp = Path(tempfile.gettempdir())
    for p in sorted(tmp.glob(f"{WORK_PREFIX}*")):
        m = re.match(rf"^{WORK_PREFIX}(\d+)-", p.name)
        if m and not pid_alive(int(m.group(1))):
            _remove(p)
            done.append(f"removed {p}, scratch of a run (PID {m.group(1)}) that was killed")
    for line in done:
        progress(line)
    return done


# ---- staging and commit ---------------------------------------------------------------------------------------


def _make_parents(path: Path) -> list[Path]:
    """mkdir -p; returns the folders this call created (deepest last)."""
    missing = []
    for p in [path, *path.parents]:
        if p.exists():
            break
        missing.append(p)
    for p in reversed(missing):
        p.mkdir()
    return list(reversed(missing))


def _remove_created(created: list[Path]) -> None:
    for p in reversed(created):
        with contextlib.suppress(OSError):
            p.rmdir()  # only if still empty


@contextlib.contextmanager
def staged_folder(out: Path, force: bool = False, work: bool = True,
                  progress: Progress = silent) -> Iterator[tuple[Path, Path | None]]:  # fmt: skip
    """Yield (staging, work dir) under the output's lock; the staging folder becomes ``out`` when the block ends
    (see the module's docstring). ``work`` is a scratch folder removed at the end (None when ``work`` is False)."""
    try:
        created = _make_parents(out.parent)
    except OSError as e:
        raise write_error(e) from None
    work_dir = None
    try:
        with output_lock(out):
            clean_stale(out, progress)
            check_out_dir(out, force)
            staging = out.parent / f".{out.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}"
            staging.mkdir()  # mode 0o777 & ~umask: an artefact meant to be shipped
            work_dir = Path(tempfile.mkdtemp(prefix=f"{WORK_PREFIX}{os.getpid()}-")) if work else None
            try:
                yield staging, work_dir
                raise_if_signalled()  # a SIGINT / SIGTERM whose exception a finaliser swallowed
                if out.exists() and (not out.is_dir() or any(out.iterdir())) and not force:
                    raise CompressError(
                        f"{out} appeared while this run worked and is not empty: it was kept and "
                        "nothing was written; pass --force to replace it or choose --out"
                    )
                commit_folder(staging, out)
            except BaseException:
                _remove(staging)
                raise
            finally:
                if work_dir is not None:
                    shutil.rmtree(work_dir, ignore_errors=True)
    except OSError as e:
        _remove_created(created)
        if is_write_error(e, [out.parent, work_dir]):
            raise write_error(e) from None
        raise
    except BaseException:
        _remove_created(created)
        raise


def exchange(a: Path, b: Path) -> bool:
    """Swap two existing paths in one step (renameat2 RENAME_EXCHANGE); False where the OS or file system lacks it."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    res = renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE)
    if res == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), str(b))


def commit_folder(staging: Path, out: Path) -> None:
    """Put the finished folder at ``out``: a rename, or an atomic swap with an old result that is then removed."""
    if not out.exists():
        staging.rename(out)
        return
    if exchange(staging, out):  # out now holds the new result, staging the old one
        _remove(staging)
        return
    old = out.with_name(f".{out.name}.old-{os.getpid()}")  # fallback: the next run repairs a crash in between
    out.rename(old)
    staging.rename(out)
    _remove(old)


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


def shippable(path: Path) -> None:
    """Give a file made by mkstemp (0600) the permissions a new file gets under the user's umask."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o666 & ~umask)
