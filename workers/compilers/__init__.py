"""Compilers, one per target. Each turns the captured/exported model into candidates for one
precision, written to `<out>/<candidate id>/` with a kiln-artifact.json that the runtime reads."""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

from workers.compilers.onnxruntime import OnnxRuntimeCompiler
from workers.compilers.openvino import OpenVinoCompiler
from workers.compilers.tensorrt import TensorRTCompiler
from workers.compilers.torch_export import AOTInductorCompiler, TorchExportCompiler
from workers.compilers.torchscript import TorchScriptCompiler
from workers.context import Candidate, Context
from workers.pipeline import StepLog


class Compiler(Protocol):
    target: str

    def variants(self, precision: str, devices: list[str]) -> list[str | None]:
        """The candidates one precision makes on the given devices (int8 on ONNX Runtime's CPU: static
        and dynamic). A CUDA candidate's variant names where it runs: "cuda", or "trt" for ONNX Runtime's
        TensorRT execution provider."""

    def build(self, ctx: Context, candidate: Candidate, out_dir: Path, log: StepLog) -> None:
        """Write the artifact for `candidate` into out_dir, filling in its file and notes.
        Raise a KilnError (RuntimeUnavailable for a missing library) when it cannot be built."""

    def stale(self, ctx: Context, candidate: Candidate) -> str | None:
        """Why a built artifact may not be used on this worker and must be rebuilt (a TensorRT engine
        built on another GPU or TensorRT version, after a resume elsewhere), or None. May raise a
        KilnError when it cannot tell (the library missing here)."""


COMPILERS: dict[str, Compiler] = {
    c.target: c
    for c in (
        OnnxRuntimeCompiler(),
        TorchScriptCompiler(),
        TensorRTCompiler(),
        OpenVinoCompiler(),
        TorchExportCompiler(),
        AOTInductorCompiler(),
    )
}


def candidate_id(target: str, precision: str, variant: str | None) -> str:
    return "-".join(p for p in (target, precision, variant) if p)
