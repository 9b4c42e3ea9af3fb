"""What happens when things go wrong (README): every case ends in the right exit status, one line on stderr for a
user's mistake, and an output path that is absent or byte-identical to what it was. Tiny models, small shapes."""

from __future__ import annotations

import hashlib
import os
import queue
import shutil
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from compress.cli import main
from compress.core import errors, fs

ROOT = Path(__file__).resolve().parents[1]
FAST = ["--runs", "2", "--shapes", "1x16"]


def tree(path: Path) -> dict | None:
    """Every file under ``path`` with its sha256 (None when the path does not exist)."""
    if not path.exists():
        return None
    if path.is_file():
        return {".": hashlib.sha256(path.read_bytes()).hexdigest()}
    return {str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(path.rglob("*"))
            if p.is_file()}  # fmt: skip


def leftovers(parent: Path, name: str, tmp: Path | None = None) -> list[str]:
    """Staging / old / lock siblings of ``parent/name``, and scratch folders in ``tmp``."""
    out = [p.name for p in parent.iterdir() if p.name.startswith(f".{name}.")] if parent.is_dir() else []
    if tmp is not None and tmp.is_dir():
        out += [p.name for p in tmp.iterdir() if p.name.startswith(fs.WORK_PREFIX)]
    return out


def invoke(args: list[str]):
    return CliRunner().invoke(main, args)


def one_line(res, needle: str, code: int = 2) -> None:
    """Exit status ``code`` and exactly one line on stderr, holding ``needle``; no traceback."""
    assert res.exit_code == code, (res.exit_code, res.output, res.exception)
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and needle in lines[0], res.stderr


def one_error_after_progress(res, needle: str, code: int = 2) -> None:
    """For a failure found while working: progress lines, then exactly one error line (the last), no traceback."""
    assert res.exit_code == code, (res.exit_code, res.output, res.exception)
    lines = res.stderr.strip().splitlines()
    errors = [line for line in lines if line.startswith("error:")]
    assert errors == [lines[-1]] and needle in lines[-1] and "Traceback" not in res.stderr, res.stderr


# ---- a child `compress run` whose progress lines we can wait for ---------------------------------------------


