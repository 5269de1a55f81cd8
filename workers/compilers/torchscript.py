"""TorchScript candidates: the faithful capture, frozen; fp32, and bf16/fp16 where the device allows,
on the CPU and (variant "cuda") on a CUDA device."""

from __future__ import annotations

import shutil
from pathlib import Path

from service.errors import ConversionError, InvalidOptions
from service.runtimes.base import ArtifactInfo
from workers.compilers.gpu import require_cuda
from workers.context import Candidate, Context
from workers.pipeline import StepLog
from workers.sandboxed import produced, sandbox_dir, sandboxed

COMPUTE = {"fp32": None, "bf16": "bfloat16", "fp16": "float16"}


class TorchScriptCompiler:
    target = "torchscript"

    def variants(self, precision: str, devices: list[str]) -> list[str | None]:
        if precision not in COMPUTE:
            return []  # TorchScript has no int8 path: not a candidate (the onnxruntime and openvino targets build it)
        out: list[str | None] = [None] if "cpu" in devices else []
        if "cuda" in devices and precision in COMPUTE:
            out.append("cuda")
        return out

    def stale(self, ctx: Context, candidate: Candidate) -> str | None:
        """Never: the artifact runs wherever its runtime does."""
        return None

    def build(self, ctx: Context, candidate: Candidate, out_dir: Path, log: StepLog) -> None:
        p = candidate.precision
        if p not in COMPUTE:
            raise InvalidOptions(
                f"precision {p} is not built for TorchScript; the onnxruntime and openvino targets build int8"
            )
        if ctx.bundle.kind == "export":
            # The capture step makes TorchScript from Python source only. A trace of the program's
            # module would turn every size its graph reads off the inputs (sym_size) into a constant.
            raise ConversionError(
                "TorchScript is not built from an uploaded torch.export program (.pt2); "
                "the torch_export and onnxruntime targets are"
            )
        device = "cuda" if candidate.variant == "cuda" else "cpu"
        if device == "cuda":
            require_cuda()
        method = ctx.preferred_capture
        capture = ctx.capture(method) if method else None
        if capture is None or method == "export" or not capture.file:
            raise ConversionError(f"no TorchScript capture agrees with eager: {why_no_capture(ctx)}")
        compute = COMPUTE[p]
        # Loading and freezing run the capture's code (TorchScript can call torch.from_file, and
        # freezing folds constants by running ops), so both happen in the sandbox.
        built = sandboxed(
            ctx,
            "build_torchscript",
            {
                "capture_file": capture.file,
                "compute": compute,
                "device": device,
                "out_file": str(sandbox_dir(ctx) / "torchscript" / f"{candidate.id}.pt"),
            },
            log,
        )
        candidate.notes.extend(built["notes"])
        out_dir.mkdir(parents=True, exist_ok=True)
        shutil.move(produced(ctx, built["file"]), out_dir / "model.pt")
        candidate.file = "model.pt"
        candidate.notes.append(f"from torch.jit.{method}" + (f", on {device}" if device != "cpu" else ""))
        ArtifactInfo(
            runtime="torchscript",
            file="model.pt",
            precision=p,
            signature=ctx.signature.to_json(),
            compute_dtype=compute,
            device=device,
            extra={"capture": method},
        ).save(out_dir)


def why_no_capture(ctx: Context) -> str:
    """Why the trace and the script gave nothing to build from, one clause each: a failed capture's
    hint (where the model did what the capture cannot record) or its error's first line, or where a
    capture disagreed with eager."""
    parts = []
    for method in ("trace", "script"):
        c = ctx.capture(method)
        if c is None:
            parts.append(f"{method} not tried")
        elif not c.ok:
            said = c.hint or (c.error or "it failed").strip().splitlines()[0]
            parts.append(f"{method} failed ({said if len(said) <= 300 else said[:299] + '…'})")
        elif not c.agrees:
            parts.append(f"{method} disagrees on {', '.join(c.disagreeing_samples[:4]) or 'some samples'}")
    return "; ".join(parts) or "see the capture step"
