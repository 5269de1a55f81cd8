"""What a conversion should build: targets, precisions, tolerances, selection policy.

Shared by the API (which checks a job request) and the engine (which runs it).
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from service.errors import InvalidOptions

TARGETS = ("onnxruntime", "torchscript", "tensorrt", "openvino", "torch_export", "aotinductor")
GPU_TARGETS = ("tensorrt",)
# Where candidates run. A target builds one candidate per device it supports; CUDA candidates
# are named with a variant suffix (onnxruntime-fp16-cuda, torchscript-bf16-cuda; onnxruntime-fp16-trt
# for ONNX Runtime's TensorRT execution provider). TensorRT engines are always on the GPU.
DEVICES = ("cpu", "cuda")
PRECISIONS = ("fp32", "fp16", "bf16", "int8")
POLICIES = ("latency", "throughput", "accuracy")
# The ONNX exporters the export step tries, in this order by default, each as "<exporter>:<source>":
# the torch.export-based exporter from the eager model and from the torch.export capture (made
# with strict=False), and the TorchScript-based exporter from the script capture, the trace capture
# and the eager model (which it traces itself). The first whose graph agrees with eager is used.
ONNX_EXPORTERS = ("dynamo:eager", "dynamo:export", "torchscript:script", "torchscript:trace", "torchscript:eager")


class Tolerance(BaseModel):
    """Pass criteria for one output: |a-b| <= atol + rtol*max|ref|, floors on cosine, top-1 and top-k
    agreement and exact agreement, a ceiling on the normwise relative error. Which of them apply
    depends on the output's kind (OUTPUT_KINDS)."""

    model_config = ConfigDict(extra="forbid")
    atol: float | None = Field(default=None, ge=0)
    rtol: float | None = Field(default=None, ge=0)
    min_cosine: float | None = Field(default=None, ge=-1, le=1)
    min_top1: float | None = Field(default=None, ge=0, le=1)
    min_topk: float | None = Field(default=None, ge=0, le=1)  # the reference's class in the top 5
    max_rel: float | None = Field(default=None, ge=0)  # ||a-b|| / ||ref||
    min_exact: float | None = Field(default=None, ge=0, le=1)  # share of equal elements (ids, masks)


# What an output is decides how it is compared (a signature's output may say `kind`; see
# workers/validation.py for the default when it does not):
#   scores (logits, probabilities): top-1 and top-k agreement over rows, cosine, error bounds
#   embedding (hidden states, features): cosine and relative error; never an argmax
#   regression (other): error bounds, cosine, relative error
#   ids, mask: exact agreement of the elements
OUTPUT_KINDS = ("scores", "embedding", "regression", "ids", "mask")
KIND_ALIASES = {
    "logits": "scores",
    "probabilities": "scores",
    "hidden": "embedding",
    "features": "embedding",
    "other": "regression",
    "labels": "ids",
}


# Defaults per precision. int8 is judged by agreement (cosine, top-1) rather than absolute error.
DEFAULT_TOLERANCES: dict[str, Tolerance] = {
    "fp32": Tolerance(atol=1e-4, rtol=1e-3, min_cosine=0.99999),
    "fp16": Tolerance(atol=1e-2, rtol=1e-2, min_cosine=0.999),
    "bf16": Tolerance(atol=5e-2, rtol=5e-2, min_cosine=0.995),
    "int8": Tolerance(atol=None, rtol=None, min_cosine=0.98),
}
# Defaults that differ by output kind, by kind then precision (applied over DEFAULT_TOLERANCES).
KIND_TOLERANCES: dict[str, dict[str, Tolerance]] = {
    # one flipped row in 64 is 0.984: int8 may flip near-ties, not whole classes
    "scores": {"int8": Tolerance(min_top1=0.95, min_topk=0.99)},
    "embedding": {"int8": Tolerance(min_cosine=0.99, max_rel=0.15)},
    "regression": {"int8": Tolerance(max_rel=0.2)},
    "ids": {p: Tolerance(min_exact=1.0 if p == "fp32" else 0.95) for p in PRECISIONS},
    "mask": {p: Tolerance(min_exact=1.0 if p == "fp32" else 0.95) for p in PRECISIONS},
}
# Defaults that differ on a GPU, by device then precision. fp32 on CUDA is allowed TF32 (cuDNN
# convolutions and TensorRT use it by default): 10-bit mantissas in the products.
DEVICE_TOLERANCES: dict[str, dict[str, Tolerance]] = {
    "cuda": {"fp32": Tolerance(atol=1e-2, rtol=1e-2, min_cosine=0.9999)},
}


