"""Device profiles: TOML files describing a deployment target, and their loader.

Users add their own by passing a path to a .toml file as ``--target``. A profile says how latency on the
target is obtained (``latency_source``: measured | vendor_model | analytic) and carries the peak compute and
bandwidth figures the analytic roofline (runtimes/roofline.py) divides by, with their sources and which
of them are uncertain.
"""

from __future__ import annotations

import importlib.util
import os
import re
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import NamedTuple

import tomllib

from compress.core.errors import CompressError

PROFILE_DIR = Path(__file__).parent

KINDS = ("cpu", "gpu", "npu")
# What kind of device carries the target. "phone" and "tablet" are where apps ship ORT Mobile with NNAPI (Android) or
# Core ML (Apple): their reports carry the mobile usability checker's partition coverage (runtimes.mobile).
FORM_FACTORS = ("", "phone", "tablet", "laptop", "desktop", "server", "board", "embedded")
MOBILE_FORM_FACTORS = ("phone", "tablet")
LATENCY_SOURCES = ("measured", "vendor_model", "analytic")
# Figures a profile may mark as uncertain (the roofline repeats them in its caveats).
NUMERIC_FIELDS = (
    "peak_tops_int8",
    "peak_tflops_fp16",
    "peak_tflops_fp32",
    "bandwidth_gbs",
    "weight_bandwidth_gbs",
    "efficiency_compute",
    "efficiency_memory",
    "launch_us",
)
PEAK_FIELDS = ("peak_tops_int8", "peak_tflops_fp16", "peak_tflops_fp32")
DEFAULT_HOST_BANDWIDTH_GBS = 20.0  # assumed for the host CPU when its profile gives no bandwidth


class ProfileError(CompressError):
    """A profile that cannot be loaded or is invalid; the message names the fix."""


@dataclass(frozen=True)
class DeviceProfile:
    name: str
    description: str
    kind: str  # cpu | gpu | npu
    runtime: str  # onnxruntime | vela | ...
    execution_provider: str
    latency_source: str  # measured | vendor_model | analytic
    precisions: tuple[str, ...]
    sparsity_patterns: tuple[str, ...] = ()  # patterns the target turns into speed, e.g. "2:4"
    notes: tuple[str, ...] = ()
    # Roofline figures (0 = not known). Dense peaks; TOPS/TFLOPS count a MAC as 2 operations.
    peak_tops_int8: float = 0.0
    peak_tflops_fp16: float = 0.0
    peak_tflops_fp32: float = 0.0
    bandwidth_gbs: float = 0.0  # activations (and weights unless weight_bandwidth_gbs is set)
    weight_bandwidth_gbs: float = 0.0  # where weights stream from a slower port (Ethos-U flash/DRAM)
    efficiency_compute: float = 0.3  # share of peak compute a real layer reaches
    efficiency_memory: float = 0.6  # share of peak bandwidth a real layer reaches
    launch_us: float = 0.0  # fixed cost per op
    sources: tuple[str, ...] = ()
    uncertain: tuple[str, ...] = ()  # names of the fields above whose figures are uncertain
    requires: tuple[str, ...] = ()  # python modules needed to measure or simulate the target
    options: tuple[tuple[str, str], ...] = ()  # back-end options ([options] table): Vela configs, QNN soc_model
    form_factor: str = ""  # FORM_FACTORS: the device class that carries the target ("" = not said)
    source_file: str = field(default="", compare=False)

    def option(self, key: str, default: str = "") -> str:
        return dict(self.options).get(key, default)

    @property
    def mobile(self) -> bool:
        """A phone-class target: apps there run ORT Mobile with NNAPI or Core ML."""
        return self.form_factor in MOBILE_FORM_FACTORS


def available_profiles() -> dict[str, Path]:
    return {p.stem: p for p in sorted(PROFILE_DIR.glob("*.toml"))}


