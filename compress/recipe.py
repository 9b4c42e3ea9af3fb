"""Recipes: TOML files with ordered ``[[stages]]``; each stage is ``type = "..."`` plus typed parameters.

Parsed once, validated against the registry and the stage's config dataclass; anything unknown is
refused with the list of what is valid.
"""
from __future__ import annotations

import dataclasses
import tomllib
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from compress.errors import CompressError
from compress.stages import REGISTRY, StageError, StageType

RECIPE_DIR = Path(__file__).parent / "recipes"


@dataclass(frozen=True)
class StageSpec:
    type: StageType
    config: Any                    # an instance of type.config

    @property
    def name(self) -> str:
        return self.type.name

    def params(self) -> dict:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self.config).items()}


@dataclass(frozen=True)
class Recipe:
    name: str
    description: str
    stages: tuple[StageSpec, ...]
    source: str                    # the file it came from

    def as_dict(self) -> dict:
        return {"name": self.name, "description": self.description, "source": self.source,
                "stages": [{"type": s.name, "params": s.params()} for s in self.stages]}


def shipped_recipes() -> dict[str, Path]:
    return {p.stem: p for p in sorted(RECIPE_DIR.glob("*.toml"))}


def _coerce(stage: str, key: str, value: Any, hint: Any) -> Any:
    origin = typing.get_origin(hint)
    if origin is tuple:
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise CompressError(f"stage {stage}: '{key}' must be a list of strings, got {value!r}")
        return tuple(value)
    ok = {bool: lambda v: isinstance(v, bool),
          int: lambda v: isinstance(v, int) and not isinstance(v, bool),
          float: lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
          str: lambda v: isinstance(v, str)}[hint]
    if not ok(value):
        raise CompressError(f"stage {stage}: '{key}' must be {hint.__name__}, got {value!r}")
    return float(value) if hint is float else value


def build_stage(raw: dict, where: str) -> StageSpec:
    raw = dict(raw)
    type_name = raw.pop("type", None)
    if type_name not in REGISTRY:
        raise CompressError(f"{where}: unknown stage type {type_name!r}; valid: {', '.join(REGISTRY)}")
    st = REGISTRY[type_name]
    hints = typing.get_type_hints(st.config)
    fields = [f.name for f in dataclasses.fields(st.config)]
    unknown = [k for k in raw if k not in fields]
    if unknown:
        raise CompressError(f"{where}: stage {type_name} has no parameter {', '.join(map(repr, unknown))}; "
                            f"valid: {', '.join(fields)}")
    kwargs = {k: _coerce(type_name, k, v, hints[k]) for k, v in raw.items()}
    try:
        return StageSpec(st, st.config(**kwargs))
    except StageError as e:
        raise CompressError(f"{where}: {e}") from None


def parse_recipe(data: dict, name: str, source: str) -> Recipe:
    unknown = set(data) - {"name", "description", "stages"}
    if unknown:
        raise CompressError(f"recipe {source}: unknown top-level key(s) {', '.join(sorted(unknown))}; "
                            "valid: name, description, stages")
    raw_stages = data.get("stages", [])
    if not isinstance(raw_stages, list):
        raise CompressError(f"recipe {source}: 'stages' must be an array of tables ([[stages]])")
    stages = tuple(build_stage(s, f"recipe {source}, stage {i + 1}") for i, s in enumerate(raw_stages))
    levels = [s.type.level for s in stages]
    if "torch" in levels and "onnx" in levels and levels.index("onnx") < max(i for i, l in enumerate(levels) if l == "torch"):
        raise CompressError(f"recipe {source}: torch-level stages must come before ONNX-level stages (export sits between)")
    return Recipe(name=data.get("name", name), description=data.get("description", ""), stages=stages, source=source)


def load_recipe(name_or_path: str) -> Recipe:
    """A shipped recipe by name, or a TOML file by path."""
    shipped = shipped_recipes()
    if name_or_path in shipped:
        path = shipped[name_or_path]
    else:
        path = Path(name_or_path)
        if not path.is_file():
            raise CompressError(f"unknown recipe '{name_or_path}': use one of {', '.join(shipped)} or a path to a .toml file")
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as e:
        raise CompressError(f"recipe {path} is not valid TOML ({e}): fix the file") from None
    return parse_recipe(data, path.stem, str(path if name_or_path not in shipped else name_or_path))
