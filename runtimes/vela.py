"""Arm Ethos-U through the Vela compiler (optional extra ``[ethos]``): compile an int8 TFLite, read Vela's
performance model.

Vela's numbers are a vendor performance model (``source = "vendor_model"``), repeatable but not a measurement.
Vela runs as its own command line (``ethosu.vela.vela.main``) with the accelerator, system and memory configs
given explicitly (without them it falls back to defaults and warns); what stands beside it is reading its
summary CSV (cycles_npu, inference_time, bandwidth), its per-layer CSV (``--verbose-performance``: cycles, MACs,
NPU vs CPU placement) and the "Warning (supported operators)" lines that say why an op stays on the CPU.
"""

from __future__ import annotations

import csv
import re
import subprocess
import sys
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from compress.core.errors import CompressError

INSTALL_HINT = 'pip install "edge-compress[ethos]"'
VELA_CONFIG = "Arm/vela.ini"  # shipped inside ethos-u-vela (vela --list-config-files)
SUMMARY_KEYS = (
    "accelerator_configuration",
    "system_config",
    "memory_mode",
    "core_clock",
    "inference_time",
    "inferences_per_second",
    "cycles_npu",
    "cycles_total",
    "nn_macs",
    "sram_memory_used",
    "off_chip_flash_memory_used",
    "dram_memory_used",
    "total_original_weights",
    "total_npu_encoded_weights",
    "weights_storage_area",
    "feature_map_storage_area",
    "sram_total_bytes",
    "dram_total_bytes",
    "off_chip_flash_total_bytes",
)


def require_vela() -> str:
    """Vela's version, or one line that names the extra."""
    try:
        from importlib import import_module
        from importlib.metadata import version

        import_module("ethosu.vela")
        return version("ethos-u-vela")
    except ImportError:
        raise CompressError(f"target needs ethos-u-vela (the Arm Ethos-U compiler): {INSTALL_HINT}") from None


@dataclass(frozen=True)
class VelaConfig:
    accelerator_config: str
    system_config: str
    memory_mode: str
    config_file: str = VELA_CONFIG

    @classmethod
    def from_profile(cls, profile) -> VelaConfig:
        keys = ("accelerator_config", "system_config", "memory_mode")
        missing = [k for k in keys if not profile.option(k)]
        if missing:
            raise CompressError(
                f"profile {profile.name}: [options] lacks {', '.join(missing)}: Vela must be given "
                "explicit configs (see profiles/npu-ethos-u55.toml)"
            )
        return cls(*(profile.option(k) for k in keys), config_file=profile.option("vela_config", VELA_CONFIG))

    def args(self) -> list[str]:
        return [
            "--config",
            self.config_file,
            "--accelerator-config",
            self.accelerator_config,
            "--system-config",
            self.system_config,
            "--memory-mode",
            self.memory_mode,
        ]


@dataclass
class VelaResult:
    tool: str
    config: VelaConfig
    summary: dict
    layers: list[dict]
    cpu_reasons: dict[str, str] = field(default_factory=dict)  # op output (ofm) name -> Vela's reason
    command: list[str] = field(default_factory=list)
    output_tflite: Path | None = None


def _num(text: str):
    try:
        f = float(text)
    except (TypeError, ValueError):
        return text
    return int(f) if f.is_integer() and "." not in str(text) else f


