"""Model registry: names, builders and metadata.

``build_model(name, num_classes, in_channels, input_size)`` returns an ``nn.Module`` mapping
(N, in_channels, input_size, input_size) float images to (N, num_classes) logits.
Registered names: the small CNNs below (for 7-28 px inputs), torchvision's ``resnet18`` and
``resnet50`` (first convolution rebuilt for the dataset's channels), any other torchvision
classification model by name, and timm models as ``timm:NAME``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torchvision
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from cqkd.errors import CqkdError, unknown_name


@dataclass(frozen=True)
class ModelSpec:
    """A registered model: its name, family, description, builder and minimum input size."""
    name: str
    family: str
    description: str
    builder: Callable[[int, int, int], nn.Module]
    min_size: int = 1


MODELS: dict[str, ModelSpec] = {}


def register_model(name: str, family: str, description: str, min_size: int = 1):
    """Decorator registering a model builder ``(num_classes, in_channels, input_size)`` under ``name``."""
    def wrap(fn: Callable[[int, int, int], nn.Module]):
        MODELS[name] = ModelSpec(name, family, description, fn, min_size)
        return fn
    return wrap


def _conv_bn(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class SmallCNN(nn.Module):
    """A VGG-style CNN whose pooling adapts to the input size.

    Stages of ``depth`` 3x3 conv-BN-ReLU blocks; after each stage but the last, a 2x2 max
    pool *if the feature map is still at least 6 px wide* (28 -> 14 -> 7, 14 -> 7 -> 3,
    7 -> 3 -> 3); then global average pooling and a linear classifier. Keeping the early
    pools at small inputs keeps a 7 px student cheap.
    """

    def __init__(self, num_classes: int, in_channels: int, input_size: int,
                 widths: tuple[int, ...], depth: int, dropout: float = 0.0) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        cin, size = in_channels, input_size
        self.stage_ends: list[str] = []  # the last block of each stage (cqkd.nets.features hooks them)
        for i, w in enumerate(widths):
            for _ in range(depth):
                layers.append(_conv_bn(cin, w))
                cin = w
            self.stage_ends.append(f"features.{len(layers) - 1}")
            if i < len(widths) - 1 and size >= 6:
                layers.append(nn.MaxPool2d(2))
                size //= 2
        self.features = nn.Sequential(*layers)
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Dropout(dropout), nn.Linear(cin, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


@register_model("cnn-small", "cnn", "3 stages (32, 64, 128), one conv each; a cheap student")
def cnn_small(num_classes: int, in_channels: int, input_size: int) -> nn.Module:
    """The small CNN: 3 stages (32, 64, 128), one conv each."""
    return SmallCNN(num_classes, in_channels, input_size, (32, 64, 128), depth=1)


@register_model("cnn-large", "cnn", "3 stages (32, 64, 128), two convs each, dropout 0.2; a teacher")
def cnn_large(num_classes: int, in_channels: int, input_size: int) -> nn.Module:
    """The large CNN: 3 stages (32, 64, 128), two convs each, dropout 0.2."""
    return SmallCNN(num_classes, in_channels, input_size, (32, 64, 128), depth=2, dropout=0.2)


def _adapt_stem(model: nn.Module, in_channels: int) -> nn.Module:
    """Rebuild the first convolution for ``in_channels`` inputs (e.g. 1 for grayscale)."""
    for name, module in model.named_modules():
        if isinstance(module, nn.Conv2d):
            if module.in_channels == in_channels:
                return model
            new = nn.Conv2d(in_channels, module.out_channels, module.kernel_size, module.stride,
                            module.padding, module.dilation, module.groups, module.bias is not None)
            parent = model
            *path, last = name.split(".")
            for p in path:
                parent = getattr(parent, p)
            setattr(parent, last, new)
            return model
    return model


def _torchvision(name: str, num_classes: int, in_channels: int) -> nn.Module:
    try:
        model = torchvision.models.get_model(name, weights=None, num_classes=num_classes)
    except Exception as e:
        raise CqkdError(f"cannot build torchvision model {name!r}: {e}") from None
    return _adapt_stem(model, in_channels)


@register_model("resnet18", "torchvision", "torchvision ResNet-18 (11.7M params); the paper's student", min_size=8)
def resnet18(num_classes: int, in_channels: int, input_size: int) -> nn.Module:
    """Torchvision ResNet-18 for the given classes and channels."""
    return _torchvision("resnet18", num_classes, in_channels)


@register_model("resnet50", "torchvision", "torchvision ResNet-50 (25.6M params); the paper's teacher", min_size=8)
def resnet50(num_classes: int, in_channels: int, input_size: int) -> nn.Module:
    """Torchvision ResNet-50 for the given classes and channels."""
    return _torchvision("resnet50", num_classes, in_channels)


def _timm(name: str, num_classes: int, in_channels: int) -> nn.Module:
    import timm  # optional backend: imported only when asked for

    try:
        return timm.create_model(name, pretrained=False, num_classes=num_classes, in_chans=in_channels)
    except Exception as e:
        raise CqkdError(f"cannot build timm model {name!r}: {e}") from None


def resolve(name: str) -> ModelSpec:
    """The spec for a registered name, a torchvision model name, or ``timm:NAME``."""
    if name in MODELS:
        return MODELS[name]
    if name.startswith("timm:"):
        arch = name[len("timm:"):]
        return ModelSpec(name, "timm", f"timm model {arch}", lambda nc, ic, s: _timm(arch, nc, ic))

    if name in torchvision.models.list_models(module=torchvision.models):
        return ModelSpec(name, "torchvision", f"torchvision model {name}",
                         lambda nc, ic, s: _torchvision(name, nc, ic))
    raise unknown_name("model", name, list(MODELS) + ["timm:NAME", "any torchvision classification model"])


def build_model(name: str, num_classes: int, in_channels: int, input_size: int) -> nn.Module:
    """Build registered model ``name``; ``CqkdError`` if ``input_size`` is below its minimum."""
    spec = resolve(name)
    if input_size < spec.min_size:
        raise CqkdError(f"model {name!r} needs inputs of at least {spec.min_size} px, got {input_size}")
    return spec.builder(num_classes, in_channels, input_size)


def count_params(model: nn.Module) -> int:
    """The number of parameters of ``model``."""
    return sum(p.numel() for p in model.parameters())


def count_flops(model: nn.Module, in_channels: int, input_size: int) -> int:
    """Forward FLOPs for one image (torch.utils.flop_counter; a multiply-add counts as 2)."""

    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    x = torch.zeros(1, in_channels, input_size, input_size, device=device)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(x)
    model.train(was_training)
    return int(counter.get_total_flops())