class Child:
    def __init__(self, args: list[str], cwd: Path, tmp: Path):
        tmp.mkdir(exist_ok=True)
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "TMPDIR": str(tmp),
               "TOKENIZERS_PARALLELISM": "false"}  # fmt: skip
        self.proc = subprocess.Popen([sys.executable, "-m", "compress.cli", *args], cwd=cwd, env=env,
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip
        self.lines: list[str] = []
        self._q: queue.Queue = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.proc.stderr:
            self._q.put(line.rstrip("\n"))
        self._q.put(None)

    def wait_for(self, needle: str, timeout: float = 240) -> None:
        end = time.time() + timeout
        while time.time() < end:
            try:
                line = self._q.get(timeout=1)
            except queue.Empty:
                continue
            if line is None:
                raise AssertionError(f"exited before {needle!r}: {self.lines}")
            self.lines.append(line)
            if needle in line:
                return
        raise AssertionError(f"no {needle!r} in {timeout} s: {self.lines}")

    def finish(self, timeout: float = 300) -> int:
        code = self.proc.wait(timeout)
        while (line := self._q.get(timeout=10)) is not None:
            self.lines.append(line)
        return code


def run_args(model: Path, out: Path, *extra: str) -> list[str]:
    return ["run", str(model), "--recipe", "dynamic-int8", "--out", str(out), *extra]


# ---- concurrent runs, a folder appearing mid-run ----------------------------------------------------------------


def test_a_second_run_into_the_same_out_is_refused_naming_the_first(tiny_dirs, tmp_path):
    out = tmp_path / "o"
    first = Child(run_args(tiny_dirs["st"], out, "--runs", "400", "--shapes", "1x16"), tmp_path, tmp_path / "tmp")
    first.wait_for("measuring latency")
    res = invoke(run_args(tiny_dirs["st"], out, *FAST))
    one_line(res, f"being written by another compress run (PID {first.proc.pid})")
    assert first.finish() == 0, first.lines
    assert (out / "report.json").is_file() and leftovers(tmp_path, "o", tmp_path / "tmp") == []


def test_a_folder_that_appears_mid_run_is_kept(tiny_dirs, tmp_path):
    out = tmp_path / "o"
    child = Child(run_args(tiny_dirs["st"], out, "--runs", "300", "--shapes", "1x16"), tmp_path, tmp_path / "tmp")
    child.wait_for("measuring latency")
    out.mkdir()
    (out / "mine.txt").write_text("mine")
    before = tree(out)
    assert child.finish() == 2
    assert "appeared while this run worked" in child.lines[-1] and child.lines[-1].startswith("error:")
    assert tree(out) == before and leftovers(tmp_path, "o", tmp_path / "tmp") == []


# ---- signals ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("sig, code, phase", [
    (signal.SIGTERM, 143, "exporting the original model"),
    (signal.SIGINT, 130, "exporting the original model"),
    (signal.SIGTERM, 143, "measuring latency"),
    (signal.SIGINT, 130, "measuring latency"),
])  # fmt: skip
def test_signals_leave_nothing_and_exit_as_shells_expect(tiny_dirs, tmp_path, sig, code, phase):
    out = tmp_path / "o"
    child = Child(run_args(tiny_dirs["st"], out, "--runs", "400", "--shapes", "1x16"), tmp_path, tmp_path / "tmp")
    child.wait_for(phase)
    child.proc.send_signal(sig)
    assert child.finish() == code, child.lines
    assert child.lines[-1].startswith(("terminated (SIGTERM)", "interrupted (SIGINT)")), child.lines
    assert not any("Traceback" in line for line in child.lines)
    assert tree(out) is None and leftovers(tmp_path, "o", tmp_path / "tmp") == []


@pytest.mark.parametrize("sig, exc", [(signal.SIGINT, KeyboardInterrupt), (signal.SIGTERM, errors.Terminated)])
def test_a_signal_whose_exception_a_finaliser_swallowed_still_stops_the_commit(tmp_path, monkeypatch, sig, exc):
    """CPython drops an exception raised inside a finaliser ("Exception ignored in ..."); the handler remembers
    the signal so the staged folder is still removed instead of committed."""
    monkeypatch.setattr(errors, "_received", [])
    out = tmp_path / "o"
    with pytest.raises(exc), fs.staged_folder(out) as (staging, _work):
        (staging / "report.json").write_text("{}")
        try:  # what a finaliser does with the handler's exception
            errors.on_signal(sig, None)
        except BaseException:
            pass
    assert tree(out) is None and leftovers(tmp_path, "o") == []


def test_a_sigkilled_run_is_cleaned_up_by_the_next_one(tiny_dirs, tmp_path):
    out, tmp = tmp_path / "o", tmp_path / "tmp"
    child = Child(run_args(tiny_dirs["st"], out, "--runs", "400", "--shapes", "1x16"), tmp_path, tmp)
    child.wait_for("measuring latency")
    child.proc.kill()
    child.finish()
    left = leftovers(tmp_path, "o", tmp)
    assert any(n.startswith(f".o.tmp-{child.proc.pid}-") for n in left) and any(
        n.startswith(fs.WORK_PREFIX) for n in left
    )
    again = Child(run_args(tiny_dirs["st"], out, *FAST), tmp_path, tmp)
    assert again.finish() == 0, again.lines
    assert any("removed .o.tmp-" in line and f"PID {child.proc.pid}" in line for line in again.lines)
    assert (out / "report.json").is_file() and leftovers(tmp_path, "o", tmp) == []


# ---- --force: the swap is atomic, and a crash inside it is repaired --------------------------------------------

