"""A ResNet-style CNN. `build_model` is ResNet-18-sized for 224x224 images; `build_small` is a
narrow one for quick tests."""

import torch
from torch import nn

SIGNATURE = {"inputs": ["image:float32[batch,3,224,224]"], "outputs": ["logits"], "dims": {"batch": [1, 4, 8]}}
SMALL_SIGNATURE = {"inputs": ["image:float32[batch,3,32,32]"], "outputs": ["logits"], "dims": {"batch": [1, 2, 4]}}


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.down = None
        if stride != 1 or cin != cout:
            self.down = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.down is None else self.down(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class ResNet(nn.Module):
    def __init__(
        self, widths=(64, 128, 256, 512), blocks=(2, 2, 2, 2), classes: int = 1000, stem_stride: int = 2
    ) -> None:
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(3, widths[0], 7, stem_stride, 3, bias=False),
            nn.BatchNorm2d(widths[0]),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(3, 2, 1) if stem_stride == 2 else nn.Identity(),
        )
        layers, cin = [], widths[0]
        for i, (w, n) in enumerate(zip(widths, blocks)):
            for j in range(n):
                layers.append(BasicBlock(cin, w, 2 if (j == 0 and i > 0) else 1))
                cin = w
        self.layers = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(cin, classes)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.pool(self.layers(self.stem(image))), 1))


def _init(model: nn.Module) -> nn.Module:
    # Deterministic weights with non-trivial batch-norm statistics, as a trained net would have.
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu", generator=g)
            elif isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5, generator=g)
                m.bias.uniform_(-0.1, 0.1, generator=g)
                m.running_mean.uniform_(-0.1, 0.1, generator=g)
                m.running_var.uniform_(0.5, 2.0, generator=g)
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0, 0.05, generator=g)
                nn.init.zeros_(m.bias)
    return model.eval()


def build_model() -> nn.Module:
    return _init(ResNet())


def build_small() -> nn.Module:
    return _init(ResNet(widths=(8, 16, 16, 32), blocks=(1, 1, 1, 1), classes=10, stem_stride=1))
