"""GPU tests run where torch sees a CUDA device (`scripts/gpu-check` on a GPU machine); elsewhere each
one is skipped, with the reason."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
import textwrap

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


_AOTI_PROBE = textwrap.dedent(
    """
    import sys, torch, torch._inductor
    from torch.export.passes import move_to_device_pass
    path = sys.argv[1]
    if sys.argv[2] == "compile":
        m = torch.nn.Sequential(torch.nn.Linear(16, 8), torch.nn.ReLU()).eval()
        ep = torch.export.export(m, (torch.randn(2, 16),), dynamic_shapes=({0: torch.export.Dim("b", min=1, max=64)},))
        torch._inductor.aoti_compile_and_package(move_to_device_pass(ep, "cuda"), package_path=path)
    else:
        print(tuple(torch._inductor.aoti_load_package(path)(torch.randn(3, 16, device="cuda")).shape))
    """
)


@pytest.fixture
def aoti_cuda(cuda: str, tmp_path_factory: pytest.TempPathFactory) -> None:
    """Skips unless torch itself, outside Kiln, can compile an AOTInductor package for this GPU and
    load and run it in a fresh process. (torch 2.11+cu130 on an H200 compiled one and then crashed
    with SIGSEGV inside `aoti_load_package`: a host where no AOTInductor CUDA candidate can pass.)"""
    import torch

    path = str(tmp_path_factory.mktemp("aoti-probe") / "probe.pt2")
    for step in ("compile", "load"):
        done = subprocess.run(
            [sys.executable, "-c", _AOTI_PROBE, path, step], capture_output=True, text=True, timeout=600
        )
        if done.returncode != 0:
            last = (done.stderr.strip().splitlines() or [f"exit {done.returncode}"])[-1][:200]
            how = f"signal {-done.returncode}" if done.returncode < 0 else last
            pytest.skip(f"torch {torch.__version__} cannot {step} an AOTInductor CUDA package on this host ({how})")
