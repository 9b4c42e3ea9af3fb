"""How strong `recover`'s tuned teacher is per fine-tuning setting: MiniLM fine-tuned with CoSENT on STS-B train
(``compress.stages.recover._tuned_teacher``, the code the search's trials use), scored in torch on the two halves of
STS-B dev the search uses (even rows: selection, odd rows: held-out).

    python benchmarks/teacher.py 100:5e-5 300:1e-4 [STEPS:LR ...]      # ~3.5 min per 300 steps on 2 cores

Writes benchmarks/results/teacher.{json,md}.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

from _results import save

from compress.cli import _quiet_libraries

STSB = Path(__file__).resolve().parents[2] / "shared" / "data" / "stsb"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("settings", nargs="+", help="STEPS:LEARNING_RATE, e.g. 300:1e-4")
    args = ap.parse_args()
    if not (STSB / "sts-dev.csv").is_file():
        raise SystemExit(f"needs {STSB}/sts-dev.csv and sts-train.csv")
    try:
        settings = [(int(s.split(":")[0]), float(s.split(":")[1])) for s in args.settings]
    except (ValueError, IndexError):
        raise SystemExit("settings are STEPS:LEARNING_RATE, e.g. 300:1e-4") from None
    _quiet_libraries()
    from compress.core.data import read_stsb
    from compress.core.evaluate import EvalSpec, stsb_spearman
    from compress.core.models import load_model, torch_outputs
    from compress.search import split_eval
    from compress.stages.base import TorchContext
    from compress.stages.recover import Recover, _tuned_teacher
    from runtimes.host import host_info

    sel, held = split_eval(EvalSpec("stsb", STSB / "sts-dev.csv"), None, Path(tempfile.mkdtemp()))
    lm, pairs = load_model("minilm"), read_stsb(STSB / "sts-train.csv")

    def scores(model) -> dict:
        return {n: round(stsb_spearman(lambda t: torch_outputs(model, t), p), 3) for n, p in (("selection", sel),
                                                                                               ("heldout", held))}  # fmt: skip

    out = {"command": "python benchmarks/teacher.py " + " ".join(sys.argv[1:]), "host": host_info().as_dict(),
           "load_start": os.getloadavg(), "original": scores(lm), "rows": []}  # fmt: skip
    for steps, lr in settings:
        t0 = time.perf_counter()
        ctx = TorchContext(calibration=(), original=lm, labelled=pairs, memo={})
        teacher = _tuned_teacher(ctx, Recover(teacher="tuned", teacher_steps=steps, teacher_learning_rate=lr))
        out["rows"].append({"steps": steps, "learning_rate": lr, **scores(teacher),
                            "seconds": round(time.perf_counter() - t0, 1)})  # fmt: skip
    out["load_end"] = os.getloadavg()
    save("teacher", out, table)


def table(out: dict) -> str:
    o = out["original"]
    lines = ["# recover's tuned teacher: MiniLM fine-tuned on STS-B train, scored in torch on the halves of dev", "",
             f"Command: `{out['command']}`; load average {out['load_start'][0]:.1f} -> {out['load_end'][0]:.1f}.", "",
             "| teacher | selection (even dev rows) | held-out (odd dev rows) | seconds |", "|---|---|---|---|",
             f"| original | {o['selection']:.3f} | {o['heldout']:.3f} | |"]  # fmt: skip
    lines += [f"| {r['steps']} steps at {r['learning_rate']:g} | {r['selection']:.3f} | {r['heldout']:.3f} | "
              f"{r['seconds']:.0f} |" for r in out["rows"]]  # fmt: skip
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
