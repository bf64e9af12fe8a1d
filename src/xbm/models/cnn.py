"""Plain conv-BN-ReLU stacks: a small VGG-11 and a tiny CNN for tests.

Both keep the backbone contract the multi-task wrapper relies on: bias-free convs each followed by
a BatchNorm (so BN can be made per task), global average pooling, and a single ``nn.Linear``
classifier named ``fc`` whose input size is ``feature_dim``.
"""

from __future__ import annotations

import torch
from torch import nn

from xbm.models.registry import register_model

# VGG-11 channel plan in units of ``width`` ("M" = 2x2 max-pool). The original has a fifth pool
# after the last pair; on 28x28 inputs that would pool a 1x1 map down to nothing, so global average
# pooling takes its place.
_VGG11_PLAN: tuple[int | str, ...] = (1, "M", 2, "M", 4, 4, "M", 8, 8, "M", 8, 8)


def _conv_bn_relu(in_ch: int, out_ch: int) -> list[nn.Module]:
    return [
        nn.Conv2d(in_ch, out_ch, kernel_size=3, padding=1, bias=False),
        nn.BatchNorm2d(out_ch),
        nn.ReLU(inplace=True),
    ]


def _init_weights(model: nn.Module) -> None:
    if any(p.is_meta for p in model.parameters()):  # no values to draw (and a draw on the
        return  # meta device imports TorchDynamo, a second or two per `xbm map`)
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


class ConvNet(nn.Module):
    """``features`` (conv/BN/ReLU/pool stack) -> global average pool -> ``fc``."""

    head_name = "fc"

    def __init__(self, plan: tuple[int | str, ...], num_classes: int, in_channels: int,
                 width: int) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        ch = in_channels
        for item in plan:
            if item == "M":
                layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
            else:
                out_ch = int(item) * width
                layers += _conv_bn_relu(ch, out_ch)
                ch = out_ch
        self.features = nn.Sequential(*layers)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.feature_dim = ch
        self.fc = nn.Linear(ch, num_classes)
        _init_weights(self)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Pooled features, i.e. the input of ``fc``."""
        return torch.flatten(self.avgpool(self.features(x)), 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.forward_features(x))


@register_model("vgg11_cifar")
def vgg11_cifar(num_classes: int = 10, in_channels: int = 1, width: int = 16) -> ConvNet:
    """VGG-11 with BatchNorm for small images (channels w..8w, global-pool head); width 16."""
    return ConvNet(_VGG11_PLAN, num_classes, in_channels, width)


@register_model("small_cnn")
def small_cnn(num_classes: int = 10, in_channels: int = 1, width: int = 8) -> ConvNet:
    """Tiny 3-conv CNN (w, 2w, 4w channels) for tests and smoke runs; default width 8."""
    return ConvNet((1, "M", 2, "M", 4), num_classes, in_channels, width)
