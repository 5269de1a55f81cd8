"""Uses an operator that has no ONNX equivalent (symmetric eigenvalues): ONNX export must fail
with a clear reason while TorchScript candidates still build."""

import torch
from torch import nn

SIGNATURE = {"inputs": ["x:float32[batch,4,4]"], "outputs": ["eig"], "dims": {"batch": [1, 2, 4]}}


class Spectrum(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.linalg.eigvalsh(x @ x.transpose(-1, -2))


def build_model() -> nn.Module:
    return Spectrum().eval()