SWAP_CHILD = textwrap.dedent("""
    import os, sys, time
    from pathlib import Path
    from compress.core import fs

    out, mode = Path(sys.argv[1]), sys.argv[2]
    staging = out.parent / f".{out.name}.tmp-{os.getpid()}-t"
    staging.mkdir()
    (staging / "result.txt").write_text("new")
    if mode == "exchange":            # pause after the one-step swap, before the old result is removed
        def pause(path):
            print("swapped", flush=True)
            time.sleep(120)
        fs._remove = pause
    else:                             # no exchange on this file system: pause between the two renames
        fs.exchange = lambda a, b: False
        rename = Path.rename
        def once(self, target):
            result = rename(self, target)
            print("between", flush=True)
            time.sleep(120)
            return result
        Path.rename = once
    fs.commit_folder(staging, out)
""")


@pytest.mark.parametrize("mode, marker", [("exchange", "swapped"), ("fallback", "between")])
def test_force_swap_killed_in_its_window_loses_nothing(tmp_path, mode, marker):
    if mode == "exchange" and not _has_exchange(tmp_path):
        pytest.skip("renameat2(RENAME_EXCHANGE) is not available on this file system")
    out = tmp_path / "o"
    out.mkdir()
    (out / "result.txt").write_text("old")
    old = tree(out)
    proc = subprocess.Popen([sys.executable, "-c", SWAP_CHILD, str(out), mode], stdout=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": str(ROOT)})  # fmt: skip
    assert proc.stdout.readline().strip() == marker
    proc.kill()
    proc.wait()
    if mode == "exchange":  # the output already holds the complete new result; the old one waits beside it
        assert (out / "result.txt").read_text() == "new"
    else:  # the output path is missing for now; the old result is kept beside it
        assert not out.exists() and (tmp_path / f".o.old-{proc.pid}").is_dir()
    done = fs.clean_stale(out)
    assert done and leftovers(tmp_path, "o") == []
    assert (out / "result.txt").read_text() == ("new" if mode == "exchange" else "old")
    if mode == "fallback":
        assert tree(out) == old and "restored" in done[0]


def _has_exchange(tmp_path: Path) -> bool:
    a, b = tmp_path / "xa", tmp_path / "xb"
    a.mkdir(), b.mkdir()
    try:
        return fs.exchange(a, b)
    finally:
        a.rmdir(), b.rmdir()


def test_force_replaces_a_result_in_one_step(tiny_dirs, tmp_path):
    out = tmp_path / "o"
    out.mkdir()
    (out / "old.txt").write_text("old")
    res = invoke(run_args(tiny_dirs["st"], out, *FAST, "--force"))
    assert res.exit_code == 0, res.output
    assert not (out / "old.txt").exists() and (out / "onnx" / "model.onnx").is_file() and leftovers(tmp_path, "o") == []


# ---- file systems that cannot take the output --------------------------------------------------------------------


@pytest.fixture
def mount(tmp_path):
    """mount(options) -> a fresh tmpfs folder; skipped where this process may not mount."""
    points = []

    def make(options: str) -> Path:
        point = tmp_path / f"mnt{len(points)}"
        point.mkdir()
        res = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(point)], capture_output=True)
        if res.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here ({res.stderr.decode().strip()[:80]})")
        points.append(point)
        return point

    yield make
    for p in points:
        subprocess.run(["umount", "-l", str(p)], capture_output=True)


def test_read_only_output_file_system(tiny_dirs, mount):
    ro = mount("ro,size=1m")
    res = invoke(run_args(tiny_dirs["st"], ro / "o", *FAST))
    one_line(res, "Read-only file system")
    assert list(ro.iterdir()) == []
    res = invoke(["profile", str(tiny_dirs["st"]), "--json", str(ro / "p.json"), *FAST])
    one_line(res, "cannot write --json")
    assert list(ro.iterdir()) == []


def test_full_output_file_system(tiny_dirs, mount):
    small = mount("size=512k")
    res = invoke(run_args(tiny_dirs["st"], small / "runs" / "o", *FAST))
    one_error_after_progress(res, "No space left on device")
    assert f"cannot write {small}" in res.stderr
    assert list(small.iterdir()) == []  # staging, lock and the runs/ folder this run made are gone


