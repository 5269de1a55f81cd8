"""A plain MLP: x:float32[batch,64] -> logits[batch,10]."""

import torch
from torch import nn

SIGNATURE = {"inputs": ["x:float32[batch,64]"], "outputs": ["logits"], "dims": {"batch": [1, 8, 32]}}


def build_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 256), nn.GELU(), nn.Linear(256, 10))
