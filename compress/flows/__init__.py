"""Flows: one way of taking a kind of model to a kind of target, behind one small protocol.

The pipeline asks the flows in ``FLOWS`` order which one ``accepts`` the model kind and target, runs it inside the
staged output folder, stamps ``report["flow"]`` and ``report["schema"]``, and hands the report back to the same
flow (``flow_named``) for the summary the CLI prints and for report.md. ``compress profile`` asks ``profiles`` in the
same order. Adding a flow is one entry in ``FLOWS`` plus its own module.

- ``npu``: QNN HTP pre-flight / Ethos-U through Vela (torch stages, then the vendor's quantizer and compiler).
- ``generative``: decoder-only and encoder-decoder language models (TTFT, tokens/s).
- ``encoder``: encoders on the CPU or a GPU (the GPU is a way of measuring inside it, ``compress.gpu``).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Protocol

from compress.core import Progress
from compress.core.errors import CompressError
from compress.core.kinds import ModelKind
from compress.flows.encoder import ENCODER
from compress.flows.generative import GENERATIVE
from compress.flows.npu import NPU
from compress.flows.types import ProfileRequest, ProfileResult
from compress.steps import Run
from profiles import DeviceProfile, load_profile

SCHEMA = 2  # report.json layout version: 2 adds "flow" and "schema"

LatencyProgress = Callable[[int, int], None]


class Flow(Protocol):
    name: str
    levels: tuple[str, ...]  # the stage levels it applies ("torch", "onnx")
    formats: tuple[str, ...]  # the artefact formats it writes (--format): "onnx", and "ort" for ORT Mobile

    def accepts(self, kind: ModelKind, profile: DeviceProfile) -> bool: ...

    def strict_precisions(self, profile: DeviceProfile) -> bool:
        """Whether a stage producing a precision the target's profile does not list is refused up front."""

    def check(self, run: Run) -> None:
        """Flow-specific checks before any heavy work (one-line CompressError)."""

    def run(self, run: Run, staging: Path, work: Path, progress: Progress, on_latency: LatencyProgress | None) -> dict:
        """Write the artefact into ``staging`` and return the report (without flow/schema)."""

    def summary(self, report: dict) -> str: ...

    def write(self, report: dict, folder: Path) -> None:
        """report.md and plots beside report.json."""

    def profiles(self, artifact: Path, profile: DeviceProfile) -> bool: ...

    def profile(
        self, request: ProfileRequest, progress: Progress, on_latency: LatencyProgress | None
    ) -> ProfileResult: ...


FLOWS: tuple[Flow, ...] = (NPU, GENERATIVE, ENCODER)


def flow_for(kind: ModelKind, profile: DeviceProfile) -> Flow:
    for flow in FLOWS:
        if flow.accepts(kind, profile):
            return flow
    takes = [f"{f.name}" for f in FLOWS if any(f.accepts(kind, p) for p in _cpu())]
    raise CompressError(
        f"{kind} models are not taken to the {profile.kind} target '{profile.name}' yet "
        f"(the {', '.join(takes) or 'no'} flow takes them on the cpu): use --target cpu"
    )


def flow_named(name: str) -> Flow:
    for flow in FLOWS:
        if flow.name == name:
            return flow
    raise CompressError(f"report of unknown flow '{name}': this version knows {', '.join(f.name for f in FLOWS)}")


def profiler_for(artifact: Path, profile: DeviceProfile) -> Flow:
    for flow in FLOWS:
        if flow.profiles(artifact, profile):
            return flow
    raise CompressError(
        f"nothing here profiles {artifact} on target '{profile.name}': pass an artefact folder or "
        ".onnx file from compress run"
    )


def _cpu() -> list[DeviceProfile]:
    return [load_profile("cpu")]


__all__ = ["FLOWS", "SCHEMA", "Flow", "ProfileRequest", "ProfileResult", "flow_for", "flow_named", "profiler_for"]