def load_profile(name_or_path: str) -> DeviceProfile:
    shipped = available_profiles()
    path = shipped.get(name_or_path) or Path(name_or_path)
    if not path.is_file() or path.suffix != ".toml":
        raise ProfileError(f"unknown target '{name_or_path}': use one of {', '.join(shipped)} or a profile .toml file")
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as e:
        raise ProfileError(f"profile {path}: not valid TOML ({e}): fix the syntax") from None
    return profile_from_dict(data, str(path))


def profile_from_dict(data: dict, source: str = "<dict>") -> DeviceProfile:
    """Validate one profile's keys and values (every message is one line that names the fix)."""
    names = {f.name for f in fields(DeviceProfile)} - {"source_file"}
    unknown = set(data) - names
    if unknown:
        raise ProfileError(
            f"profile {source}: unknown key(s) {', '.join(sorted(unknown))}; valid: {', '.join(sorted(names))}"
        )
    required = ("name", "description", "kind", "runtime", "execution_provider", "latency_source", "precisions")
    missing = [k for k in required if k not in data]
    if missing:
        raise ProfileError(f"profile {source}: missing key(s) {', '.join(missing)}")
    for key, allowed in (("kind", KINDS), ("latency_source", LATENCY_SOURCES), ("form_factor", FORM_FACTORS)):
        if key in data and data[key] not in allowed:
            raise ProfileError(f"profile {source}: {key} = {data[key]!r}; use one of {', '.join(allowed)}")
    out = {}
    for key, value in data.items():
        if key in NUMERIC_FIELDS:
            out[key] = _number(source, key, value)
        elif key == "options":
            if not isinstance(value, dict):
                raise ProfileError(f'profile {source}: options must be a table ([options] with key = "value" lines)')
            out[key] = tuple(sorted((str(k), str(v)) for k, v in value.items()))
        elif isinstance(value, list):
            if not all(isinstance(v, str) for v in value):
                raise ProfileError(f"profile {source}: {key} must be a list of strings")
            out[key] = tuple(value)
        elif key in ("name", "description", "kind", "runtime", "execution_provider", "latency_source", "form_factor"):
            if not isinstance(value, str):
                raise ProfileError(f"profile {source}: {key} must be a string")
            out[key] = value
        else:
            raise ProfileError(f"profile {source}: {key} must be a list of strings, got {type(value).__name__}")
    profile = DeviceProfile(**out, source_file=source)
    _check_values(profile, source)
    return profile


