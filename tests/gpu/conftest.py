"""GPU tests run where torch sees a CUDA device (`scripts/gpu-check` on a GPU machine); elsewhere each
one is skipped, with the reason."""

from __future__ import annotations

import importlib.util

import pytest


@pytest.fixture
def cuda() -> str:
    """The CUDA device's name; skips the test on a host without one."""
    from workers.compilers.gpu import cuda_device

    name = cuda_device()
    if name is None:
        pytest.skip("no CUDA device on this host (the GPU tests run on a GPU machine: scripts/gpu-check)")
    return name


@pytest.fixture
def ort_cuda(cuda: str) -> None:
    """Skips unless ONNX Runtime has its CUDA execution provider (onnxruntime-gpu)."""
    from workers.compilers.gpu import ort_providers

    if "CUDAExecutionProvider" not in ort_providers():
        pytest.skip("onnxruntime-gpu is not installed (ONNX Runtime has no CUDAExecutionProvider here)")


@pytest.fixture
def tensorrt(cuda: str) -> None:
    """Skips unless TensorRT's Python package is installed."""
    if importlib.util.find_spec("tensorrt") is None:
        pytest.skip("TensorRT is not installed on this host")
