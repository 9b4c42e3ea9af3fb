"""Where every benchmark writes its results: benchmarks/results/NAME.{json,md} (+ .png when it plots)."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

RESULTS = Path(__file__).parent / "results"


def save(name: str, out: dict, table: Callable[[dict], str], plot: Callable[[dict, Path], None] | None = None) -> None:
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{name}.json").write_text(json.dumps(out, indent=2) + "\n")
    (RESULTS / f"{name}.md").write_text(table(out))
    if plot is not None:
        plot(out, RESULTS / f"{name}.png")
    print(table(out))
