"""OpenVINO: an IR (model.xml + model.bin) compiled for the CPU plugin.

An IR is a graph, not code: this runtime never registers extensions (no `Core.add_extension`, no
custom-operation libraries), and it refuses an IR with an operation from outside OpenVINO's standard
operation sets before the plugin sees it (`check_ir`), so `runs_code` is False and artifacts load
in-process like ONNX ones.
"""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from service.errors import InvalidBundle, KilnError, RuntimeUnavailable
from service.runtimes.base import ArtifactInfo, Runtime
from service.signature import TensorSpec, numpy_dtype

# Kiln's precision -> OpenVINO's CPU inference precision hint (and the optimization capability it needs).
INFERENCE_PRECISIONS = {"fp32": "f32", "bf16": "bf16", "fp16": "f16"}
_CAPABILITY = {"f32": "FP32", "bf16": "BF16", "f16": "FP16"}
# OpenVINO's element types -> Kiln's dtype names.
OV_DTYPES = {
    "f32": "float32",
    "f16": "float16",
    "f64": "float64",
    "bf16": "bfloat16",
    "i8": "int8",
    "i16": "int16",
    "i32": "int32",
    "i64": "int64",
    "u8": "uint8",
    "boolean": "bool",
}


def check_ir(xml: Path, *, error: type[KilnError] = InvalidBundle) -> Counter[str]:
    """Refuse an IR that is not a plain graph of OpenVINO's standard operation sets (an operation of an
    extension would need a library loaded to run) or whose weights are not beside it; return how many of
    each operation type it has."""
    import xml.etree.ElementTree as ET

    try:
        root = ET.parse(xml).getroot()
    except (OSError, ET.ParseError) as exc:
        raise error(f"{xml.name} is not an OpenVINO IR: {exc}") from None
    if root.tag != "net":
        raise error(f"{xml.name} is not an OpenVINO IR (its root is <{root.tag}>)")
    if not xml.with_suffix(".bin").is_file():
        raise error(f"{xml.name} has no {xml.with_suffix('.bin').name} beside it")
    ops: Counter[str] = Counter()
    for layer in root.iter("layer"):
        version = layer.get("version") or ""
        if not version.startswith("opset"):
            raise error(
                f"{xml.name}: layer {layer.get('name', '?')!r} is a {layer.get('type')!r} of {version or 'no'!r} "
                "operation set; only OpenVINO's standard operation sets load (no extensions)"
            )
        ops[layer.get("type") or "?"] += 1
    return ops


def cpu_precisions() -> set[str]:
    """The inference precisions OpenVINO's CPU plugin computes in on this CPU ("f32", "bf16", "f16"),
    from what the plugin detects (never from a list of CPU features)."""
    import openvino as ov

    caps = set(ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES"))
    return {p for p, cap in _CAPABILITY.items() if cap in caps}


class OpenVinoRuntime(Runtime):
    """Runs an OpenVINO IR on the CPU with the latency hint; outputs in the signature's dtypes."""

    name = "openvino"
    library = "openvino"
    runs_code = False  # a graph of standard operations; extensions are never loaded (check_ir)

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
        import openvino as ov

        if device != "cpu":
            raise RuntimeUnavailable(f"OpenVINO artifacts run on the CPU here, not on {device}")
        check_ir(self.path)
        hint = str((info.extra if info else {}).get("inference_precision") or "f32")
        core = ov.Core()  # no add_extension, ever: see the module's docstring
        if hint != "f32" and hint not in cpu_precisions():
            raise RuntimeUnavailable(f"OpenVINO's CPU plugin does not compute in {hint} on this CPU")
        try:
            model = core.read_model(str(self.path), str(self.path.with_suffix(".bin")))
            config: dict[str, Any] = {
                "PERFORMANCE_HINT": "LATENCY",
                # explicit: on CPUs with bf16 the plugin's default is bf16, not what fp32 validated
                "INFERENCE_PRECISION_HINT": hint,
            }
            if threads:
                config["INFERENCE_NUM_THREADS"] = int(threads)
            self.compiled = core.compile_model(model, "CPU", config)
        except RuntimeError as exc:
            raise InvalidBundle(f"OpenVINO could not load {self.path.name}: {str(exc).strip()[:300]}") from None
        self.request = self.compiled.create_infer_request()
        # one infer request, so one run at a time (ONNX Runtime's session.run may be called concurrently)
        self._lock = threading.Lock()
        sig = self.signature()
        self._inputs = list(sig.inputs) if sig else [_spec(p) for p in self.compiled.inputs]
        self._outputs = list(sig.outputs) if sig else [_spec(p) for p in self.compiled.outputs]
        ports = {name: port for port in self.compiled.outputs for name in port.get_names()}
        missing = [o.name for o in self._outputs if o.name not in ports]
        if missing:
            raise InvalidBundle(f"{self.path.name} has no output named {', '.join(missing)}")
        self._ports = [(o.name, ports[o.name], numpy_dtype(o.dtype) if o.dtype else None) for o in self._outputs]

    def run(self, inputs: Mapping[str, np.ndarray], outputs: Sequence[str] | None = None) -> dict[str, np.ndarray]:
        feed = {name: np.ascontiguousarray(value) for name, value in inputs.items()}
        with self._lock:
            # share_outputs=False (the default) copies the outputs out of the request's buffers
            result = self.request.infer(feed, share_inputs=True)
            values = {name: result[port] for name, port, _ in self._ports}
        out: dict[str, np.ndarray] = {}
        for name, _, dtype in self._ports:
            if outputs and name not in outputs:
                continue
            value = values[name]
            out[name] = value.astype(dtype, copy=False) if dtype is not None and value.dtype != dtype else value
        return out

    def close(self) -> None:
        self.request = None
        self.compiled = None


def _spec(port: Any) -> TensorSpec:
    shape: list[int | str] = [d.get_length() if d.is_static else "dyn" for d in port.get_partial_shape()]
    return TensorSpec(
        name=port.get_any_name(), dtype=OV_DTYPES.get(port.get_element_type().get_type_name()), shape=shape
    )
