"""The shape of the code, checked: one-way layers (import-linter), no import cycle, ruff, a registry every stage
builds from, and that a new stage or a new flow needs nothing but its registry entry and its own code."""

from __future__ import annotations

import dataclasses
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import grimp
import pytest
from click.testing import CliRunner

import compress.flows as flows
from compress.cli import main
from compress.core.errors import CompressError
from compress.recipe import parse_recipe
from compress.stages import NEEDS, REGISTRY, StageError, StageType

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("compress", "export", "runtimes", "profiles")


def test_import_linter_contracts_hold():
    exe = shutil.which("lint-imports") or str(Path(sys.executable).with_name("lint-imports"))
    res = subprocess.run([exe, "--config", str(ROOT / "pyproject.toml")], cwd=ROOT, capture_output=True, text=True)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-2000:]
    assert "0 broken" in res.stdout


def _cycles(graph) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan), over direct imports."""
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]
    modules = sorted(m for m in graph.modules if m.split(".")[0] in PACKAGES)

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph.find_modules_directly_imported_by(v):
            if w.split(".")[0] not in PACKAGES:
                continue
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    sys.setrecursionlimit(max(sys.getrecursionlimit(), 10000))
    for m in modules:
        if m not in index:
            visit(m)
    return out


def test_no_import_cycle_among_the_projects_modules():
    graph = grimp.build_graph(*PACKAGES)
    assert _cycles(graph) == []


def test_ruff_lint_and_format_are_clean():
    ruff = shutil.which("ruff") or str(Path(sys.executable).with_name("ruff"))
    lint = subprocess.run([ruff, "check", "."], cwd=ROOT, capture_output=True, text=True)
    assert lint.returncode == 0, lint.stdout[-3000:]
    fmt = subprocess.run([ruff, "format", "--check", "."], cwd=ROOT, capture_output=True, text=True)
    assert fmt.returncode == 0, fmt.stdout[-3000:]


@pytest.mark.parametrize("name", sorted(REGISTRY))
def test_every_registered_stage_builds_with_its_defaults(name):
    st = REGISTRY[name]
    cfg = st.config()  # every parameter has a default that works
    assert dataclasses.is_dataclass(cfg) and st.name == name and st.level in ("torch", "onnx")
    assert set(st.needs_for(cfg)) <= set(NEEDS) and st.kinds
    assert isinstance(st.precisions(cfg), tuple)
    spec = (
        parse_recipe({"stages": [{"type": name}]}, "x", "x.toml")
        if "earlier_compression" not in st.needs_for(cfg)
        else None
    )
    assert spec is None or spec.stages[0].config == cfg


def test_a_precision_the_target_does_not_list_is_refused_before_any_work(tiny_dirs, tmp_path):
    """From the registry's declarations (quant.int4 produces int4-weights), one line, nothing written."""
    cpu = (ROOT / "profiles" / "cpu.toml").read_text()
    profile = tmp_path / "small-cpu.toml"
    profile.write_text(
        re.sub(r"(?m)^precisions = .*$", 'precisions = ["fp32", "int8-dynamic"]', cpu).replace(
            'name = "cpu"', 'name = "small-cpu"'
        )
    )
    out = tmp_path / "o"
    res = CliRunner().invoke(
        main, ["run", str(tiny_dirs["st"]), "--target", str(profile), "--recipe", "int4", "--out", str(out)]
    )
    assert res.exit_code == 2 and res.output.count("\n") == 1, res.output
    assert "quant.int4 produces int4-weights, which target small-cpu does not run" in res.output
    assert not out.exists()
    res = CliRunner().invoke(
        main, ["run", str(tiny_dirs["st"]), "--target", str(profile), "--recipe", "mixed", "--out", str(out)]
    )
    assert res.exit_code == 2 and "int4-weights" in res.output and not out.exists()


# ---- adding a stage: one registry entry + its own code, nothing in pipeline / CLI / report ---------------------


@dataclasses.dataclass(frozen=True)
class Scale:
    """A trivial torch-level stage for the test: multiply one Linear's weight by ``factor``."""

    factor: float = 1.0
    layer: str = "*query"

    def __post_init__(self) -> None:
        if self.factor <= 0:
            raise StageError(f"test.scale: factor={self.factor} must be > 0")


