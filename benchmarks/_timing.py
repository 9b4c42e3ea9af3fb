"""The benchmarks' interleaved timing loop: every variant once per round, the start rotated each round, under the
shared lock file so that only one benchmark times at a time on this host."""

from __future__ import annotations

import fcntl
import os
from collections.abc import Callable
from typing import Any

LOCK = "/tmp/edge-bench.lock"


def interleaved(fns: dict[str, Callable[[], Any]], rounds: int, before: Callable[[], None] | None = None,
                progress: Callable[[str], None] | None = None) -> tuple[dict[str, list], float, float]:  # fmt: skip
    """({name: [what fns[name]() returned, one per round]}, 1-min load average at the start, at the end)."""
    names = list(fns)
    samples: dict[str, list] = {n: [] for n in names}
    with open(LOCK, "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        load = os.getloadavg()[0]
        for r in range(rounds):
            for i in range(len(names)):
                name = names[(r + i) % len(names)]
                if before is not None:
                    before()
                samples[name].append(fns[name]())
            if progress is not None:
                progress(f"round {r + 1}/{rounds}")
        return samples, load, os.getloadavg()[0]