def _number(source: str, key: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ProfileError(f"profile {source}: {key} = {value!r} must be a number")
    if value < 0 or value != value:  # NaN compares unequal to itself
        raise ProfileError(f"profile {source}: {key} = {value} must be >= 0 (0 means unknown)")
    return float(value)


def _check_values(p: DeviceProfile, source: str) -> None:
    for key in ("efficiency_compute", "efficiency_memory"):
        if not 0 < getattr(p, key) <= 1:
            raise ProfileError(
                f"profile {source}: {key} = {getattr(p, key)} must be in (0, 1]: give the fraction of peak "
                "a real layer reaches, e.g. 0.3"
            )
    bad = [u for u in p.uncertain if u not in NUMERIC_FIELDS]
    if bad:
        raise ProfileError(
            f"profile {source}: uncertain names unknown field(s) {', '.join(bad)}; valid: {', '.join(NUMERIC_FIELDS)}"
        )
    bad = [r for r in p.requires if not re.fullmatch(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)*", r)]
    if bad:
        raise ProfileError(
            f"profile {source}: requires lists importable module names (e.g. onnxruntime_qnn), not {', '.join(bad)}"
        )
    if p.latency_source == "analytic" and (p.bandwidth_gbs <= 0 or not any(getattr(p, k) > 0 for k in PEAK_FIELDS)):
        raise ProfileError(
            f"profile {source}: an analytic profile needs bandwidth_gbs and at least one of "
            f"{', '.join(PEAK_FIELDS)} above 0"
        )


def missing_requirements(profile: DeviceProfile) -> tuple[str, ...]:
    """Modules in ``profile.requires`` that cannot be imported here (importlib.util.find_spec, nothing imported)."""
    missing = []
    for module in profile.requires:
        try:
            found = importlib.util.find_spec(module) is not None
        except (ImportError, ValueError):  # a parent package is absent
            found = False
        if not found:
            missing.append(module)
    return tuple(missing)


# --- the host CPU: its peak is derived at run time -------------------------------------------------


@dataclass(frozen=True)
class CpuFacts:
    model: str
    physical_cores: int
    mhz: float
    flags: frozenset[str]


_SET_HOST_PEAKS = "set peak_tflops_fp32 and peak_tops_int8 in a copy of the cpu profile"


class HostPeak(NamedTuple):
    gflops_fp32: float
    gops_int8: float
    bandwidth_gbs: float


def cpu_facts(cpuinfo: str | None = None) -> CpuFacts:
    """Model, physical cores, clock and ISA flags from /proc/cpuinfo text (read from the host when None)."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text(encoding="utf-8")
        except OSError:
            raise ProfileError(f"cannot read /proc/cpuinfo: {_SET_HOST_PEAKS}") from None
    model, flags, mhz, cores, phys_id, cpu_cores, sockets = "", set(), [], set(), "0", 0, set()
    for line in cpuinfo.splitlines():
        key, _, val = line.partition(":")
        key, val = key.strip().lower(), val.strip()
        if key in ("model name", "hardware") and not model:
            model = val
        elif key in ("flags", "features") and not flags:  # x86 "flags", aarch64 "Features"
            flags = set(val.split())
        elif key == "cpu mhz":
            mhz.append(float(val))
        elif key == "physical id":
            phys_id = val
            sockets.add(val)
        elif key == "core id":
            cores.add((phys_id, val))
        elif key == "cpu cores":
            cpu_cores = int(val)
    physical = len(cores) or cpu_cores * max(len(sockets), 1) or os.cpu_count() or 1
    clock = sum(mhz) / len(mhz) if mhz else _clock_from_elsewhere(model)
    if clock <= 0:
        raise ProfileError(f"cannot read the CPU clock from /proc/cpuinfo: {_SET_HOST_PEAKS}")
    return CpuFacts(model=model, physical_cores=physical, mhz=clock, flags=frozenset(flags))


def _clock_from_elsewhere(model: str) -> float:
    """MHz from cpufreq (aarch64 has no 'cpu MHz' line) or from an "@ 2.40GHz" model name; 0 when neither."""
    try:
        return int(Path("/sys/devices/system/cpu/cpu0/cpufreq/cpuinfo_max_freq").read_text()) / 1000
    except (OSError, ValueError):
        pass
    m = re.search(r"@\s*([\d.]+)\s*GHz", model)
    return float(m.group(1)) * 1000 if m else 0.0


def fp32_flops_per_cycle(flags: frozenset[str] | set[str]) -> int:
    """Per core, two FMA pipes assumed: AVX-512 64, AVX2+FMA 32, AVX 16, NEON 16, SSE 8."""
    if "avx512f" in flags:
        return 64
    if "avx2" in flags and "fma" in flags:
        return 32
    if "avx" in flags or "asimd" in flags:
        return 16
    return 8 if "sse2" in flags else 2


def has_int8_dot(flags: frozenset[str] | set[str]) -> bool:
    """VNNI / AMX on x86, SDOT/I8MM on aarch64: int8 runs at 4x the fp32 rate instead of 2x."""
    return bool(flags & {"avx512_vnni", "avx_vnni", "amx_int8", "asimddp", "i8mm"})


def host_cpu_peak(profile: DeviceProfile, cpuinfo: str | None = None) -> HostPeak:
    """This host's peak: physical cores x MHz x FLOP/cycle from ISA flags; bandwidth from the profile
    (DEFAULT_HOST_BANDWIDTH_GBS, an assumption, when it gives none)."""
    facts = cpu_facts(cpuinfo)
    gflops = facts.physical_cores * facts.mhz / 1000 * fp32_flops_per_cycle(facts.flags)
    gops = gflops * (4 if has_int8_dot(facts.flags) else 2)
    bandwidth = profile.bandwidth_gbs or DEFAULT_HOST_BANDWIDTH_GBS
    return HostPeak(gflops_fp32=gflops, gops_int8=gops, bandwidth_gbs=bandwidth)
