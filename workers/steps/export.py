"""export: ONNX with dynamic axes from the signature, checked with onnx.checker and shape inference."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from service.errors import ConversionError
from service.onnx_policy import check_onnx as check_onnx_policy
from workers.context import Context
from workers.pipeline import SkipStep, StepLog
from workers.sandboxed import produced, sandboxed, uploaded_model_file

# The targets that compile from the ONNX export.
ONNX_TARGETS = {"onnxruntime", "tensorrt", "openvino"}


class Export:
    name = "export"
    requires = ("load",)

    def run(self, ctx: Context, log: StepLog) -> dict[str, Any]:
        if not set(ctx.options.targets) & ONNX_TARGETS:
            raise SkipStep("no ONNX-based target was asked for")
        target = ctx.work / "onnx" / "model.onnx"
        target.parent.mkdir(parents=True, exist_ok=True)
        if ctx.bundle.kind == "onnx":
            shutil.copyfile(uploaded_model_file(ctx), target)
            check_onnx(target, external_ok=False)
            ctx.onnx_file, ctx.onnx_exporter = str(target), "uploaded"
            log.info("using the uploaded ONNX model")
            return {"exporter": "uploaded"}
        result = sandboxed(
            ctx,
            "export_onnx",
            {
                "out_dir": str(ctx.work / "sandbox" / "onnx"),
                "captures": [c.model_dump() for c in ctx.captures],
                "exporters": ctx.options.onnx_exporters,
            },
            log,
        )
        ctx.export_attempts = result["attempts"]
        for a in ctx.export_attempts:
            what = f"{a['exporter']} exporter from {a['source']}"
            if a.get("skipped"):
                log.info(f"{what}: {a.get('error')}")
            elif not a.get("ok"):
                log.info(f"{what}: failed: {a.get('error')}")
            else:
                log.info(
                    f"{what}: {'agrees with eager' if a.get('agrees') else 'disagrees on ' + ', '.join(a.get('disagreeing_samples', []))}"
                    f" ({a['seconds']:.2f}s)"
                )
        chosen = result["chosen"]
        if not chosen:
            reasons = "; ".join(
                f"{a['exporter']}:{a['source']}: {a.get('error') or 'disagrees with eager'}"
                for a in ctx.export_attempts
            )
            tried = ", ".join(ctx.options.onnx_exporters)
            raise ConversionError(
                f"ONNX export failed: {reasons or 'no capture agrees with eager to export from'} (tried {tried})"
            )
        shutil.copyfile(produced(ctx, chosen["file"]), target, follow_symlinks=False)
        info = check_onnx(target)
        ctx.onnx_file, ctx.onnx_exporter = str(target), f"{chosen['exporter']}:{chosen['source']}"
        log.info(f"ONNX: {info['nodes']} nodes, opset {info['opset']}, exported by {ctx.onnx_exporter}")
        return {"exporter": ctx.onnx_exporter, **info}


def check_onnx(path: Path, *, external_ok: bool = True) -> dict[str, Any]:
    """The ONNX policy (service/onnx_policy.py), onnx.checker and shape inference."""
    import onnx

    # made in the sandbox, so as untrusted as an upload: standard operators, no data from elsewhere
    check_onnx_policy(path, error=ConversionError, external_in_folder=external_ok)
    try:
        onnx.checker.check_model(str(path))
        inferred = onnx.shape_inference.infer_shapes(onnx.load(str(path)), strict_mode=False)
    except Exception as exc:  # noqa: BLE001 - checker and inference raise several types
        raise ConversionError(f"ONNX check failed: {str(exc).splitlines()[0][:300]}") from None
    opset = next((o.version for o in inferred.opset_import if o.domain in ("", "ai.onnx")), None)
    return {
        "nodes": len(inferred.graph.node),
        "opset": opset,
        "ops": sorted({n.op_type for n in inferred.graph.node})[:40],
    }
