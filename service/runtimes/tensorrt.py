"""TensorRT: a serialized engine (`model.plan`), run with the optimization profile that fits the input.

An engine is tied to the GPU model and the TensorRT version that built it. Both are recorded with
it (`extra.engine` in kiln-artifact.json); loading it anywhere else is refused with the reason, and
the worker builds a new one instead. Device buffers come from torch's CUDA allocator, once per shape
bucket (each dynamic dimension rounded up to a power of two), and are reused by every call that
falls into the bucket.

The pure pieces (profiles from a signature, choosing a profile, shape buckets, the compatibility
check) are plain functions that need neither TensorRT nor a GPU; the tests exercise them on the CPU.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from service.errors import InvalidInput, RuntimeUnavailable
from service.runtimes.base import ArtifactInfo, Runtime
from service.signature import Signature, TensorSpec, numpy_dtype

Shape = tuple[int, ...]
# One optimization profile: input name -> (min, opt, max) shapes.
Profile = dict[str, tuple[Shape, Shape, Shape]]

# TensorRT's DataType member names -> Kiln's dtype names.
TRT_DTYPES = {
    "FLOAT": "float32",
    "HALF": "float16",
    "BF16": "bfloat16",
    "INT8": "int8",
    "INT32": "int32",
    "INT64": "int64",
    "BOOL": "bool",
    "UINT8": "uint8",
}


# --- profiles -----------------------------------------------------------------------------------


def optimization_profiles(signature: Signature, *, latency_profile: bool = True) -> list[Profile]:
    """Optimization profiles from the signature's min/opt/max of every dynamic dimension.

    Profile 0 covers the whole range and is tuned for `opt`. When some dimension's min is below its
    opt, profile 1 covers min..opt and is tuned for min, so that small requests (batch 1) run
    kernels chosen for them rather than for the opt size.
    """

    def shapes(point: str, **over: int) -> dict[str, Shape]:
        sizes = signature.sizes_at(point, **over)
        return {s.name: signature.concrete_shape(s, sizes) for s in signature.inputs}

    lo, opt, hi = shapes("min"), shapes("opt"), shapes("max")
    profiles: list[Profile] = [{n: (lo[n], opt[n], hi[n]) for n in opt}]
    if latency_profile and any(r.min < r.opt for r in signature.dims.values()):
        profiles.append({n: (lo[n], lo[n], opt[n]) for n in opt})
    return profiles


def ort_trt_profile_options(signature: Signature) -> dict[str, str]:
    """The same full-range profile as ONNX Runtime's TensorRT provider options spell it."""
    profile = optimization_profiles(signature, latency_profile=False)[0]
    if not any(r.min != r.max for r in signature.dims.values()):
        return {}

    def spell(i: int) -> str:
        return ",".join(f"{name}:{'x'.join(str(d) for d in shapes[i])}" for name, shapes in profile.items())

    return {"trt_profile_min_shapes": spell(0), "trt_profile_opt_shapes": spell(1), "trt_profile_max_shapes": spell(2)}


def fits(profile: Profile, shapes: Mapping[str, Shape]) -> bool:
    """Whether every input shape lies within the profile's min..max."""
    for name, shape in shapes.items():
        lo, _, hi = profile[name]
        if len(shape) != len(lo) or any(not a <= s <= b for s, a, b in zip(shape, lo, hi)):
            return False
    return True


def choose_profile(profiles: Sequence[Profile], shapes: Mapping[str, Shape]) -> int:
    """The index of the profile that fits the input and whose opt is closest to it (log scale);
    InvalidInput, naming the ranges, when none fits."""
    best, best_distance = -1, math.inf
    for i, profile in enumerate(profiles):
        if not fits(profile, shapes):
            continue
        distance = sum(
            abs(math.log(max(s, 1)) - math.log(max(o, 1)))
            for name, shape in shapes.items()
            for s, o in zip(shape, profile[name][1])
        )
        if distance < best_distance:
            best, best_distance = i, distance
    if best < 0:
        ranges = "; ".join(f"{n}: {list(lo)}..{list(hi)}" for n, (lo, _, hi) in profiles[0].items()) if profiles else ""
        got = ", ".join(f"{n}{list(s)}" for n, s in shapes.items())
        raise InvalidInput(f"input shapes {got} are outside every optimization profile of this engine ({ranges})")
    return best


