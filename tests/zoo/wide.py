"""A wide MLP whose weights (about 66 MB) do not fit in a CPU cache: a run of one row reads them
all from memory (milliseconds on any CPU), and a run of many rows reads them once. The serving
tests use it where requests must meet a runtime that is busy: its runs are slow enough that
concurrent requests wait for one and are joined, whatever the machine.

x:float32[batch,64] -> logits[batch,10]."""

import torch
from torch import nn

SIGNATURE = {"inputs": ["x:float32[batch,64]"], "outputs": ["logits"], "dims": {"batch": [1, 8, 32]}}


def build_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(64, 4096), nn.ReLU(), nn.Linear(4096, 4096), nn.ReLU(), nn.Linear(4096, 10))
