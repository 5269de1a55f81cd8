"""Data-dependent control flow: the branch depends on the values, so tracing freezes one side."""

import torch
from torch import nn

SIGNATURE = {"inputs": ["x:float32[batch,16]"], "outputs": ["y"], "dims": {"batch": [1, 4, 8]}}


class Gate(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.pos = nn.Linear(16, 8)
        self.neg = nn.Linear(16, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.sum() > 0:
            return torch.relu(self.pos(x))
        return self.neg(x) * 2.0 - 1.0


def build_model() -> nn.Module:
    torch.manual_seed(0)
    return Gate().eval()
