"""TorchScript candidates: the faithful capture, frozen; fp32, and bf16/fp16 where the device allows."""

from __future__ import annotations

from pathlib import Path

from service.errors import ConversionError, InvalidOptions
from service.runtimes.base import ArtifactInfo
from workers.context import Candidate, Context
from workers.pipeline import StepLog

COMPUTE = {"fp32": None, "bf16": "bfloat16", "fp16": "float16"}


class TorchScriptCompiler:
    target = "torchscript"

    def variants(self, precision: str) -> list[str | None]:
        return [None]

    def build(self, ctx: Context, candidate: Candidate, out_dir: Path, log: StepLog) -> None:
        import torch

        p = candidate.precision
        if p not in COMPUTE:
            raise InvalidOptions(f"precision {p} is not built for TorchScript; the onnxruntime target builds int8")
        method = ctx.preferred_capture
        capture = ctx.capture(method) if method else None
        if capture is None or method == "export" or not capture.file:
            raise ConversionError("no TorchScript capture agrees with eager (see the capture step)")
        module = torch.jit.load(capture.file, map_location="cpu").eval()
        compute = COMPUTE[p]
        if compute:
            module = module.to(getattr(torch, compute))
            candidate.notes.append(f"weights and compute in {compute}; inputs cast in, outputs cast back")
        if p == "bf16" and not torch.backends.mkldnn.is_available():
            candidate.notes.append("this CPU has no oneDNN bf16 support; expect it to be slow")
        frozen = torch.jit.freeze(module)
        out_dir.mkdir(parents=True, exist_ok=True)
        # Saved frozen: optimize_for_inference is applied after loading (a saved optimized module
        # failed to load again).
        frozen.save(str(out_dir / "model.pt"))
        candidate.file = "model.pt"
        candidate.notes.append(f"from torch.jit.{method}")
        ArtifactInfo(runtime="torchscript", file="model.pt", precision=p, signature=ctx.signature.to_json(),
                     compute_dtype=compute, extra={"capture": method}).save(out_dir)
