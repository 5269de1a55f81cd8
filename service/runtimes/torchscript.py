"""TorchScript: a frozen ScriptModule, optimized for inference after loading."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from service.runtimes.base import ArtifactInfo, Runtime
from service.signature import TensorSpec


def torch_dtype(name: str) -> Any:
    import torch

    return {
        "float32": torch.float32,
        "float16": torch.float16,
        "bfloat16": torch.bfloat16,
        "float64": torch.float64,
        "int8": torch.int8,
        "int16": torch.int16,
        "int32": torch.int32,
        "int64": torch.int64,
        "uint8": torch.uint8,
        "bool": torch.bool,
    }[name]


def telling_line(text: str) -> str:
    """The line of an error message that says what went wrong: TorchScript puts its traceback first
    and the model's own error last."""
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if not lines:
        return ""
    return lines[-1] if "TorchScript interpreter" in lines[0] else lines[0]


def flatten_outputs(value: Any) -> list[Any]:
    """A model's return value as a flat list of tensors (tensor, tuple/list, or dict in order;
    None left out)."""
    if value is None:
        return []
    if isinstance(value, dict):
        value = list(value.values())
    if isinstance(value, (tuple, list)):
        flat: list[Any] = []
        for v in value:
            flat.extend(flatten_outputs(v))
        return flat
    return [value]


class TorchScriptRuntime(Runtime):
    """Runs a TorchScript `.pt` artifact. Float inputs are cast to the artifact's compute dtype
    (bf16/fp16 artifacts) and outputs back to the signature's dtypes."""

    name = "torchscript"
    library = "torch"
    runs_code = True  # TorchScript is code: torch.from_file is scriptable

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
        import torch

        if threads:
            torch.set_num_threads(threads)
        self.module = self.load_module()
        sig = self.signature()
        self._inputs = list(sig.inputs) if sig else []
        self._outputs = list(sig.outputs) if sig else []
        self._compute = torch_dtype(info.compute_dtype) if info and info.compute_dtype else None

    def load_module(self) -> Any:
        """The callable that runs the artifact: positional tensors in, tensors (nested or not) out."""
        import torch

        module = torch.jit.load(str(self.path), map_location=self.device)
        module.eval()
        # Saving an optimize_for_inference'd module breaks reloading it, so artifacts are saved
        # frozen and optimized here, after loading. Its passes are for the CPU (oneDNN layouts);
        # on CUDA the frozen graph (batch norms already folded) is what runs.
        if self.device == "cpu":
            try:
                module = torch.jit.optimize_for_inference(module)
            except Exception:  # noqa: BLE001 - an unoptimizable graph still runs as frozen
                pass
        return module

    def run(self, inputs: Mapping[str, np.ndarray], outputs: Sequence[str] | None = None) -> dict[str, np.ndarray]:
        import torch

        order = [s.name for s in self._inputs] or list(inputs)
        args = []
        for name in order:
            t = torch.from_numpy(np.ascontiguousarray(inputs[name]))
            if self._compute is not None and t.is_floating_point():
                t = t.to(self._compute)
            args.append(t.to(self.device) if self.device != "cpu" else t)
        with torch.inference_mode():
            flat = flatten_outputs(self.module(*args))
        names = [s.name for s in self._outputs] or [f"output_{i}" for i in range(len(flat))]
        result: dict[str, np.ndarray] = {}
        specs: list[TensorSpec | None] = [*self._outputs] or [None] * len(flat)
        for spec_name, t, spec in zip(names, flat, specs):
            t = t.detach().to("cpu")
            want = spec.dtype if spec and spec.dtype else None
            if want and want != "bfloat16":
                t = t.to(torch_dtype(want))
            elif t.dtype in (torch.bfloat16, torch.float16):
                t = t.float()
            result[spec_name] = t.numpy()
        if outputs:
            return {n: result[n] for n in outputs}
        return result
