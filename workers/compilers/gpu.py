"""What this worker's GPU side can do: a CUDA device, ONNX Runtime's GPU providers, TensorRT.

Each answer is worked out once per process, and nothing heavy is imported until asked. A missing
piece is a `RuntimeUnavailable` naming it, so that the candidate is reported as unavailable on this
worker and the job's other candidates go on.
"""

from __future__ import annotations

import ctypes
import importlib.util
from functools import lru_cache

from service.errors import RuntimeUnavailable

CUDA_PROVIDER = "CUDAExecutionProvider"
TENSORRT_PROVIDER = "TensorrtExecutionProvider"


@lru_cache(maxsize=1)
def cuda_device() -> str | None:
    """The name of CUDA device 0 as torch sees it, or None without one."""
    if importlib.util.find_spec("torch") is None:
        return None
    import torch

    try:
        return torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    except Exception:  # noqa: BLE001 - a broken driver is no device
        return None


def resolve_devices(requested: list[str] | None) -> list[str]:
    """The devices a job builds for: what it asked for, else the CPU plus CUDA where there is a device."""
    if requested is not None:
        return list(requested)
    return ["cpu"] + (["cuda"] if cuda_device() else [])


def require_cuda() -> str:
    """The CUDA device's name, or RuntimeUnavailable."""
    name = cuda_device()
    if name is None:
        raise RuntimeUnavailable("no CUDA device on this machine")
    return name


@lru_cache(maxsize=1)
def ort_providers() -> tuple[str, ...]:
    if importlib.util.find_spec("onnxruntime") is None:
        return ()
    import onnxruntime as ort

    return tuple(ort.get_available_providers())


@lru_cache(maxsize=1)
def tensorrt_libraries() -> bool:
    """Whether TensorRT's libraries can be loaded here (the Python package, or libnvinfer on the path)."""
    if importlib.util.find_spec("tensorrt") is not None:
        return True
    for name in ("libnvinfer.so.10", "libnvinfer.so"):
        try:
            ctypes.CDLL(name)
            return True
        except OSError:
            continue
    return False


def require_ort_provider(provider: str) -> None:
    """RuntimeUnavailable unless ONNX Runtime can run `provider` on this machine."""
    require_cuda()
    if provider not in ort_providers():
        raise RuntimeUnavailable(
            f"ONNX Runtime on this machine has no {provider} (onnxruntime-gpu is not installed; the CPU build is)"
        )
    if provider == TENSORRT_PROVIDER and not tensorrt_libraries():
        raise RuntimeUnavailable(
            "ONNX Runtime's TensorRT execution provider needs TensorRT's libraries "
            "(libnvinfer), which are not installed on this machine"
        )


def require_tensorrt() -> None:
    """RuntimeUnavailable unless the TensorRT Python package and a CUDA device are here."""
    if importlib.util.find_spec("tensorrt") is None:
        raise RuntimeUnavailable("TensorRT is not installed on this machine")
    require_cuda()
