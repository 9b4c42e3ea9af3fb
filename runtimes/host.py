"""What machine a measurement was taken on: the facts an int8 or int4 speed-up depends on."""

from __future__ import annotations

import os
import platform
from dataclasses import asdict, dataclass, field

# ISA flags that decide which ORT CPU kernels run fast (int8 dot products, bf16/int8 tiles).
ISA_FLAGS = ("avx2", "fma", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_tile", "amx_int8", "amx_bf16")


@dataclass(frozen=True)
class HostInfo:
    cpu_model: str
    logical_cores: int
    physical_cores: int
    isa: dict[str, bool] = field(default_factory=dict)
    machine: str = ""
    onnxruntime: str = ""

    @property
    def has_vnni(self) -> bool:
        return self.isa.get("avx512_vnni", False) or self.isa.get("avx_vnni", False)

    def as_dict(self) -> dict:
        return asdict(self) | {"has_vnni": self.has_vnni}

    def summary(self) -> str:
        flags = ",".join(k for k, v in self.isa.items() if v) or "none"
        return f"{self.cpu_model} ({self.physical_cores} cores; {flags}; onnxruntime {self.onnxruntime})"


def _cpuinfo() -> tuple[str, set[str], int]:
    model, flags, cores = platform.processor() or platform.machine(), set(), 0
    try:
        text = open("/proc/cpuinfo", encoding="utf-8").read()
    except OSError:
        return model, flags, cores
    physical = set()
    phys_id = "0"
    for line in text.splitlines():
        key, _, val = line.partition(":")
        key, val = key.strip(), val.strip()
        if key == "model name":
            model = val
        elif key == "flags" and not flags:
            flags = set(val.split())
        elif key == "physical id":
            phys_id = val
        elif key == "core id":
            physical.add((phys_id, val))
    return model, flags, len(physical)


def host_info() -> HostInfo:
    import onnxruntime as ort

    model, flags, physical = _cpuinfo()
    logical = os.cpu_count() or 1
    return HostInfo(
        cpu_model=model,
        logical_cores=logical,
        physical_cores=physical or logical,
        isa={f: f in flags for f in ISA_FLAGS},
        machine=platform.machine(),
        onnxruntime=ort.__version__,
    )
