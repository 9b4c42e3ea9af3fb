"""NPU targets on MiniLM, through `compress run` itself: the QNN HTP pre-flight and Arm Ethos-U via Vela.

Each back-end needs its extra, so run it with the interpreter that has it (the base env skips nothing silently:
a missing extra is an error):

    OMP_NUM_THREADS=1 python benchmarks/npu_targets.py --backend qnn      # with onnxruntime-qnn installed
    OMP_NUM_THREADS=1 python benchmarks/npu_targets.py --backend ethos    # with ethos-u-vela + litert-torch

qnn:   uint16 activations (the shipped profile) with fidelity and STS-B dev, and uint8 activations (a copy of the
       profile) with fidelity: fallback nodes, compile result, accuracy on the CPU QDQ emulation and on the HTP
       simulator, roofline latency (analytic).
ethos: npu-ethos-u55 end to end (int16x8 TFLite, fidelity and the first 200 STS-B dev pairs, Vela; int8 activations
       with fidelity), then the int16x8 TFLite through Vela for npu-ethos-u65: cycles, inference time (vendor_model), NPU/CPU operator split.
Writes benchmarks/results/npu_qnn.{json,md} or npu_ethos.{json,md}. Nothing here times anything on this host.
"""

from __future__ import annotations

import argparse
import platform
import sys
import tempfile
import time
from pathlib import Path

from _results import save

STSB_DEV = Path(__file__).resolve().parents[2] / "shared" / "data" / "stsb" / "sts-dev.csv"


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def run(target: str, evals: tuple[str, ...], out: Path) -> dict:
    from compress.pipeline import RunConfig
    from compress.pipeline import run as run_pipeline
    from runtimes.profiler import ProfileConfig, Shape

    cfg = RunConfig(
        model="minilm",
        target=target,
        recipe="fp32",
        out=out,
        evals=evals,
        force=True,
        latency=ProfileConfig(shapes=(Shape(1, 128),), runs=1),
    )
    _, report = run_pipeline(cfg, progress=lambda m: log(f"  {m}"))
    return report


def evals_of(report: dict) -> list[dict]:
    return [
        {k: e.get(k) for k in ("name", "path", "original", "compressed", "delta", "min", "samples")}
        for e in report["eval"]
    ]


def qnn(args, work: Path) -> dict:
    from profiles import PROFILE_DIR

    rows = []
    shipped = PROFILE_DIR / "npu-qnn-htp.toml"
    u8 = work / "npu-qnn-htp-uint8.toml"
    u8.write_text(shipped.read_text().replace('activations = "uint16"', 'activations = "uint8"'))
    stsb = (f"stsb:{args.stsb}",) if args.stsb.is_file() else ()
    for label, target, evals in (
        ("uint16 activations, uint8 weights", str(shipped), ("fidelity", *stsb)),
        ("uint8 activations, uint8 weights", str(u8), ("fidelity",)),
    ):
        log(f"QNN HTP pre-flight: {label}")
        n_rep = run(target, evals, work / label.split()[0])
        n = n_rep["npu"]
        rows.append(
            {
                "variant": label,
                "fallback_nodes": n["fallback_nodes"],
                "compiled_wholly_on_npu": n["compiled_wholly_on_npu"],
                "compile_error": n["compile_error"],
                "npu_partitions": n["npu_partitions"],
                "blockers": n["blockers"],
                "epcontext_files": (n["epcontext"] or {}).get("files"),
                "simulator": n["simulator"],
                "eval": evals_of(n_rep),
                "latency": n["latency"][0],
                "tool": n["tool"],
                "quantization": n["quantization"],
                "seconds": n_rep["seconds_total"],
            }
        )
    return {"backend": "qnn", "model": "minilm", "shape": "1x128", "rows": rows}


def _vela_row(target: str, tool: str, rep: dict) -> dict:
    lat = rep["latency"]
    return {
        "target": target,
        "tool": tool,
        "configs": lat["profile_configs"],
        "inference_ms": lat["p50_ms"],
        "source": lat["source"],
        "cycles_npu": rep["cycles_npu"],
        "cycles_total": rep["cycles_total"],
        "macs": rep["macs"],
        "operators": rep["operators"],
        "cpu_blockers": rep["cpu_blockers"],
        "top_layers": sorted(rep["layers"], key=lambda r: -r["cycles"])[:10],
        "caveats": lat["caveats"],
    }


def ethos(args, work: Path) -> dict:
    from profiles import PROFILE_DIR, load_profile
    from runtimes import vela

    stsb = ()
    if args.stsb.is_file():  # the LiteRT interpreter's int16 kernels take ~1.4 s a sentence here: a subset
        subset = work / f"sts-dev-first{args.ethos_pairs}.csv"
        subset.write_text("".join(args.stsb.read_text(encoding="utf-8").splitlines(keepends=True)[: args.ethos_pairs]))
        stsb = (f"stsb:{subset}",)
    shipped = PROFILE_DIR / "npu-ethos-u55.toml"
    a8 = work / "npu-ethos-u55-int8.toml"
    a8.write_text(shipped.read_text().replace('activations = "int16"', 'activations = "int8"'))
    variants, rows = [], []
    for label, target, evals in (
        ("int16 activations, int8 weights", str(shipped), ("fidelity", *stsb)),
        ("int8 activations, int8 weights", str(a8), ("fidelity",)),
    ):
        log(f"Ethos-U55: integer TFLite ({label}) + Vela")
        out = work / label.split()[0]
        rep = run(target, evals, out)
        n = rep["npu"]
        lat = dict(n["latency"][0])
        variants.append(
            {"variant": label, "conversion": n["conversion"], "eval": evals_of(rep), "seconds": rep["seconds_total"]}
        )
        rows.append(dict(_vela_row("npu-ethos-u55", n["tool"], {**n, "latency": lat}), variant=label))
        if label.startswith("int16"):
            log("Ethos-U65: the int16 TFLite through Vela")
            res = vela.compile_tflite(
                out / "model_int.tflite", work / "u65", vela.VelaConfig.from_profile(load_profile("npu-ethos-u65"))
            )
            rows.append(dict(_vela_row("npu-ethos-u65", res.tool, vela.report(res, 1, 128)), variant=label))
    return {"backend": "ethos", "model": "minilm", "shape": "1x128", "variants": variants, "rows": rows}


