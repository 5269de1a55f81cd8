"""A model whose rows depend on each other (it centres each batch on its mean): batching it would
change every caller's answer, so Kiln must serve it unbatched."""

import torch
from torch import nn

SIGNATURE = {"inputs": ["x:float32[batch,8]"], "outputs": ["y"], "dims": {"batch": [1, 4, 8]}}


class Centre(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin(x - x.mean(dim=0, keepdim=True))


def build_model() -> nn.Module:
    torch.manual_seed(0)
    return Centre().eval()