def parse_summary_csv(path: Path) -> dict:
    """The one data row of Vela's ``*_summary_*.csv`` (numbers as numbers)."""
    with open(path, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    if len(rows) != 1:
        raise CompressError(f"{path}: expected one summary row from Vela, found {len(rows)}: re-run vela")
    row = rows[0]
    missing = [k for k in ("cycles_npu", "inference_time", "core_clock") if k not in row]
    if missing:
        raise CompressError(f"{path}: Vela summary lacks {', '.join(missing)}: this Vela version is not supported")
    return {k: _num(v) for k, v in row.items()}


def parse_per_layer_csv(path: Path) -> list[dict]:
    """Vela's ``*_per-layer.csv``: one dict per operator (name, op, target NPU|CPU, cycles, MACs, utilisation)."""
    with open(path, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    need = ("Original Operator", "Target", "Op Cycles", "MAC Count", "Name")
    if rows and any(k not in rows[0] for k in need):
        raise CompressError(
            f"{path}: Vela per-layer CSV lacks one of {', '.join(need)}: this Vela version is not supported"
        )
    return [
        {
            "name": r["Name"],
            "op": r["Original Operator"],
            "npu_op": r.get("NNG Operator", ""),
            "target": r["Target"],
            "cycles": int(float(r["Op Cycles"] or 0)),
            "macs": int(float(r["MAC Count"] or 0)),
            "util_mac_pct": float(r.get("Util% (MAC)") or 0),
            "network_cycles_pct": float(r.get("Network% (cycles)") or 0),
        }
        for r in rows
    ]


_WARNING = re.compile(r"^Warning \(supported operators\) operator: (?P<op>\S+?),? ofm: '(?P<ofm>.*)'\s*$")


def parse_cpu_reasons(stdout: str) -> dict[str, str]:
    """Vela's "Warning (supported operators)" blocks: op output name -> the reason it stays on the CPU."""
    reasons, current, lines = {}, None, []
    for line in stdout.splitlines() + [""]:
        m = _WARNING.match(line.strip())
        if m or not line.strip():
            if current is not None:
                reasons[current] = "\n".join(lines).strip()
            current, lines = (m["ofm"], []) if m else (None, [])
            continue
        if current is not None:
            lines.append(line.strip().removeprefix("Reason: "))
    return reasons


def compile_tflite(tflite: Path, out_dir: Path, config: VelaConfig, timeout_s: int = 1800) -> VelaResult:
    """Run Vela on ``tflite`` into ``out_dir`` and read its CSVs."""
    version = require_vela()
    out_dir.mkdir(parents=True, exist_ok=True)
    cmd = [
        sys.executable,
        "-c",
        "import sys; from ethosu.vela.vela import main; sys.exit(main())",
        str(tflite),
        *config.args(),
        "--output-dir",
        str(out_dir),
        "--verbose-performance",
    ]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        raise CompressError(f"Vela did not finish in {timeout_s} s on {tflite.name}: try a smaller model") from None
    (out_dir / "vela_stdout.txt").write_text(proc.stdout + proc.stderr, encoding="utf-8")
    if proc.returncode != 0:
        last = next((ln for ln in reversed((proc.stderr or proc.stdout).splitlines()) if ln.strip()), "no output")
        raise CompressError(f"Vela failed on {tflite.name} ({last.strip()}): see {out_dir / 'vela_stdout.txt'}")
    stem = tflite.stem
    summaries = sorted(out_dir.glob(f"{stem}_summary_*.csv"))
    per_layer = out_dir / f"{stem}_per-layer.csv"
    if not summaries or not per_layer.is_file():
        raise CompressError(f"Vela wrote no summary/per-layer CSV into {out_dir}: check {out_dir / 'vela_stdout.txt'}")
    shown = [*config.args(), "--verbose-performance"]
    return VelaResult(
        tool=f"ethos-u-vela {version}",
        config=config,
        summary=parse_summary_csv(summaries[0]),
        layers=parse_per_layer_csv(per_layer),
        cpu_reasons=parse_cpu_reasons(proc.stdout),
        command=["vela", tflite.name, *shown],
        output_tflite=out_dir / f"{stem}_vela.tflite",
    )


def fix_for(op: str, reason: str) -> str:
    r = reason.lower()
    if "float" in r:
        return "quantize it to int8/int16 (it stayed float after quantization)"
    if "ifm type" in r or "int16" in r:
        return (
            f"this Ethos-U takes {op} only with int8 inputs: quantize its inputs to int8 (mixed precision), "
            "or leave it to the CPU (Ethos-U85 takes more int16 ops)"
        )
    if "unsupported optype" in r:
        return f"Ethos-U has no {op}: replace it with supported ops, or leave it to the Cortex-M CPU"
    return "see Vela's reason (vela --supported-ops-report lists the constraints)"


def report(res: VelaResult, batch: int = 1, seq: int = 0) -> dict:
    """The vendor-model latency and the per-layer table, labelled."""
    s = res.summary
    npu = [row for row in res.layers if row["target"] == "NPU"]
    cpu = [row for row in res.layers if row["target"] != "NPU"]
    cpu_ops = Counter(row["op"] for row in cpu)
    blockers = {}
    for row in cpu:
        reason = res.cpu_reasons.get(row["name"], "")
        key = (row["op"], reason.splitlines()[0].split(" (")[0] if reason else "")
        if key not in blockers:
            blockers[key] = {
                "op": row["op"],
                "count": 0,
                "reason": key[1] or "placed on the CPU by Vela",
                "fix": fix_for(row["op"], reason),
                "example": row["name"],
            }
        blockers[key]["count"] += 1
    caveats = [
        f"Vela's performance model ({res.tool}), not a measurement: {res.config.accelerator_config}, "
        f"{res.config.system_config}, {res.config.memory_mode}, core clock {float(s['core_clock']) / 1e6:.0f} MHz"
    ]
    if cpu:
        caveats.append(
            f"{len(cpu)} of {len(res.layers)} operators run on the Cortex-M CPU "
            f"({', '.join(f'{op} {n}' for op, n in cpu_ops.most_common(6))}...): their time is NOT in "
            "Vela's cycles, so the real latency is higher"
        )
    return {
        "latency": {
            "batch": batch,
            "seq": seq,
            "p50_ms": float(s["inference_time"]) * 1e3,
            "source": "vendor_model",
            "tool": res.tool,
            "profile_configs": {
                "accelerator_config": res.config.accelerator_config,
                "system_config": res.config.system_config,
                "memory_mode": res.config.memory_mode,
                "config_file": res.config.config_file,
            },
            "caveats": caveats,
        },
        "cycles_npu": int(s["cycles_npu"]),
        "cycles_total": int(s.get("cycles_total", s["cycles_npu"])),
        "cycles_per_layer_sum": sum(row["cycles"] for row in res.layers),
        "macs": int(s.get("nn_macs", 0)),
        "summary": {k: s[k] for k in SUMMARY_KEYS if k in s},
        "operators": {"total": len(res.layers), "npu": len(npu), "cpu": len(cpu)},
        "cpu_blockers": sorted(blockers.values(), key=lambda b: -b["count"]),
        "layers": res.layers,
        "command": " ".join(res.command),
    }
