"""ResNets: the CIFAR-style demo backbone and ImageNet layouts that load torchvision checkpoints.

One :class:`ResNet` class serves both layouts so the multi-task machinery sees the same module tree
either way. Submodule names follow torchvision exactly (``conv1``, ``bn1``, ``layer1.0.conv1``,
``layer1.0.downsample.0``, ``fc``): a user's pretrained ``state_dict()`` then loads with
``strict=True`` and no key remapping, which is the cheapest way to keep that compatibility from
silently rotting. Every conv is bias-free and followed by its own BatchNorm so that BN statistics
can be specialised per task.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import nn

from xbm.errors import ConfigError
from xbm.models.registry import register_model


def _conv3x3(in_ch: int, out_ch: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_ch, out_ch, kernel_size=3, stride=stride, padding=1, bias=False)


def _conv1x1(in_ch: int, out_ch: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_ch, out_ch, kernel_size=1, stride=stride, bias=False)


class BasicBlock(nn.Module):
    """Two 3x3 convs with an identity (or 1x1 projection) shortcut."""

    expansion = 1

    def __init__(self, in_ch: int, planes: int, stride: int = 1,
                 downsample: nn.Module | None = None) -> None:
        super().__init__()
        # Registration order (conv, bn, conv, bn, downsample) matches torchvision, so state-dict
        # key order matches too; tools that diff checkpoints by position keep working.
        self.conv1 = _conv3x3(in_ch, planes, stride)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = _conv3x3(planes, planes)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + shortcut)


class Bottleneck(nn.Module):
    """1x1 reduce, 3x3, 1x1 expand (x4).

    The stride sits on the 3x3 conv (torchvision's "v1.5"), not on the first 1x1 conv as in the
    original paper; putting it elsewhere would keep shapes identical but make pretrained weights
    compute something different.
    """

    expansion = 4

    def __init__(self, in_ch: int, planes: int, stride: int = 1,
                 downsample: nn.Module | None = None) -> None:
        super().__init__()
        self.conv1 = _conv1x1(in_ch, planes)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = _conv3x3(planes, planes, stride)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = _conv1x1(planes, planes * self.expansion)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + shortcut)


class ResNet(nn.Module):
    """ResNet with four stages of widths ``w, 2w, 4w, 8w`` (times the block expansion).

    ``stem="cifar"`` uses a stride-1 3x3 stem and no max-pool, which keeps enough resolution for
    28x28/32x32 inputs; ``stem="imagenet"`` is the 7x7 stride-2 stem plus max-pool. In the CIFAR
    layout ``maxpool`` is an ``nn.Identity`` so both layouts share one module tree.
    """

    head_name = "fc"

    def __init__(
        self,
        block: type[BasicBlock] | type[Bottleneck],
        layers: tuple[int, int, int, int],
        num_classes: int,
        in_channels: int,
        width: int,
        stem: Literal["cifar", "imagenet"],
    ) -> None:
        super().__init__()
        if stem == "cifar":
            self.conv1: nn.Conv2d = _conv3x3(in_channels, width)
        elif stem == "imagenet":
            self.conv1 = nn.Conv2d(in_channels, width, kernel_size=7, stride=2, padding=3,
                                   bias=False)
        else:
            raise ConfigError(f"unknown ResNet stem {stem!r}; choose one of: cifar, imagenet")
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool: nn.Module = (
            nn.MaxPool2d(kernel_size=3, stride=2, padding=1) if stem == "imagenet"
            else nn.Identity()
        )
        self._in_ch = width
        self.layer1 = self._make_stage(block, width, layers[0], stride=1)
        self.layer2 = self._make_stage(block, width * 2, layers[1], stride=2)
        self.layer3 = self._make_stage(block, width * 4, layers[2], stride=2)
        self.layer4 = self._make_stage(block, width * 8, layers[3], stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.feature_dim = width * 8 * block.expansion
        self.fc = nn.Linear(self.feature_dim, num_classes)
        self._init_weights()

    def _make_stage(self, block: type[BasicBlock] | type[Bottleneck], planes: int, blocks: int,
                    stride: int) -> nn.Sequential:
        out_ch = planes * block.expansion
        downsample = None
        if stride != 1 or self._in_ch != out_ch:
            downsample = nn.Sequential(
                _conv1x1(self._in_ch, out_ch, stride), nn.BatchNorm2d(out_ch)
            )
        stage = [block(self._in_ch, planes, stride, downsample)]
        self._in_ch = out_ch
        stage += [block(out_ch, planes) for _ in range(1, blocks)]
        return nn.Sequential(*stage)

    def _init_weights(self) -> None:
        # He init for ReLU nets; BN starts as identity. Same scheme as torchvision, so training
        # from scratch behaves like the reference recipes people compare against.
        if self.fc.weight.is_meta:  # no values to draw (and a draw on the meta device imports
            return  # TorchDynamo, a second or two per `xbm map`)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Pooled features, i.e. the input of ``fc``."""
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return torch.flatten(self.avgpool(x), 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.forward_features(x))


@register_model("resnet18_cifar")
def resnet18_cifar(num_classes: int = 10, in_channels: int = 1, width: int = 16) -> ResNet:
    """ResNet-18, CIFAR stem (3x3 stride 1, no max-pool); the demo backbone, default width 16."""
    return ResNet(BasicBlock, (2, 2, 2, 2), num_classes, in_channels, width, stem="cifar")


@register_model("resnet18")
def resnet18(num_classes: int = 1000, in_channels: int = 3, width: int = 64) -> ResNet:
    """ResNet-18, ImageNet layout; names match torchvision (loads its checkpoints)."""
    return ResNet(BasicBlock, (2, 2, 2, 2), num_classes, in_channels, width, stem="imagenet")


@register_model("resnet50")
def resnet50(num_classes: int = 1000, in_channels: int = 3, width: int = 64) -> ResNet:
    """ResNet-50 (v1.5), ImageNet layout; names match torchvision (loads its checkpoints)."""
    return ResNet(Bottleneck, (3, 4, 6, 3), num_classes, in_channels, width, stem="imagenet")
