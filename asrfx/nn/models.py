"""The paper's CIFAR ResNets (plain backbones for asrfx.insert).

The architecture of the official ASR code's CIFAR ResNet (itself the widely used CIFAR
port of fb.resnet.torch): a 3x3 stem with 16 channels, three stages of 16, 32 and 64
planes (strides 1, 2, 2; bottlenecks expand 4x), global average pooling and a linear
classifier. Depth 6n + 2 with basic blocks (ResNet-56: n = 9, ResNet-110: n = 18), 9n + 2
with bottlenecks (ResNet-83: n = 9, ResNet-164: n = 18). The paper inserts ASR after the
last BatchNorm of each block, before the residual add: ``asrfx.insert``'s default.
"""

from __future__ import annotations

import math

import torch
from torch import nn

__all__ = ["CifarResNet", "cifar_resnet", "resnet56", "resnet110", "resnet83", "resnet164"]


class _Basic(nn.Module):
    expansion = 1

    def __init__(self, inplanes: int, planes: int, stride: int, downsample: nn.Module | None):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x):
        out = self.bn2(self.conv2(self.relu(self.bn1(self.conv1(x)))))
        shortcut = x if self.downsample is None else self.downsample(x)
        return self.relu(out + shortcut)


class _Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int, downsample: nn.Module | None):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, planes * 4, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * 4)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x):
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        shortcut = x if self.downsample is None else self.downsample(x)
        return self.relu(out + shortcut)


class CifarResNet(nn.Module):
    """ResNet for 32x32 inputs: depth 6n+2 (basic blocks) or 9n+2 (bottlenecks)."""

    def __init__(self, depth: int, block: str = "bottleneck", num_classes: int = 100):
        super().__init__()
        if block == "basic":
            if (depth - 2) % 6:
                raise ValueError(f"a basic-block CIFAR ResNet has depth 6n+2 (56, 110, ...), got {depth}")
            kind, n = _Basic, (depth - 2) // 6
        elif block == "bottleneck":
            if (depth - 2) % 9:
                raise ValueError(f"a bottleneck CIFAR ResNet has depth 9n+2 (83, 164, ...), got {depth}")
            kind, n = _Bottleneck, (depth - 2) // 9
        else:
            raise ValueError(f"block must be 'basic' or 'bottleneck', got {block!r}")
        self.inplanes = 16
        self.conv1 = nn.Conv2d(3, 16, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.relu = nn.ReLU(inplace=True)
        self.layer1 = self._stage(kind, 16, n, 1)
        self.layer2 = self._stage(kind, 32, n, 2)
        self.layer3 = self._stage(kind, 64, n, 2)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(64 * kind.expansion, num_classes)
        for m in self.modules():  # He initialisation, BatchNorm at identity
            if isinstance(m, nn.Conv2d):
                fan_out = m.kernel_size[0] * m.kernel_size[1] * m.out_channels
                nn.init.normal_(m.weight, 0.0, math.sqrt(2.0 / fan_out))
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def _stage(self, kind, planes: int, blocks: int, stride: int) -> nn.Sequential:
        downsample = None
        if stride != 1 or self.inplanes != planes * kind.expansion:
            downsample = nn.Sequential(nn.Conv2d(self.inplanes, planes * kind.expansion, 1, stride, bias=False),
                                       nn.BatchNorm2d(planes * kind.expansion))
        layers = [kind(self.inplanes, planes, stride, downsample)]
        self.inplanes = planes * kind.expansion
        layers += [kind(self.inplanes, planes, 1, None) for _ in range(blocks - 1)]
        return nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def cifar_resnet(depth: int, block: str = "bottleneck", num_classes: int = 100) -> CifarResNet:
    return CifarResNet(depth, block, num_classes)


def resnet56(num_classes: int = 100) -> CifarResNet:
    return CifarResNet(56, "basic", num_classes)


def resnet110(num_classes: int = 100) -> CifarResNet:
    return CifarResNet(110, "basic", num_classes)


def resnet83(num_classes: int = 100) -> CifarResNet:
    return CifarResNet(83, "bottleneck", num_classes)


def resnet164(num_classes: int = 100) -> CifarResNet:
    return CifarResNet(164, "bottleneck", num_classes)