def apply_scale(cfg: Scale, lm, ctx):
    from compress.core.models import linear_layers

    layers = linear_layers(lm, (cfg.layer,))
    for mod in layers.values():
        mod.weight.data.mul_(cfg.factor)
    return lm, {"layers_scaled": len(layers), "saw_original": ctx.original is not None}


def test_a_new_stage_needs_only_its_registry_entry(tiny_dirs, tmp_path, monkeypatch):
    monkeypatch.setitem(
        REGISTRY,
        "test.scale",
        StageType("test.scale", "torch", Scale, apply_scale, "scale one layer (test)", needs=frozenset({"original"})),
    )
    recipe = tmp_path / "scale.toml"
    recipe.write_text('[[stages]]\ntype = "test.scale"\nfactor = 1.0\n\n[[stages]]\ntype = "quant.dynamic"\n')
    out = tmp_path / "o"
    res = CliRunner().invoke(
        main,
        [
            "run",
            str(tiny_dirs["st"]),
            "--recipe",
            str(recipe),
            "--out",
            str(out),
            "--runs",
            "2",
            "--shapes",
            "1x16",
            "--set",
            "factor=2.0",
        ],
        catch_exceptions=False,
    )
    assert res.exit_code == 0, res.output
    report = json.loads((out / "report.json").read_text())
    stage = report["stages"][0]
    assert stage["name"] == "test.scale" and stage["params"]["factor"] == 2.0
    assert stage["metrics"] == {"layers_scaled": 2, "saw_original": True}  # context filled by need
    assert "test.scale" in (out / "report.md").read_text()
    bad = CliRunner().invoke(
        main, ["run", str(tiny_dirs["st"]), "--recipe", str(recipe), "--out", str(tmp_path / "b"), "--set", "factor=-1"]
    )
    assert bad.exit_code == 2 and "factor=-1.0 must be > 0" in bad.output and not (tmp_path / "b").exists()


# ---- adding a flow: one entry in FLOWS + its own code -----------------------------------------------------------


class EchoFlow:
    """A trivial flow for the test: takes encoders to the cpu and writes one file."""

    name = "echo"
    levels = ("torch", "onnx")
    formats = ("onnx",)

    def accepts(self, kind, profile):
        return kind == "encoder" and profile.kind == "cpu"

    def strict_precisions(self, profile):
        return True

    def check(self, run):
        if run.cfg.evals != ("fidelity",):
            raise CompressError("echo takes no --eval")

    def run(self, run, staging, work, progress, on_latency):
        (staging / "echo.txt").write_text(run.cfg.model)
        return {"model": {"name": run.cfg.model}, "stages": [s.name for s in run.recipe.stages]}

    def summary(self, report):
        return f"echo: {report['model']['name']}"

    def write(self, report, folder):
        (folder / "report.md").write_text("# echo\n")

    def profiles(self, artifact, profile):
        return False

    def profile(self, request, progress, on_latency):
        raise AssertionError


def test_a_new_flow_needs_only_its_entry(tiny_dirs, tmp_path, monkeypatch):
    monkeypatch.setattr(flows, "FLOWS", (EchoFlow(), *flows.FLOWS))
    out = tmp_path / "o"
    res = CliRunner().invoke(
        main, ["run", str(tiny_dirs["st"]), "--recipe", "dynamic-int8", "--out", str(out)], catch_exceptions=False
    )
    assert res.exit_code == 0, res.output
    report = json.loads((out / "report.json").read_text())
    assert report["flow"] == "echo" and report["schema"] == flows.SCHEMA and report["stages"] == ["quant.dynamic"]
    assert "echo:" in res.output and (out / "echo.txt").is_file() and (out / "report.md").read_text() == "# echo\n"
    res = CliRunner().invoke(main, ["run", str(tiny_dirs["st"]), "--eval", "stsb:x", "--out", str(tmp_path / "b")])
    assert res.exit_code == 2 and "echo takes no --eval" in res.output
