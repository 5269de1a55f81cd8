"""TorchScript candidates: the faithful capture, frozen; fp32, and bf16/fp16 where the device allows,
on the CPU and (variant "cuda") on a CUDA device."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from service.errors import ConversionError, InvalidOptions
from service.runtimes.base import ArtifactInfo
from workers.compilers.gpu import require_cuda
from workers.context import Candidate, Context
from workers.pipeline import StepLog

COMPUTE = {"fp32": None, "bf16": "bfloat16", "fp16": "float16"}


def retarget_device_constants(graph: Any, device: str) -> int:
    """Point the graph's constant CPU devices at `device`; return how many there were.

    torch.jit.trace records `ids.device` as a constant (here: `torch.arange(..., device=ids.device)`
    became device="cpu"), so a trace made on the CPU would create tensors on the CPU beside CUDA
    weights."""
    count = 0
    for node in graph.findAllNodes("prim::Constant", True):
        if (node.output().type().kind() == "DeviceObjType" and node.hasAttribute("value")
                and node.s("value") == "cpu"):
            node.s_("value", device)
            count += 1
    return count


class TorchScriptCompiler:
    target = "torchscript"

    def variants(self, precision: str, devices: list[str]) -> list[str | None]:
        out: list[str | None] = [None] if "cpu" in devices else []
        if "cuda" in devices and precision in COMPUTE:
            out.append("cuda")
        return out

    def build(self, ctx: Context, candidate: Candidate, out_dir: Path, log: StepLog) -> None:
        import torch

        p = candidate.precision
        if p not in COMPUTE:
            raise InvalidOptions(f"precision {p} is not built for TorchScript; the onnxruntime target builds int8")
        device = "cuda" if candidate.variant == "cuda" else "cpu"
        if device == "cuda":
            require_cuda()
        method = ctx.preferred_capture
        capture = ctx.capture(method) if method else None
        if capture is None or method == "export" or not capture.file:
            raise ConversionError("no TorchScript capture agrees with eager (see the capture step)")
        module = torch.jit.load(capture.file, map_location=device).eval()
        compute = COMPUTE[p]
        if compute:
            module = module.to(getattr(torch, compute))
            candidate.notes.append(f"weights and compute in {compute}; inputs cast in, outputs cast back")
        if p == "bf16" and device == "cpu" and not torch.backends.mkldnn.is_available():
            candidate.notes.append("this CPU has no oneDNN bf16 support; expect it to be slow")
        frozen = torch.jit.freeze(module)
        if device != "cpu":
            moved = retarget_device_constants(frozen.graph, device)
            if moved:
                candidate.notes.append(f"{moved} device constant(s) recorded on the CPU by the capture now say {device}")
        out_dir.mkdir(parents=True, exist_ok=True)
        # Saved frozen: optimize_for_inference is applied after loading (a saved optimized module
        # failed to load again).
        frozen.save(str(out_dir / "model.pt"))
        candidate.file = "model.pt"
        candidate.notes.append(f"from torch.jit.{method}" + (f", on {device}" if device != "cpu" else ""))
        ArtifactInfo(runtime="torchscript", file="model.pt", precision=p, signature=ctx.signature.to_json(),
                     compute_dtype=compute, device=device, extra={"capture": method}).save(out_dir)
