"""Recipes: TOML files with ordered ``[[stages]]``; each stage is ``type = "..."`` plus typed parameters.

Parsed once, validated against the registry and the stage's config dataclass; anything unknown is refused with
the list of what is valid. Recipe-level rules come from the registry's declarations (torch stages before ONNX
stages; a compensation stage after a compressing one), and so does the check that a recipe applies to a model
kind and a target (``check_applicable``). Command-line overrides of stage parameters go through
``apply_overrides``.
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import tomllib

from compress.core.data import read_utf8
from compress.core.errors import CompressError
from compress.core.kinds import ModelKind
from compress.stages import REGISTRY, StageType
from profiles import DeviceProfile

RECIPE_DIR = Path(__file__).parent / "recipes"


@dataclass(frozen=True)
class StageSpec:
    type: StageType
    config: Any  # an instance of type.config

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
    source: str  # the file it came from
    # the causal-LM graph: "optimum" (optimum's text-generation-with-past export, then int4 packing and ONNX stages)
    # or "genai" (onnxruntime-genai's model-builder graph holding the torch stages' tables: export.genai_graph)
    export: str = "optimum"

    def as_dict(self) -> dict:
        return {
            "name": self.name,
            "description": self.description,
            "source": self.source,
            "stages": [{"type": s.name, "params": s.params()} for s in self.stages],
            "export": self.export,
        }


EXPORTS = ("optimum", "genai")


def shipped_recipes() -> dict[str, Path]:
    return {p.stem: p for p in sorted(RECIPE_DIR.glob("*.toml"))}


def _coerce(stage: str, key: str, value: Any, hint: Any) -> Any:
    origin = typing.get_origin(hint)
    if origin is tuple:
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise CompressError(f"stage {stage}: '{key}' must be a list of strings, got {value!r}")
        return tuple(value)
    ok = {
        bool: lambda v: isinstance(v, bool),
        int: lambda v: isinstance(v, int) and not isinstance(v, bool),
        float: lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
        str: lambda v: isinstance(v, str),
    }[hint]
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
        raise CompressError(
            f"{where}: stage {type_name} has no parameter {', '.join(map(repr, unknown))}; valid: {', '.join(fields)}"
        )
    kwargs = {k: _coerce(type_name, k, v, hints[k]) for k, v in raw.items()}
    try:
        return StageSpec(st, st.config(**kwargs))
    except CompressError as e:
        raise CompressError(f"{where}: {e}") from None


def parse_recipe(data: dict, name: str, source: str) -> Recipe:
    unknown = set(data) - {"name", "description", "stages", "export"}
    if unknown:
        raise CompressError(
            f"recipe {source}: unknown top-level key(s) {', '.join(sorted(unknown))}; valid: name, description, "
            "stages, export"
        )
    export = data.get("export", "optimum")
    if export not in EXPORTS:
        raise CompressError(f"recipe {source}: export = {export!r} must be one of {', '.join(EXPORTS)}")
    raw_stages = data.get("stages", [])
    if not isinstance(raw_stages, list):
        raise CompressError(f"recipe {source}: 'stages' must be an array of tables ([[stages]])")
    stages = tuple(build_stage(s, f"recipe {source}, stage {i + 1}") for i, s in enumerate(raw_stages))
    check_rules(stages, source)
    if export == "genai" and any(s.type.level == "onnx" for s in stages):
        raise CompressError(
            f'recipe {source}: export = "genai" takes torch-level stages only (the builder\'s graph is packed from '
            "their tables): drop the ONNX-level stages"
        )
    return Recipe(name=data.get("name", name), description=data.get("description", ""), stages=stages, source=source,
                  export=export)  # fmt: skip


def load_recipe(name_or_path: str) -> Recipe:
    """A shipped recipe by name, or a TOML file by path."""
    shipped = shipped_recipes()
    if name_or_path in shipped:
        path = shipped[name_or_path]
    else:
        path = Path(name_or_path)
        if not path.is_file():
            if path.suffix == ".toml" or "/" in name_or_path or path.exists():
                raise CompressError(
                    f"recipe file {path} not found: pass an existing .toml file or a shipped recipe "
                    f"({', '.join(shipped)})"
                )
            raise CompressError(
                f"unknown recipe '{name_or_path}': use one of {', '.join(shipped)} or a path to a .toml file"
            )
    try:
        data = tomllib.loads(read_utf8(path))
    except tomllib.TOMLDecodeError as e:
        raise CompressError(f"recipe {path} is not valid TOML ({e}): fix the file") from None
    return parse_recipe(data, path.stem, str(path if name_or_path not in shipped else name_or_path))


def check_rules(stages: tuple[StageSpec, ...], source: str) -> None:
    """Rules about the order of stages, from what the registry declares."""
    levels = [s.type.level for s in stages]
    if (
        "torch" in levels
        and "onnx" in levels
        and levels.index("onnx") < max(i for i, level in enumerate(levels) if level == "torch")
    ):
        raise CompressError(
            f"recipe {source}: torch-level stages must come before ONNX-level stages (export sits between)"
        )
    for i, spec in enumerate(stages):
        if "earlier_compression" in spec.type.needs_for(spec.config) and not any(
            s.type.compresses and s.type.level == "torch" for s in stages[:i]
        ):
            makers = ", ".join(n for n, t in REGISTRY.items() if t.compresses and t.level == "torch")
            raise CompressError(
                f"recipe {source}: {spec.name} compensates the error of an earlier compressing stage "
                f"and has none before it: put one of {makers} first"
            )


def check_applicable(
    recipe: Recipe,
    kind: ModelKind,
    profile: DeviceProfile,
    levels: tuple[str, ...] = ("torch", "onnx"),
    strict_precisions: bool = True,
) -> None:
    """Refuse, before any heavy work, a stage that is not built for this model kind or (``strict_precisions``)
    produces a precision the target does not list. ``levels``: the stage levels the flow will apply (an NPU flow
    applies torch stages only)."""
    if recipe.export == "genai" and kind != "causal-lm":
        raise CompressError(
            f'recipe {recipe.name}: export = "genai" builds onnxruntime-genai\'s decoder graph, for causal LMs '
            f"only ({kind} given): use a recipe without it"
        )
    for spec in recipe.stages:
        if spec.type.level not in levels:
            continue
        if kind not in spec.type.kinds:
            hint = "; ".join(n for n, t in REGISTRY.items() if kind in t.kinds)
            raise CompressError(
                f"stage {spec.name} is not built for {kind} models yet (it takes "
                f"{', '.join(spec.type.kinds)}): use a recipe with stages built for them "
                f"({hint}), e.g. --recipe {_example_recipe(kind) or 'fp32'}"
            )
        missing = [p for p in spec.type.precisions(spec.config) if strict_precisions and p not in profile.precisions]
        if missing:
            raise CompressError(
                f"stage {spec.name} produces {', '.join(missing)}, which target {profile.name} does not "
                f"run (it lists {', '.join(profile.precisions)}): choose stages or parameters that "
                "produce those"
            )


def _example_recipe(kind: ModelKind) -> str | None:
    """The first shipped recipe whose every stage is built for ``kind`` and which has a stage and needs no input of
    its own (a --base model, --train pairs)."""
    for name in shipped_recipes():
        r = load_recipe(name)
        needs_input = any(s.type.needs_for(s.config) & {"base", "labels"} for s in r.stages)
        if r.stages and all(kind in s.type.kinds for s in r.stages) and not needs_input:
            return name
    return None


def apply_overrides(
    recipe: Recipe, overrides: dict[str, str], flags: dict[str, str] | None = None, kind: ModelKind | None = None
) -> Recipe:
    """Set stage parameters from the command line: ``{"max_drop": "0.3"}`` sets ``max_drop`` on every stage of the
    recipe that has that parameter. A config class may parse its own values (``parse_override(key, text) -> dict``
    of fields, e.g. quant.mixed's "0.5%", which also sets ``relative``); otherwise the text is read as a TOML value
    and checked like a recipe's. ``flags`` names the option each key came from, for the messages; ``kind`` (the
    model's) picks the recipe the message suggests among those built for it."""
    flags = flags or {}
    for key in overrides:
        if not any(key in _fields(s.config) for s in recipe.stages):
            owners = [n for n, t in REGISTRY.items() if key in _fields(t.config)]
            having = [n for n in shipped_recipes() if any(s.name in owners for s in load_recipe(n).stages)]
            fitting = [n for n in having if kind is None or all(kind in s.type.kinds for s in load_recipe(n).stages)]
            # shipped recipes made for causal LMs are named lm-*: suggest those for LMs and the others otherwise
            fitting.sort(key=lambda n: n.startswith("lm-") != (kind == "causal-lm"))
            example = next(iter(fitting or having), None)
            fix = f"use --recipe {example}" if example else "set a parameter one of its stages has"
            raise CompressError(
                f"{flags.get(key, '--set ' + key)} sets '{key}' of {' / '.join(owners) or 'no stage type'}, "
                f"which recipe '{recipe.name}' does not have: {fix}"
            )
    stages = []
    for spec in recipe.stages:
        changes: dict[str, Any] = {}
        origin: dict[str, str] = {}
        for key, text in overrides.items():
            if key not in _fields(spec.config):
                continue
            flag = flags.get(key, f"--set {key}")
            for name, value in _override_value(spec, key, text).items():
                if name in changes and changes[name] != value:
                    raise CompressError(
                        f"{origin[name]} and {flag} set '{name}' of {spec.name} differently "
                        f"({changes[name]!r} vs {value!r}): give them in the same form"
                    )
                changes[name], origin[name] = value, flag
        if changes:
            spec = dataclasses.replace(spec, config=dataclasses.replace(spec.config, **changes))
        stages.append(spec)
    return dataclasses.replace(recipe, stages=tuple(stages))


def _fields(config: Any) -> set[str]:
    return {f.name for f in dataclasses.fields(config)}


def _override_value(spec: StageSpec, key: str, text: str) -> dict:
    parse = getattr(spec.config, "parse_override", None)
    changes = parse(key, text) if parse else {}
    if changes:
        return changes
    try:
        value = tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        value = text  # a bare word: a string parameter
    return {key: _coerce(spec.name, key, value, typing.get_type_hints(type(spec.config))[key])}
