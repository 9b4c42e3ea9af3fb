"""Device profiles: every shipped one loads and is honest about its figures; bad values fail in one line."""

from dataclasses import replace
from pathlib import Path

import pytest

import profiles
from profiles import (
    DEFAULT_HOST_BANDWIDTH_GBS,
    NUMERIC_FIELDS,
    ProfileError,
    available_profiles,
    host_cpu_peak,
    load_profile,
    missing_requirements,
)

SHIPPED = {
    "cpu",
    "gpu",
    "npu-qnn-htp",
    "npu-ethos-u55",
    "npu-ethos-u65",
    "npu-intel-npu4",
    "npu-apple-ane-m4",
    "npu-rk3588",
}

GOOD = """
name = "my-board"
description = "A user's board"
kind = "npu"
runtime = "onnxruntime"
execution_provider = "XnnpackExecutionProvider"
latency_source = "analytic"
precisions = ["int8-qdq"]
peak_tops_int8 = 4
bandwidth_gbs = 8.5
uncertain = ["peak_tops_int8"]
sources = ["vendor brief"]

[options]
soc = "x1"
"""


def _write(tmp_path: Path, text: str, name: str = "board.toml") -> str:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return str(path)


def test_every_shipped_profile_loads_with_sources():
    assert SHIPPED <= set(available_profiles())
    for name in available_profiles():
        p = load_profile(name)
        assert p.name == name and p.source_file.endswith(f"{name}.toml")
        assert p.sources and p.notes and p.precisions, name
        assert set(p.uncertain) <= set(NUMERIC_FIELDS), name
        assert 0 < p.efficiency_compute <= 1 and 0 < p.efficiency_memory <= 1
        if p.latency_source == "analytic":
            assert p.bandwidth_gbs > 0 and max(p.peak_tops_int8, p.peak_tflops_fp16, p.peak_tflops_fp32) > 0, name


def test_shipped_profiles_say_how_latency_is_obtained():
    assert load_profile("cpu").latency_source == "measured"
    gpu = load_profile("gpu")
    assert gpu.latency_source == "measured" and "2:4" in gpu.sparsity_patterns and gpu.bandwidth_gbs == 600
    assert load_profile("cpu").sparsity_patterns == ()
    htp = load_profile("npu-qnn-htp")
    assert htp.latency_source == "analytic" and "onnxruntime_qnn" in htp.requires
    assert "peak_tops_int8" in htp.uncertain and htp.peak_tops_int8 == 45 and htp.bandwidth_gbs == 77
    assert htp.option("soc_model") == "57"
    rk = load_profile("npu-rk3588")
    assert "bandwidth_gbs" in rk.uncertain
    for name, macs, clock in (("npu-ethos-u55", 256, 500e6), ("npu-ethos-u65", 512, 1e9)):
        p = load_profile(name)
        assert p.latency_source == "vendor_model" and "ethosu.vela" in p.requires
        assert p.peak_tops_int8 == pytest.approx(2 * macs * clock / 1e12)  # 2 ops per MAC
        assert p.option("accelerator_config").endswith(str(macs)) and p.option("system_config")
        assert p.peak_tflops_fp16 == 0 and p.peak_tflops_fp32 == 0  # integer-only NPU


def test_user_profile_from_a_path_loads(tmp_path):
    p = load_profile(_write(tmp_path, GOOD))
    assert p.name == "my-board" and p.peak_tops_int8 == 4.0 and isinstance(p.peak_tops_int8, float)
    assert p.bandwidth_gbs == 8.5 and p.efficiency_compute == 0.3 and p.efficiency_memory == 0.6  # defaults
    assert p.options == (("soc", "x1"),) and p.uncertain == ("peak_tops_int8",)
    assert p.source_file == str(tmp_path / "board.toml")


@pytest.mark.parametrize(
    "change, words",
    [
        (("efficiency_compute = 1.5",), "efficiency_compute"),
        (("efficiency_memory = 0",), "efficiency_memory"),
        (("bandwidth_gbs = -3",), "bandwidth_gbs"),
        (('peak_tops_int8 = "fast"',), "peak_tops_int8"),
        (("launch_us = true",), "launch_us"),
        (('uncertain = ["speed"]',), "uncertain"),
        (('kind = "tpu"',), "kind"),
        (('latency_source = "guess"',), "latency_source"),
        (('requires = ["not a module"]',), "requires"),
        (("bandwidth_gbs = 0",), "analytic"),
        (("colour = 1",), "unknown key"),
    ],
)
def test_bad_values_give_one_line_errors(tmp_path, change, words):
    lines = GOOD.splitlines()
    for c in change:
        key = c.split("=")[0].strip()
        lines = [ln for ln in lines if not ln.startswith(key + " ")]
        lines.insert(2, c)
    with pytest.raises(ProfileError) as e:
        load_profile(_write(tmp_path, "\n".join(lines) + "\n"))
    msg = str(e.value)
    assert "\n" not in msg and words in msg


def test_unknown_target_lists_the_shipped_ones():
    with pytest.raises(ProfileError, match="npu-qnn-htp"):
        load_profile("no-such-target")


def test_missing_requirements():
    p = replace(load_profile("npu-qnn-htp"), requires=("json", "surely_absent_module_xyz.sub"))
    assert missing_requirements(p) == ("surely_absent_module_xyz.sub",)
    assert missing_requirements(load_profile("cpu")) == ()


CPUINFO = """processor\t: {i}
model name\t: Test CPU {model}
physical id\t: 0
core id\t\t: {core}
cpu MHz\t\t: 3000.000
flags\t\t: fpu sse2 avx {flags}
"""


def _cpuinfo(flags: str, cores: int = 4, threads_per_core: int = 2, model: str = "") -> str:
    return "\n".join(
        CPUINFO.format(i=i, core=i // threads_per_core, flags=flags, model=model)
        for i in range(cores * threads_per_core)
    )


def test_host_cpu_peak_from_isa_flags(tmp_path):
    cpu = load_profile("cpu")
    avx2 = host_cpu_peak(cpu, _cpuinfo("avx2 fma"))  # 4 cores x 3 GHz x 32 FLOP/cycle
    assert avx2.gflops_fp32 == pytest.approx(384) and avx2.gops_int8 == pytest.approx(768)  # int8 2x: no VNNI
    assert avx2.bandwidth_gbs == DEFAULT_HOST_BANDWIDTH_GBS
    vnni = host_cpu_peak(cpu, _cpuinfo("avx2 fma avx512f avx512_vnni"))
    assert vnni.gflops_fp32 == pytest.approx(768) and vnni.gops_int8 == pytest.approx(4 * 768)
    gflops, gops, bw = host_cpu_peak(replace(cpu, bandwidth_gbs=51.2), _cpuinfo("avx2 fma", threads_per_core=1))
    assert bw == 51.2 and gflops == pytest.approx(384)


def test_host_cpu_peak_without_a_clock_says_what_to_set(monkeypatch):
    monkeypatch.setattr(profiles, "_clock_from_elsewhere", lambda model: 0.0)
    text = _cpuinfo("avx2 fma").replace("cpu MHz\t\t: 3000.000\n", "")
    with pytest.raises(ProfileError, match="peak_tflops_fp32"):
        host_cpu_peak(load_profile("cpu"), text)
