"""A small DeepLabV3-like segmenter: a strided backbone, an image-pooling branch upsampled back to
the feature map, and the logits upsampled to the input size (`F.interpolate` to fixed sizes, which
the torch.export-based exporter writes as a Resize whose sizes start with the batch read at run time)."""

import torch
import torch.nn.functional as F
from torch import nn

SIGNATURE = {"inputs": ["image:float32[batch,3,32,32]"], "outputs": ["mask"], "dims": {"batch": [1, 2, 3]}}


class Segmenter(nn.Module):
    def __init__(self, classes: int = 5, width: int = 16) -> None:
        super().__init__()
        self.backbone = nn.Sequential(
            nn.Conv2d(3, width, 3, 2, 1),
            nn.ReLU(),
            nn.Conv2d(width, width, 3, 2, 1),
            nn.ReLU(),
        )
        self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Conv2d(width, width, 1), nn.ReLU())
        self.head = nn.Conv2d(2 * width, classes, 1)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        features = self.backbone(image)
        pooled = F.interpolate(self.pool(features), size=(8, 8), mode="bilinear", align_corners=False)
        logits = self.head(torch.cat([features, pooled], dim=1))
        return F.interpolate(logits, size=(32, 32), mode="bilinear", align_corners=False)


def build_model() -> nn.Module:
    torch.manual_seed(0)
    return Segmenter().eval()