def test_profile_json_to_a_missing_folder_is_refused_before_measuring(tiny_dirs, tmp_path):
    res = invoke(["profile", str(tiny_dirs["st"]), "--json", str(tmp_path / "no" / "p.json"), *FAST])
    one_line(res, "cannot write --json")


# ---- checks before the model loads ------------------------------------------------------------------------------


def test_sequence_beyond_the_models_positions(tiny_dirs, tmp_path):
    res = invoke(run_args(tiny_dirs["st"], tmp_path / "o", "--shapes", "1x100000"))
    one_line(res, "past the model's 128 positions")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("content, needle", [
    (b"g\tf\t2012\t0001\t4.0\tA man plays.\t\xff\xfe bad bytes\n", "is not UTF-8 text"),
    (b"only\tthree\tcolumns\n", "expected 7+ tab-separated columns"),
    (b"g\tf\t2012\t0001\tfive\ta\tb\n", "is not a number"),
])  # fmt: skip
def test_bad_eval_files(tiny_dirs, tmp_path, content, needle):
    bad = tmp_path / "sts.csv"
    bad.write_bytes(content)
    res = invoke(run_args(tiny_dirs["st"], tmp_path / "o", "--eval", f"stsb:{bad}", *FAST))
    one_line(res, needle)
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("name, content, needle", [
    ("d.jsonl", b'{"text": "a"}\nnot json\n', "d.jsonl:2: not a JSON object"),
    ("d.txt", b"\xff\xfe\x00", "is not UTF-8 text"),
])  # fmt: skip
def test_bad_calibration_files(tiny_dirs, tmp_path, name, content, needle):
    data = tmp_path / name
    data.write_bytes(content)
    res = invoke(run_args(tiny_dirs["st"], tmp_path / "o", "--data", str(data), *FAST))
    one_line(res, needle)


def test_a_missing_recipe_file_is_not_an_unknown_recipe(tiny_dirs, tmp_path):
    res = invoke(["run", str(tiny_dirs["st"]), "--recipe", str(tmp_path / "mine.toml"), "--out", str(tmp_path / "o")])
    one_line(res, "recipe file")
    assert "not found" in res.stderr


def test_nan_weights_are_caught_at_load_and_default_out_leaves_no_runs_folder(tiny_dirs, tmp_path, monkeypatch):
    from safetensors.torch import load_file, save_file

    model = tmp_path / "nan-model"
    shutil.copytree(tiny_dirs["encoder"], model)
    weights = load_file(str(model / "model.safetensors"))
    name = next(k for k in weights if k.endswith("query.weight"))
    weights[name][0, 0] = float("nan")
    save_file(weights, str(model / "model.safetensors"))
    work = tmp_path / "cwd"
    work.mkdir()
    monkeypatch.chdir(work)
    res = invoke(["run", str(model), *FAST])
    one_error_after_progress(res, "hold NaN or Inf")  # found as the model loads, before any export
    assert name.split(".", 1)[-1] in res.stderr or name in res.stderr
    assert list(work.iterdir()) == []  # no runs/ folder


# ---- permissions: what is shipped gets the user's umask ---------------------------------------------------------


def test_outputs_get_the_users_umask(tiny_dirs, tmp_path):
    old = os.umask(0o022)
    try:
        res = invoke(["run", str(tiny_dirs["st"]), "--recipe", "delta-90", "--base", str(tiny_dirs["st"]),
                      "--out", str(tmp_path / "d"), *FAST])  # fmt: skip
    finally:
        os.umask(old)
    assert res.exit_code == 0, res.output
    out = tmp_path / "d"
    assert out.stat().st_mode & 0o777 == 0o755
    assert (out / "delta.safetensors").stat().st_mode & 0o777 == 0o644
    assert (out / "onnx" / "model.onnx").stat().st_mode & 0o777 == 0o644
    assert (out / "onnx").stat().st_mode & 0o777 == 0o755