class ConversionOptions(BaseModel):
    """A conversion request's knobs. Unknown names are refused with the list of known ones."""

    model_config = ConfigDict(extra="forbid")
    targets: list[str] = Field(default_factory=lambda: ["onnxruntime", "torchscript"])
    precisions: list[str] = Field(default_factory=lambda: ["fp32"])
    policy: Literal["latency", "throughput", "accuracy"] = "latency"
    # For the "accuracy" policy: the largest normwise relative error a candidate may have.
    accuracy_budget: float = Field(default=1e-2, gt=0)
    # Per precision or per output name: {"fp16": {...}} or {"logits": {...}}.
    tolerances: dict[str, Tolerance] = Field(default_factory=dict)
    batch_sizes: list[int] | None = None
    threads: int | None = Field(default=None, ge=1, le=256)
    bench_seconds: float = Field(default=1.0, gt=0, le=60)
    # The sandbox's memory limit for this job (None: KILN_SANDBOX_MEMORY_BYTES, else half of RAM).
    memory_limit_bytes: int | None = Field(default=None, ge=1 << 30)
    # Devices to build candidates for; None: the CPU, plus CUDA where the worker has a CUDA device.
    devices: list[str] | None = None
    # The ONNX exporters to try, in order (ONNX_EXPORTERS).
    onnx_exporters: list[str] = Field(default_factory=lambda: list(ONNX_EXPORTERS))

    @field_validator("targets")
    @classmethod
    def _targets(cls, v: list[str]) -> list[str]:
        return _known(v, TARGETS, "target")

    @field_validator("precisions")
    @classmethod
    def _precisions(cls, v: list[str]) -> list[str]:
        return _known(
            [{"float32": "fp32", "float16": "fp16", "bfloat16": "bf16"}.get(p, p) for p in v], PRECISIONS, "precision"
        )

    @field_validator("onnx_exporters")
    @classmethod
    def _exporters(cls, v: list[str]) -> list[str]:
        return _known(v, ONNX_EXPORTERS, "ONNX exporter")

    @field_validator("devices")
    @classmethod
    def _devices(cls, v: list[str] | None) -> list[str] | None:
        return None if v is None else _known(v, DEVICES, "device")

    @field_validator("batch_sizes")
    @classmethod
    def _batches(cls, v: list[int] | None) -> list[int] | None:
        if v is not None and (not v or any(b < 1 for b in v)):
            raise ValueError("batch_sizes must be positive integers")
        return sorted(set(v)) if v else v

    @classmethod
    def parse(cls, data: dict) -> ConversionOptions:
        try:
            return cls.model_validate(data)
        except ValidationError as exc:
            err = exc.errors()[0]
            where = ".".join(str(p) for p in err.get("loc", ()))
            raise InvalidOptions(f"{where}: {err.get('msg', 'invalid').removeprefix('Value error, ')}") from None

    def tolerance_for(self, precision: str, output: str, device: str = "cpu", kind: str | None = None) -> Tolerance:
        """Default for the precision (on the device, for the output's kind), overridden by a
        per-precision entry, then a per-output one."""
        default = DEVICE_TOLERANCES.get(device, {}).get(precision, DEFAULT_TOLERANCES[precision])
        merged = default.model_dump()
        if kind in KIND_TOLERANCES and precision in KIND_TOLERANCES[kind]:
            merged.update(KIND_TOLERANCES[kind][precision].model_dump(exclude_none=True))
        for key in (precision, output):
            if key in self.tolerances:
                merged.update(self.tolerances[key].model_dump(exclude_none=True))
        return Tolerance(**merged)


def _known(values: list[str], known: tuple[str, ...], what: str) -> list[str]:
    if not values:
        raise ValueError(f"at least one {what} is needed")
    out = []
    for v in values:
        v = v.strip().lower()
        if v not in known:
            raise ValueError(f"unknown {what} {v!r}; known: {', '.join(known)}")
        if v not in out:
            out.append(v)
    return out
