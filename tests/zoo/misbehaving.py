"""Model code that misbehaves in the ways uploaded code can: each entry point is one way."""

import os
import time

import torch
from torch import nn

SIGNATURE = {"inputs": ["x:float32[batch,4]"], "outputs": ["y"], "dims": {"batch": [1, 2, 4]}}


def build_raises() -> nn.Module:
    raise ValueError("this model refuses to be built")


def build_hangs() -> nn.Module:
    while True:
        time.sleep(1)


def build_allocates() -> nn.Module:
    hoard = []
    while True:
        hoard.append(torch.ones(64 << 20, dtype=torch.uint8))  # 64 MiB at a time, touched


def build_shell() -> nn.Module:
    marker = os.environ.get("KILN_TEST_MARKER", "/tmp/kiln-shell-marker")
    os.system(f"echo pwned > {marker}")
    return nn.Linear(4, 4)


def build_not_a_module():
    return {"not": "a module"}


class Crasher(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        import ctypes

        ctypes.string_at(0)  # segfault while running, not while building
        return x


def build_crashes_in_forward() -> nn.Module:
    return Crasher()
