"""Device profiles: TOML files describing a deployment target, and their loader.

Users add their own by passing a path to a .toml file as ``--target``.
"""
from __future__ import annotations

import tomllib
from dataclasses import dataclass, field, fields
from pathlib import Path

PROFILE_DIR = Path(__file__).parent


class ProfileError(ValueError):
    pass


@dataclass(frozen=True)
class DeviceProfile:
    name: str
    description: str
    kind: str                       # cpu | gpu | npu
    runtime: str                    # onnxruntime | vela | ...
    execution_provider: str
    latency_source: str             # measured | vendor_model | analytic
    precisions: tuple[str, ...]
    sparsity_patterns: tuple[str, ...] = ()
    notes: tuple[str, ...] = ()
    source_file: str = field(default="", compare=False)


def available_profiles() -> dict[str, Path]:
    return {p.stem: p for p in sorted(PROFILE_DIR.glob("*.toml"))}


def load_profile(name_or_path: str) -> DeviceProfile:
    shipped = available_profiles()
    path = shipped.get(name_or_path) or Path(name_or_path)
    if not path.is_file() or path.suffix != ".toml":
        raise ProfileError(f"unknown target '{name_or_path}': use one of {', '.join(shipped)} or a profile .toml file")
    data = tomllib.loads(path.read_text(encoding="utf-8"))
    names = {f.name for f in fields(DeviceProfile)} - {"source_file"}
    unknown = set(data) - names
    if unknown:
        raise ProfileError(f"profile {path}: unknown key(s) {', '.join(sorted(unknown))}; valid: {', '.join(sorted(names))}")
    required = ("name", "description", "kind", "runtime", "execution_provider", "latency_source", "precisions")
    missing = [k for k in required if k not in data]
    if missing:
        raise ProfileError(f"profile {path}: missing key(s) {', '.join(missing)}")
    data = {k: tuple(v) if isinstance(v, list) else v for k, v in data.items()}
    return DeviceProfile(**data, source_file=str(path))
