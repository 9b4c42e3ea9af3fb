"""What ``compress profile`` hands a flow and gets back."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from profiles import DeviceProfile
from runtimes.profiler import ProfileConfig


@dataclass(frozen=True)
class ProfileRequest:
    artifact: Path  # an artefact folder or an .onnx / .tflite file
    profile: DeviceProfile
    latency: ProfileConfig = field(default_factory=ProfileConfig)
    baseline: Path | None = None  # another artefact timed side by side
    new_tokens: int = 32  # generative folders


@dataclass(frozen=True)
class ProfileResult:
    lines: list[str]  # what the CLI prints
    data: dict  # what --json writes
