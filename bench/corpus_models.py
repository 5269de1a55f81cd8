"""Real architectures with random weights, for bench/corpus.py. This file is copied into each
model's bundle as `model.py`; each `build_<name>()` is an entry point. Everything here runs in
Kiln's sandbox like any uploaded model, so it must be deterministic (every sandbox op builds the
model again and must get the same weights) and must not reach the network.

Weights are random, but BatchNorm statistics are re-estimated on random inputs, so that the
reference outputs vary with the input (a freshly initialised BatchNorm normalises by running
statistics of 0 and 1, and deep CNNs then give nearly the same output for every input).
"""

from __future__ import annotations

import os

import torch
from torch import nn

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")


def _torchvision():
    """Import torchvision beside a CPU torch whose build does not match the wheel's compiled ops
    (PyPI's torchvision is a CUDA build): its Python code registers fake kernels for
    `torchvision::nms`, which fails unless the operator's schema exists. Define the schemas, and
    a plain-PyTorch CPU kernel for nms, which the detection models call."""
    if not _LIBS:
        try:
            import torchvision  # a matching build registers its own operators

            return torchvision
        except RuntimeError:
            pass
        lib = torch.library.Library("torchvision", "DEF")
        lib.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
        lib.define("qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
        lib.impl("nms", _nms, "CPU")
        _LIBS.append(lib)
    import torchvision
    import torchvision.extension

    # nms now has the kernel above; a def, not a lambda: torchvision scripts its callers when traced
    torchvision.extension._has_ops = _has_ops
    return torchvision


_LIBS: list = []


def _has_ops() -> bool:
    return True


def _nms(boxes: torch.Tensor, scores: torch.Tensor, iou_threshold: float) -> torch.Tensor:
    order = scores.argsort(descending=True)
    keep = []
    suppressed = torch.zeros(len(boxes), dtype=torch.bool)
    areas = (boxes[:, 2] - boxes[:, 0]).clamp(min=0) * (boxes[:, 3] - boxes[:, 1]).clamp(min=0)
    for i in order.tolist():
        if suppressed[i]:
            continue
        keep.append(i)
        lt = torch.maximum(boxes[i, :2], boxes[:, :2])
        rb = torch.minimum(boxes[i, 2:], boxes[:, 2:])
        wh = (rb - lt).clamp(min=0)
        inter = wh[:, 0] * wh[:, 1]
        iou = inter / (areas[i] + areas - inter).clamp(min=1e-9)
        suppressed |= iou > iou_threshold
    return torch.tensor(keep, dtype=torch.int64)


def _recalibrate(model: nn.Module, make_input, steps: int = 2, module: nn.Module | None = None) -> nn.Module:
    """Re-estimate every BatchNorm's running statistics on random inputs (cumulative average)."""
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if norms:
        for m in norms:
            m.reset_running_stats()
            m.momentum = None
        target = module or model
        target.train()
        with torch.no_grad():
            for _ in range(steps):
                target(make_input())
    return model.eval()


def _image(batch: int = 4, size: int = 224):
    return lambda: torch.randn(batch, 3, size, size)


def _vision(name: str, **kwargs) -> nn.Module:
    tv = _torchvision()
    torch.manual_seed(0)
    model = getattr(tv.models, name)(weights=None, **kwargs)
    return _recalibrate(model, _image())


def build_resnet50() -> nn.Module:
    return _vision("resnet50")


def build_mobilenet_v3() -> nn.Module:
    return _vision("mobilenet_v3_large")


def build_efficientnet_b0() -> nn.Module:
    return _vision("efficientnet_b0")


def build_convnext_tiny() -> nn.Module:
    return _vision("convnext_tiny")


def build_swin_t() -> nn.Module:
    return _vision("swin_t")


def build_deeplabv3() -> nn.Module:
    tv = _torchvision()
    torch.manual_seed(0)
    model = tv.models.segmentation.deeplabv3_mobilenet_v3_large(weights=None, weights_backbone=None)
    return _recalibrate(model, _image(4, 224))


def build_ssdlite() -> nn.Module:
    tv = _torchvision()
    torch.manual_seed(0)
    model = tv.models.detection.ssdlite320_mobilenet_v3_large(weights=None, weights_backbone=None)
    _recalibrate(model, _image(4, 320), module=model.backbone)
    return Detections(model.eval())


class Detections(nn.Module):
    """A detector for one image as tensors: boxes, scores and labels of its detections (torchvision's
    detectors take a list of images and return a list of dicts)."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, image: torch.Tensor):
        out = self.inner(list(image.unbind(0)))[0]
        return out["boxes"], out["scores"], out["labels"]


def build_vit_tiny() -> nn.Module:
    _torchvision()
    import timm

    torch.manual_seed(0)
    return timm.create_model("vit_tiny_patch16_224", pretrained=False).eval()


def _hf(model_cls: str, config_cls: str, **config) -> nn.Module:
    _torchvision()
    import transformers

    torch.manual_seed(0)
    cfg = getattr(transformers, config_cls)(**config)
    model = getattr(transformers, model_cls)(cfg)
    return model.eval()


class Ids(nn.Module):
    """A Hugging Face model called with input_ids only, returning its ModelOutput."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, input_ids: torch.Tensor):
        return self.inner(input_ids=input_ids)


def build_bert() -> nn.Module:
    return Ids(_hf("BertModel", "BertConfig"))


def build_distilbert() -> nn.Module:
    return Ids(_hf("DistilBertModel", "DistilBertConfig"))


def build_gpt2() -> nn.Module:
    return Ids(_hf("GPT2Model", "GPT2Config", use_cache=False))


def build_longformer() -> nn.Module:
    # onnx_export: the chunking without as_strided that Hugging Face's own ONNX config switches on
    # (the TorchScript-based export of the as_strided one disagrees with eager by 2e-2)
    return Ids(
        _hf(
            "LongformerModel",
            "LongformerConfig",
            hidden_size=256,
            num_hidden_layers=2,
            num_attention_heads=4,
            intermediate_size=1024,
            attention_window=32,
            onnx_export=True,
        )
    )


def build_t5_encoder() -> nn.Module:
    return Ids(_hf("T5EncoderModel", "T5Config", d_model=512, d_ff=2048, num_layers=6, num_heads=8))


def build_whisper_encoder() -> nn.Module:
    _torchvision()
    import transformers

    torch.manual_seed(0)
    cfg = transformers.WhisperConfig(
        d_model=384, encoder_layers=4, decoder_layers=4, encoder_attention_heads=6, decoder_attention_heads=6
    )
    return Features(transformers.WhisperModel(cfg).get_encoder().eval())


class Features(nn.Module):
    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, input_features: torch.Tensor):
        return self.inner(input_features=input_features)
