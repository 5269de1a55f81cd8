"""A model that raises at run time for inputs it refuses (values over 1000): serving must answer
that request with an error and go on serving the next."""

import torch
from torch import nn

SIGNATURE = {"inputs": ["x:float32[batch,4]"], "outputs": ["y"], "dims": {"batch": [1, 2, 8]}}


class Picky(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if bool((x > 1000).any()):
            raise ValueError("input values over 1000 are refused")
        return self.lin(x)


def build_model() -> nn.Module:
    torch.manual_seed(0)
    return Picky().eval()
