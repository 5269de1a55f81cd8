"""Runtime registry. A runtime registers only when its library is installed; nothing heavy is
imported until an artifact is loaded."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

from service.errors import RuntimeUnavailable
from service.runtimes.base import ARTIFACT_META, ArtifactInfo, Runtime
from service.runtimes.onnxruntime import OnnxRuntime
from service.runtimes.openvino import OpenVinoRuntime
from service.runtimes.tensorrt import TensorRTRuntime
from service.runtimes.torch_export import AOTInductorRuntime, ExportedProgramRuntime
from service.runtimes.torchscript import TorchScriptRuntime

_REGISTRY: dict[str, type[Runtime]] = {}
# Set in the environment of the sandbox's processes (workers/sandbox.py): the boundary is around them.
INSIDE_BOX = "KILN_INSIDE_BOX"


def register(cls: type[Runtime]) -> type[Runtime]:
    """Register a runtime class if its library can be imported here."""
    if importlib.util.find_spec(cls.library) is not None:
        _REGISTRY[cls.name] = cls
    return cls


def available() -> list[str]:
    return sorted(_REGISTRY)


def get(name: str) -> type[Runtime]:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise RuntimeUnavailable(
            f"runtime {name!r} is not available on this host (available: {', '.join(available()) or 'none'})"
        ) from None


def load(
    directory: Path, *, threads: int | None = None, device: str | None = None, spin: bool = True, isolated: bool = True
) -> Runtime:
    """Load a built artifact directory (model file + kiln-artifact.json) with its runtime. An artifact
    that can run code (TorchScript, .pt2) runs in an isolated runner process (service/runner.py), unless
    `isolated` is False: only for a caller that is itself inside the boundary (a sandbox op)."""
    info = ArtifactInfo.load(Path(directory))
    cls = get(info.runtime)
    if cls.runs_code and not isolated and os.environ.get(INSIDE_BOX) != "1":
        raise RuntimeUnavailable(
            f"a {info.runtime} artifact runs code: it is loaded in-process only inside the isolation boundary"
        )
    if cls.runs_code and isolated:
        from service.runner import IsolatedRuntime

        return IsolatedRuntime(
            Path(directory) / info.file, info=info, threads=threads, device=device or info.device, spin=spin
        )
    return cls(Path(directory) / info.file, info=info, threads=threads, device=device or info.device, spin=spin)


def compute_device(info: ArtifactInfo) -> str:
    """Where an artifact computes: "cpu", or "cuda" (also for ONNX Runtime's TensorRT provider)."""
    return "cpu" if info.device == "cpu" else "cuda"


for _cls in (
    OnnxRuntime,
    TorchScriptRuntime,
    TensorRTRuntime,
    OpenVinoRuntime,
    ExportedProgramRuntime,
    AOTInductorRuntime,
):
    register(_cls)

__all__ = ["ARTIFACT_META", "ArtifactInfo", "Runtime", "available", "compute_device", "get", "load", "register"]