def shape_bucket(profile: Profile, shapes: Mapping[str, Shape]) -> dict[str, Shape]:
    """The bucket an input falls in: each dynamic dimension rounded up to a power of two, capped at
    the profile's max. Buffers are sized for the bucket, so nearby shapes share them."""
    out: dict[str, Shape] = {}
    for name, shape in shapes.items():
        lo, _, hi = profile[name]
        out[name] = tuple(s if a == b else min(b, 1 << max(s - 1, 0).bit_length()) for s, a, b in zip(shape, lo, hi))
    return out


# --- engines and the hosts they belong to -------------------------------------------------------


def engine_stamp(gpu: str, compute_capability: str, tensorrt_version: str) -> dict[str, str]:
    """What an engine is tied to; recorded with it and compared before it is loaded."""
    return {"gpu": gpu, "compute_capability": compute_capability, "tensorrt": tensorrt_version}


def engine_mismatch(recorded: Mapping[str, Any] | None, current: Mapping[str, Any]) -> str | None:
    """Why an engine built under `recorded` must not be loaded under `current`, or None when it may."""
    if not recorded:
        return "the engine does not record the GPU and TensorRT version it was built for"
    problems = [
        f"{what} {recorded.get(key)!r} (this host: {current.get(key)!r})"
        for key, what in (("gpu", "GPU"), ("compute_capability", "compute capability"), ("tensorrt", "TensorRT"))
        if recorded.get(key) != current.get(key)
    ]
    if not problems:
        return None
    return (
        "the engine was built for "
        + ", ".join(problems)
        + "; TensorRT engines only run where they were built: rebuild it on this host"
    )


def current_stamp() -> dict[str, str]:
    """This host's GPU and TensorRT version."""
    import tensorrt as trt
    import torch

    if not torch.cuda.is_available():
        raise RuntimeUnavailable("no CUDA device on this host")
    major, minor = torch.cuda.get_device_capability(0)
    return engine_stamp(torch.cuda.get_device_name(0), f"{major}.{minor}", trt.__version__)


def dtype_name(trt_dtype: Any) -> str:
    """Kiln's name for a TensorRT DataType (by its member name, which every version keeps)."""
    member = getattr(trt_dtype, "name", None) or str(trt_dtype).rsplit(".", 1)[-1]
    try:
        return TRT_DTYPES[member]
    except KeyError:
        raise RuntimeUnavailable(f"TensorRT tensor type {member} is not supported by Kiln") from None


# --- the runtime --------------------------------------------------------------------------------


