"""ONNX Runtime: CPU by default; CUDA and TensorRT execution providers where onnxruntime-gpu is installed."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from service.runtimes.base import ArtifactInfo, Runtime
from service.signature import TensorSpec

# ONNX Runtime's type strings -> Kiln's dtype names.
ORT_DTYPES = {
    "tensor(float)": "float32", "tensor(float16)": "float16", "tensor(double)": "float64",
    "tensor(bfloat16)": "bfloat16", "tensor(int8)": "int8", "tensor(int16)": "int16",
    "tensor(int32)": "int32", "tensor(int64)": "int64", "tensor(uint8)": "uint8", "tensor(bool)": "bool",
}
PROVIDERS = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider", "tensorrt": "TensorrtExecutionProvider"}


def session_options(threads: int | None, *, optimized_path: Path | None = None) -> Any:
    """Session options shared by compiling (which saves the optimized graph) and serving."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.log_severity_level = 3
    if threads:
        so.intra_op_num_threads = threads
        so.inter_op_num_threads = 1
    if optimized_path is not None:
        so.optimized_model_filepath = str(optimized_path)
    return so


class OnnxRuntime(Runtime):
    """Runs an `.onnx` artifact in an InferenceSession."""

    name = "onnxruntime"
    library = "onnxruntime"

    def __init__(self, path: Path, *, info: ArtifactInfo | None = None, threads: int | None = None,
                 device: str = "cpu") -> None:
        super().__init__(path, info=info, threads=threads, device=device)
        import onnxruntime as ort

        providers = [PROVIDERS.get(device, device)]
        if providers[0] != "CPUExecutionProvider":
            providers.append("CPUExecutionProvider")
        self.session = ort.InferenceSession(str(self.path), session_options(threads), providers=providers)
        self._inputs = [_spec(a) for a in self.session.get_inputs()]
        self._outputs = [_spec(a) for a in self.session.get_outputs()]

    @property
    def inputs(self) -> list[TensorSpec]:
        return self._inputs

    @property
    def outputs(self) -> list[TensorSpec]:
        return self._outputs

    def run(self, inputs: Mapping[str, np.ndarray], outputs: Sequence[str] | None = None) -> dict[str, np.ndarray]:
        names = list(outputs) if outputs else [o.name for o in self._outputs]
        values = self.session.run(names, dict(inputs))
        return dict(zip(names, values))

    def close(self) -> None:
        self.session = None  # type: ignore[assignment]


def _spec(arg: Any) -> TensorSpec:
    shape = [d if isinstance(d, int) and d >= 0 else (d if isinstance(d, str) and d.isidentifier() else "dyn")
             for d in (arg.shape or [])]
    return TensorSpec(name=arg.name, dtype=ORT_DTYPES.get(arg.type), shape=shape)
