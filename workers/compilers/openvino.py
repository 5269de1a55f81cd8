"""OpenVINO candidates for the CPU: the validated ONNX export converted to OpenVINO IR (model.xml +
model.bin), or for fp32 (and the bf16/fp16 that share its IR) the eager model converted by OpenVINO's
PyTorch frontend where that IR runs faster in the box; fp32, int8 by NNCF post-training quantization
calibrated on the job's samples, and bf16/fp16 where OpenVINO's CPU plugin says this CPU computes in them
(the IR stays fp32; the runtime asks the plugin for the lower inference precision).

Conversion and quantization run in the sandbox (the `build_openvino` op), not in the worker:
- the source ONNX came out of the sandbox and is derived from the user's model: the ONNX policy checked
  it, but OpenVINO's ONNX frontend is a large C++ parser, and the worker runs as root;
- NNCF's quantization *runs* the graph on the calibration samples, and imports a large stack of its own
  (scipy, scikit-learn, its torch and ONNX backends) that has no business in the worker's process;
- it is cheap: one sandbox process per candidate (well under a second to start) next to the seconds
  that conversion and quantization take, and the samples file is already readable there.
The IR that comes back is then checked here (`service.runtimes.openvino.check_ir`): a graph of standard
operation sets only, the only thing the runtime will ever load.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import math
import shutil
from pathlib import Path
from typing import Any

from service.errors import ConversionError, InvalidOptions, RuntimeUnavailable
from service.runtimes.base import ArtifactInfo
from service.runtimes.openvino import INFERENCE_PRECISIONS, check_ir, cpu_precisions
from workers.compilers.int8 import calibration_indices
from workers.context import Candidate, Context
from workers.pipeline import StepLog
from workers.sandboxed import produced, sandbox_dir, sandboxed


class OpenVinoCompiler:
    target = "openvino"

    def variants(self, precision: str, devices: list[str]) -> list[str | None]:
        # CPU only: OpenVINO's GPU plugin is for Intel GPUs, which Kiln's CUDA workers are not.
        return [None] if "cpu" in devices and (precision in INFERENCE_PRECISIONS or precision == "int8") else []

    def stale(self, ctx: Context, candidate: Candidate) -> str | None:
        """Never: an IR runs wherever OpenVINO's CPU plugin does (bf16/fp16 are checked when loaded)."""
        return None

    def build(self, ctx: Context, candidate: Candidate, out_dir: Path, log: StepLog) -> None:
        if not ctx.onnx_file:
            raise ConversionError("no ONNX model to convert: the export step did not succeed")
        p = candidate.precision
        for library in ("openvino", "nncf") if p == "int8" else ("openvino",):
            if importlib.util.find_spec(library) is None:
                raise RuntimeUnavailable(f"{library} is not installed on this worker")
        if p in ("bf16", "fp16"):
            have = cpu_precisions()
            if INFERENCE_PRECISIONS[p] not in have:
                raise RuntimeUnavailable(
                    f"OpenVINO's CPU plugin does not compute in {p} on this CPU "
                    f"(its optimization capabilities: {', '.join(sorted(have)) or 'none'})"
                )
        elif p not in ("fp32", "int8"):
            raise InvalidOptions(f"precision {p} is not built for OpenVINO")
        calibration = calibration_indices(ctx.sample_labels) if p == "int8" else []
        built = sandboxed(
            ctx,
            "build_openvino",
            {
                "onnx_file": ctx.onnx_file,
                "precision": p,
                "calibration": calibration,
                "out_dir": str(sandbox_dir(ctx) / "openvino" / candidate.id),
            },
            log,
        )
        # what the worker records comes from the worker, not from the box's answer (as untrusted as the model)
        calibrated = len(calibration) or len(ctx.sample_labels)
        versions = {
            lib: importlib.metadata.version(lib) for lib in ("openvino", "nncf") if importlib.util.find_spec(lib)
        }
        out_dir.mkdir(parents=True, exist_ok=True)
        for name in ("model.xml", "model.bin"):
            shutil.move(produced(ctx, built[name]), out_dir / name)
        ops = check_ir(out_dir / "model.xml", error=ConversionError)
        if p == "int8" and not ops.get("FakeQuantize"):
            raise ConversionError(
                "nothing in this graph could be quantized to int8 by NNCF; the int8 model would just be the fp32 one"
            )
        candidate.file = "model.xml"
        if p == "int8":
            candidate.notes.append(
                f"NNCF post-training quantization (mixed preset: symmetric int8 weights, asymmetric "
                f"activations), calibrated on {calibrated} sample(s); "
                f"{ops['FakeQuantize']} quantize node(s)"
            )
        elif p != "fp32":
            candidate.notes.append(
                f"fp32 IR computed in {p} by OpenVINO's CPU plugin (inference precision hint); "
                "inputs and outputs keep the signature's dtypes"
            )
        source = _source(built.get("source"))
        candidate.notes.append(_source_note(source, ctx.onnx_exporter))
        ArtifactInfo(
            runtime="openvino",
            file="model.xml",
            precision=p,
            signature=ctx.signature.to_json(),
            compute_dtype={"bf16": "bfloat16", "fp16": "float16"}.get(p),
            device="cpu",
            extra={
                "inference_precision": INFERENCE_PRECISIONS.get(p, "f32"),
                "openvino": versions.get("openvino"),
                **({"nncf": versions.get("nncf"), "calibration_samples": calibrated} if p == "int8" else {}),
                "exporter": ctx.onnx_exporter,
                "source": "pytorch" if source.get("kept") == "pytorch" else "onnx",
            },
        ).save(out_dir)


def _source(found: object) -> dict[str, Any]:
    """The box's account of which IR it kept, reduced to known keys and finite numbers (the box's
    answer is as untrusted as the model)."""
    if not isinstance(found, dict):
        return {}
    out: dict[str, Any] = {}
    if found.get("kept") in ("pytorch", "onnx"):
        out["kept"] = found["kept"]
    p50 = found.get("p50_ms")
    if isinstance(p50, dict):
        figures = {k: p50.get(k) for k in ("pytorch", "onnx")}
        if all(isinstance(v, (int, float)) and math.isfinite(v) and v > 0 for v in figures.values()):
            out["p50_ms"] = figures
    if isinstance(found.get("error"), str):
        out["error"] = " ".join(found["error"].split())[:300]
    return out


def _source_note(source: dict[str, Any], exporter: str | None) -> str:
    p50 = source.get("p50_ms")
    if source.get("kept") == "pytorch" and p50:
        return (
            f"OpenVINO IR converted from the eager model (PyTorch frontend): p50 {p50['pytorch']:.3g} ms "
            f"against {p50['onnx']:.3g} ms from the {exporter} ONNX export"
        )
    if source.get("kept") == "pytorch":
        return "OpenVINO IR converted from the eager model (PyTorch frontend)"
    if p50:
        return (
            f"OpenVINO IR converted from the {exporter} ONNX export: p50 {p50['onnx']:.3g} ms "
            f"against {p50['pytorch']:.3g} ms from the eager model (PyTorch frontend)"
        )
    if source.get("error"):
        return (
            f"OpenVINO IR converted from the {exporter} ONNX export (the eager model's conversion by "
            f"the PyTorch frontend was not used: {source['error']})"
        )
    return f"OpenVINO IR converted from the {exporter} ONNX export"