class TensorRTRuntime(Runtime):
    """Runs a serialized TensorRT engine on the GPU with execute_async_v3."""

    name = "tensorrt"
    library = "tensorrt"

    def __init__(
        self,
        path: Path,
        *,
        info: ArtifactInfo | None = None,
        threads: int | None = None,
        spin: bool = True,
        device: str = "cuda",
    ) -> None:
        super().__init__(path, info=info, threads=threads, device=device, spin=spin)
        import tensorrt as trt
        import torch

        problem = engine_mismatch((info.extra if info else {}).get("engine"), current_stamp())
        if problem:
            raise RuntimeUnavailable(problem)
        self._logger = trt.Logger(trt.Logger.WARNING)
        self._runtime = trt.Runtime(self._logger)
        self.engine = self._runtime.deserialize_cuda_engine(self.path.read_bytes())
        if self.engine is None:
            raise RuntimeUnavailable(f"TensorRT could not deserialize {self.path.name}")
        self.context = self.engine.create_execution_context()
        self.stream = torch.cuda.Stream()
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        is_input = {n: self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT for n in names}
        self._dtypes = {n: dtype_name(self.engine.get_tensor_dtype(n)) for n in names}
        self._input_names = [n for n in names if is_input[n]]
        self._output_names = [n for n in names if not is_input[n]]
        self.profiles: list[Profile] = [
            {
                n: tuple(tuple(int(d) for d in s) for s in self.engine.get_tensor_profile_shape(n, p))  # type: ignore[misc]
                for n in self._input_names
            }
            for p in range(self.engine.num_optimization_profiles)
        ]
        self._active: int | None = None
        self._buffers: dict[tuple[int, tuple[tuple[str, Shape], ...]], dict[str, Any]] = {}
        sig = self.signature()
        self._inputs = (
            list(sig.inputs)
            if sig
            else [
                TensorSpec(
                    name=n,
                    dtype=self._dtypes[n],
                    shape=[int(d) if d >= 0 else "dyn" for d in self.engine.get_tensor_shape(n)],
                )
                for n in self._input_names
            ]
        )
        self._outputs = (
            list(sig.outputs) if sig else [TensorSpec(name=n, dtype=self._dtypes[n]) for n in self._output_names]
        )

    def _torch_dtype(self, name: str) -> Any:
        from service.runtimes.torchscript import torch_dtype

        return torch_dtype(self._dtypes[name])

    def _allocate(self, profile: int, bucket: dict[str, Shape]) -> dict[str, Any]:
        """Device buffers for every input and output at the bucket's shapes."""
        import torch

        for name, shape in bucket.items():
            self.context.set_input_shape(name, shape)
        buffers: dict[str, Any] = {}
        for name, shape in bucket.items():
            buffers[name] = torch.empty(max(math.prod(shape), 1), dtype=self._torch_dtype(name), device="cuda")
        for name in self._output_names:
            shape = tuple(int(d) for d in self.context.get_tensor_shape(name))
            if any(d < 0 for d in shape):
                raise RuntimeUnavailable(
                    f"output {name} has a data-dependent shape, which Kiln's TensorRT runtime does not support"
                )
            buffers[name] = torch.empty(max(math.prod(shape), 1), dtype=self._torch_dtype(name), device="cuda")
        return buffers

    def run(self, inputs: Mapping[str, np.ndarray], outputs: Sequence[str] | None = None) -> dict[str, np.ndarray]:
        import torch

        missing = [n for n in self._input_names if n not in inputs]
        if missing:
            raise InvalidInput(f"missing input(s): {', '.join(missing)}")
        arrays = {
            n: np.ascontiguousarray(
                inputs[n], dtype=numpy_dtype(self._dtypes[n]) if self._dtypes[n] != "bfloat16" else None
            )
            for n in self._input_names
        }
        shapes = {n: tuple(a.shape) for n, a in arrays.items()}
        p = choose_profile(self.profiles, shapes)
        if p != self._active:
            self.context.set_optimization_profile_async(p, self.stream.cuda_stream)
            self._active = p
        bucket = shape_bucket(self.profiles[p], shapes)
        key = (p, tuple(sorted(bucket.items())))
        buffers = self._buffers.get(key)
        if buffers is None:
            buffers = self._buffers[key] = self._allocate(p, bucket)
        with torch.cuda.stream(self.stream):
            for name, array in arrays.items():
                view = buffers[name][: array.size].view(array.shape)
                view.copy_(torch.from_numpy(array))
                self.context.set_input_shape(name, array.shape)
                self.context.set_tensor_address(name, view.data_ptr())
            views = {}
            for name in self._output_names:
                shape = tuple(int(d) for d in self.context.get_tensor_shape(name))
                n = math.prod(shape)
                if n > buffers[name].numel():
                    raise RuntimeUnavailable(
                        f"output {name} of shape {list(shape)} is larger than its bucket's "
                        "buffer (an output that grows faster than the inputs)"
                    )
                views[name] = buffers[name][:n].view(shape)
                self.context.set_tensor_address(name, views[name].data_ptr())
            if not self.context.execute_async_v3(self.stream.cuda_stream):
                raise RuntimeUnavailable("TensorRT failed to run the engine (see the log)")
            host = {name: v.to("cpu", non_blocking=False) for name, v in views.items()}
        self.stream.synchronize()
        result: dict[str, np.ndarray] = {}
        for name, t in host.items():
            if t.dtype == torch.bfloat16:
                t = t.float()
            result[name] = t.numpy()
        wanted = list(outputs) if outputs else self._output_names
        return {n: result[n] for n in wanted}

    def close(self) -> None:
        self._buffers.clear()
        self.context = None
        self.engine = None