def table(out: dict) -> str:
    lines = [
        f"# NPU targets: MiniLM at {out['shape']} ({out['backend']})",
        "",
        f"Command: `{out['command']}` on {out['host']}.",
        "",
    ]
    if out["backend"] == "qnn":
        lines += [
            "| QDQ variant | fallback nodes | compiles wholly on HTP | simulator fidelity (n) | CPU-QDQ fidelity "
            "(held-out) | STS-B fp32 -> QDQ | roofline 1x128 [analytic] |",
            "|---|---|---|---|---|---|---|",
        ]
        for r in out["rows"]:
            s = r["simulator"] or {}
            fid = next((e for e in r["eval"] if e["name"] == "fidelity"), {})
            st = next((e for e in r["eval"] if e["name"].startswith("stsb")), None)
            sts = f"{st['original']:.2f} -> {st['compressed']:.2f} ({st['delta']:+.2f})" if st else "not run"
            sim = f"{s['fidelity_mean']:.4f} ({s['samples']})" if s else "not compiled"
            lines.append(
                f"| {r['variant']} | {r['fallback_nodes']} | {r['compiled_wholly_on_npu']} | {sim} | "
                f"{fid.get('compressed')} | {sts} | {r['latency'].get('p50_ms', float('nan')):.2f} ms |"
            )
        lines += [
            "",
            "Simulator fidelity: mean cosine of the sentence embedding to the fp32 export, HTP simulator via "
            "the EPContext model; CPU-QDQ: the same QDQ model on ORT's CPU EP over the 100 held-out sentences. "
            f"Tool: {out['rows'][0]['tool']}.",
        ]
        for r in out["rows"]:
            for b in r["blockers"]:
                lines.append(f"- {r['variant']}: blocker {b['op_type']} {b['node']}: {b['reason']} -> {b['fix']}")
    else:
        lines += ["| TFLite variant | quantizer | accuracy vs torch fp32 (LiteRT interpreter) |", "|---|---|---|"]
        for v in out["variants"]:
            ev = ", ".join(
                f"{e['name']} {e['original']} -> {e['compressed']}"
                + (f" ({e['delta']:+.2f})" if e.get("delta") is not None else "")
                for e in v["eval"]
            )
            lines.append(f"| {v['variant']} | {v['conversion']['quantizer']} ({v['conversion']['tool']}) | {ev} |")
        lines += [
            "",
            "| target | variant | Vela configs | inference [vendor_model] | NPU cycles | total cycles | MACs | "
            "ops NPU / CPU |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for r in out["rows"]:
            c = r["configs"]
            lines.append(
                f"| {r['target']} | {r['variant']} | {c['accelerator_config']}, {c['system_config']}, "
                f"{c['memory_mode']} | {r['inference_ms']:.2f} ms | {r['cycles_npu']:,} | {r['cycles_total']:,} | "
                f"{r['macs']:,} | {r['operators']['npu']} / {r['operators']['cpu']} |"
            )
        lines += [
            "",
            f"Tool: {out['rows'][0]['tool']}. CPU-placed operators are not in Vela's cycles.",
            "",
            "Why operators stay on the CPU (npu-ethos-u55, int16 activations):",
            "",
        ]
        lines += [f"- {b['count']} x {b['op']}: {b['reason']} -> {b['fix']}" for b in out["rows"][0]["cpu_blockers"]]
        lines += [
            "",
            "Top layers by cycles (npu-ethos-u55, int16 activations):",
            "",
            "| cycles | op | layer |",
            "|---|---|---|",
        ]
        lines += [f"| {r['cycles']:,} | {r['op']} | {r['name'][-80:]} |" for r in out["rows"][0]["top_layers"]]
    return "\n".join(lines) + "\n"


def main() -> None:
    from compress.cli import _quiet_libraries

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--backend", choices=("qnn", "ethos"), required=True)
    ap.add_argument("--stsb", type=Path, default=STSB_DEV)
    ap.add_argument(
        "--ethos-pairs", type=int, default=200, help="STS-B dev pairs scored on the TFLite (slow interpreter)"
    )
    args = ap.parse_args()
    _quiet_libraries()
    import torch

    torch.set_num_threads(1)
    from runtimes.host import host_info

    with tempfile.TemporaryDirectory(prefix="npu-bench-") as tmp:
        out = (qnn if args.backend == "qnn" else ethos)(args, Path(tmp))
    out["command"] = f"OMP_NUM_THREADS=1 python benchmarks/npu_targets.py --backend {args.backend}"
    out["host"] = host_info().summary()
    out["python"] = platform.python_version()
    save(f"npu_{args.backend}", out, table)


if __name__ == "__main__":
    main()
