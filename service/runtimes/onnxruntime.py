"""ONNX Runtime: CPU by default; CUDA and TensorRT execution providers where onnxruntime-gpu is installed."""

from __future__ import annotations

import importlib.util
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from service.errors import InvalidBundle, RuntimeUnavailable
from service.onnx_policy import check_onnx
from service.runtimes.base import ArtifactInfo, Runtime
from service.signature import TensorSpec

# ONNX Runtime's type strings -> Kiln's dtype names.
ORT_DTYPES = {
    "tensor(float)": "float32",
    "tensor(float16)": "float16",
    "tensor(double)": "float64",
    "tensor(bfloat16)": "bfloat16",
    "tensor(int8)": "int8",
    "tensor(int16)": "int16",
    "tensor(int32)": "int32",
    "tensor(int64)": "int64",
    "tensor(uint8)": "uint8",
    "tensor(bool)": "bool",
}
PROVIDERS = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider", "tensorrt": "TensorrtExecutionProvider"}
# Caches of ONNX Runtime's TensorRT provider, under the data directory (engines are per GPU and version).
ORT_TRT_CACHE = "cache/ort-tensorrt"


def session_options(threads: int | None, *, optimized_path: Path | None = None, spin: bool = True) -> Any:
    """Session options shared by compiling (which saves the optimized graph) and serving."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.log_severity_level = 3
    if threads:
        so.intra_op_num_threads = threads
        so.inter_op_num_threads = 1
    if not spin:
        # Idle threads do not busy-wait for the next run: they still spin between the parallel
        # sections of a run (parking them after every operator made a ResNet-18-sized CNN's run
        # about 4% slower), and stop the moment the last concurrent run returns.
        so.add_session_config_entry("session.force_spinning_stop", "1")
    if optimized_path is not None:
        so.optimized_model_filepath = str(optimized_path)
    return so


class OnnxRuntime(Runtime):
    """Runs an `.onnx` artifact in an InferenceSession."""

    name = "onnxruntime"
    library = "onnxruntime"

    def __init__(
        self,
        path: Path,
        *,
        info: ArtifactInfo | None = None,
        threads: int | None = None,
        spin: bool = True,
        device: str = "cpu",
    ) -> None:
        super().__init__(path, info=info, threads=threads, device=device, spin=spin)
        import onnxruntime as ort

        check_onnx(self.path, error=InvalidBundle, external_in_folder=True)
        wanted = PROVIDERS.get(device, device)
        if wanted != "CPUExecutionProvider":
            _load_gpu_libraries(device)
        self.session = ort.InferenceSession(
            str(self.path), session_options(threads, spin=spin), providers=providers(device, info)
        )
        # ONNX Runtime falls back to the CPU, with a log line, when a provider cannot start (its CUDA
        # libraries missing): a GPU artifact must not quietly run, validate or serve on the CPU.
        got = self.session.get_providers()
        if not got or got[0] != wanted:
            self.session = None
            available = ", ".join(ort.get_available_providers())
            raise RuntimeUnavailable(
                f"{wanted} was asked for but ONNX Runtime could only start {', '.join(got)} "
                f"(providers in this build: {available}); on a GPU host, onnxruntime-gpu "
                "needs the CUDA and cuDNN libraries of its CUDA version"
            )
        self._inputs = [_spec(a) for a in self.session.get_inputs()]
        self._outputs = [_spec(a) for a in self.session.get_outputs()]

    def run(self, inputs: Mapping[str, np.ndarray], outputs: Sequence[str] | None = None) -> dict[str, np.ndarray]:
        names = list(outputs) if outputs else [o.name for o in self._outputs]
        values = self.session.run(names, dict(inputs))
        return dict(zip(names, values))

    def close(self) -> None:
        self.session = None


def providers(device: str, info: ArtifactInfo | None) -> list[Any]:
    """The provider list for a device: the wanted provider with its options, then the ones that
    take the nodes it has no kernels for (TensorRT -> CUDA -> CPU)."""
    options = dict((info.extra.get("provider_options") if info else None) or {})
    if device == "cpu":
        return ["CPUExecutionProvider"]
    if device == "cuda":
        return [("CUDAExecutionProvider", options), "CPUExecutionProvider"]
    if device == "tensorrt":
        from service.config import get_settings

        cache = get_settings().data_dir.resolve() / ORT_TRT_CACHE
        cache.mkdir(parents=True, exist_ok=True)
        options = {
            "trt_engine_cache_enable": True,
            "trt_engine_cache_path": str(cache),
            "trt_timing_cache_enable": True,
            "trt_timing_cache_path": str(cache),
            **options,
        }
        return [("TensorrtExecutionProvider", options), "CUDAExecutionProvider", "CPUExecutionProvider"]
    return [PROVIDERS.get(device, device), "CPUExecutionProvider"]


def _load_gpu_libraries(device: str) -> None:
    """Load the CUDA libraries ONNX Runtime's GPU providers link to before a GPU session starts.

    onnxruntime-gpu finds them by name; torch's CUDA build ships and loads the same ones (cuDNN,
    cuBLAS), so importing it first is what makes them findable. TensorRT's Python package loads
    libnvinfer the same way."""
    if importlib.util.find_spec("torch") is not None:
        import torch

        if torch.cuda.is_available():
            torch.cuda.init()
    else:
        import onnxruntime as ort

        if hasattr(ort, "preload_dlls"):
            ort.preload_dlls()
    if device == "tensorrt" and importlib.util.find_spec("tensorrt") is not None:
        import tensorrt  # noqa: F401 - importing it loads libnvinfer for the provider


def _spec(arg: Any) -> TensorSpec:
    shape = [
        d if isinstance(d, int) and d >= 0 else (d if isinstance(d, str) and d.isidentifier() else "dyn")
        for d in (arg.shape or [])
    ]
    return TensorSpec(name=arg.name, dtype=ORT_DTYPES.get(arg.type), shape=shape)
