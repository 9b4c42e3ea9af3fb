"""ORT Mobile: the ORT-format model, and how much of a graph Android's NNAPI and Apple's Core ML would take.

Stands beside ONNX Runtime's own tools: ``onnxruntime.tools.convert_onnx_models_to_ort`` (the ``.ort`` file plus the
``required_operators.config`` a reduced ORT Mobile build is made from) and the mobile usability checker
(``python -m onnxruntime.tools.check_onnx_model_mobile_usability``), whose checks are called here directly
(``usability_checker.check_nnapi_partitions`` / ``check_coreml_partitions``) instead of parsing its log. Like the
checker, the graph is first optimised to ORT's BASIC level (what ORT-format conversion does), then each EP's table of
supported ops is applied twice: with the graph's dynamic shapes as they are, and as if the input shapes were fixed.
"""

from __future__ import annotations

import contextlib
import io
import logging
import shutil
import tempfile
from pathlib import Path

# the checker's partition reports: NNAPI (Android), Core ML with its two model formats (iOS / macOS)
MOBILE_EPS = ("nnapi", "coreml_neuralnetwork", "coreml_mlprogram")
ORT_TARGET_PLATFORM = "arm"  # phones: no x86-only layout optimisations saved into the .ort file


def convert_to_ort(model: Path, out: Path, target_platform: str = ORT_TARGET_PLATFORM) -> dict:
    """``model`` (.onnx) -> ``out`` (.ort) with ORT's saved "Fixed" optimisations, plus
    ``<out stem>.required_operators.config`` beside it. Returns the files written."""
    from onnxruntime.tools.convert_onnx_models_to_ort import OptimizationStyle, convert_onnx_models_to_ort

    with tempfile.TemporaryDirectory(prefix="compress-ort-") as tmp:
        src = Path(tmp) / "in" / f"{out.stem}.onnx"
        src.parent.mkdir()
        shutil.copy2(model, src)
        chatter = logging.getLogger("ort_format_model.utils")
        level = chatter.level
        chatter.setLevel(logging.WARNING)
        try:
            with contextlib.redirect_stdout(io.StringIO()):  # the converter prints progress lines
                convert_onnx_models_to_ort(
                    src.parent,
                    output_dir=Path(tmp) / "out",
                    optimization_styles=[OptimizationStyle.Fixed],
                    target_platform=target_platform,
                )
        finally:
            chatter.setLevel(level)
        made = Path(tmp) / "out" / f"{out.stem}.ort"
        config = next((Path(tmp) / "out").glob("*required_operators*.config"), None)
        if not made.is_file():
            raise RuntimeError(f"convert_onnx_models_to_ort wrote no {made.name}")
        shutil.move(str(made), out)
        files = [out.name]
        if config is not None:
            target = out.with_name(f"{out.stem}.required_operators.config")
            shutil.move(str(config), target)
            files.append(target.name)
    return {"files": files, "optimization_style": "Fixed", "target_platform": target_platform}


def mobile_coverage(model: Path) -> dict:
    """{"<ep>:<dynamic|fixed>": nodes, supported nodes, coverage %, partitions, the checker's verdict, unsupported ops}
    for NNAPI and both Core ML formats."""
    from onnxruntime.tools.mobile_helpers import usability_checker as uc
    from onnxruntime.tools.onnx_model_utils import ModelProtoWithShapeInfo, optimize_model

    checks = {
        "nnapi": uc.check_nnapi_partitions,
        "coreml_neuralnetwork": lambda m, fixed: uc.check_coreml_partitions(
            m, fixed, "coreml_supported_neuralnetwork_ops.md"
        ),
        "coreml_mlprogram": lambda m, fixed: uc.check_coreml_partitions(m, fixed, "coreml_supported_mlprogram_ops.md"),
    }
    out = {}
    with tempfile.TemporaryDirectory(prefix="compress-mobile-") as tmp:
        basic = Path(tmp) / "basic.onnx"
        optimize_model(Path(model), basic, use_external_initializers=True)
        proto = ModelProtoWithShapeInfo(basic.resolve()).model_with_shape_info
        for ep, check in checks.items():
            # require_fixed_input_sizes=True: nodes with a dynamic input shape count as unsupported (the graph as is)
            for shapes, require_fixed in (("dynamic", True), ("fixed", False)):
                info = check(proto, require_fixed)
                out[f"{ep}:{shapes}"] = {
                    "nodes": info.num_nodes,
                    "supported_nodes": info.num_supported_nodes,
                    "coverage_pct": round(100 * info.num_supported_nodes / max(info.num_nodes, 1), 1),
                    "partitions": info.num_partitions,
                    "suitability": info.suitability().name,
                    "unsupported_ops": sorted({o.split(":")[-1] for o in info.unsupported_ops}),
                }
    return out
