"""ResNet-20 for 32x32 inputs (He et al. 2016, CIFAR variant): 19 convs + 1 linear (+2 1x1 shortcuts)."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


class BasicBlock(nn.Module):
    def __init__(self, inputs: int, outputs: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(inputs, outputs, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(outputs)
        self.conv2 = nn.Conv2d(outputs, outputs, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(outputs)
        self.shortcut = nn.Sequential()
        if stride != 1 or inputs != outputs:
            self.shortcut = nn.Sequential(nn.Conv2d(inputs, outputs, 1, stride, bias=False), nn.BatchNorm2d(outputs))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class ResNet20(nn.Module):
    def __init__(self, classes: int = 10, in_channels: int = 3) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, 16, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        layers, width = [], 16
        for outputs, stride in ((16, 1), (32, 2), (64, 2)):
            for block in range(3):
                layers.append(BasicBlock(width, outputs, stride if block == 0 else 1))
                width = outputs
        self.layers = nn.Sequential(*layers)
        self.fc = nn.Linear(64, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.layers(out)
        return self.fc(F.adaptive_avg_pool2d(out, 1).flatten(1))


def digits_as_cifar(seed: int = 0):
    """Digits upsampled to 3x32x32: CIFAR-shaped inputs from data that ships with scikit-learn."""
    from torch.utils.data import TensorDataset

    from hetcomp.datasets import digits

    splits = digits(seed=seed)

    def widen(dataset: TensorDataset) -> TensorDataset:
        images, labels = dataset.tensors
        images = F.interpolate(images, size=32, mode="bilinear", align_corners=False).repeat(1, 3, 1, 1)
        return TensorDataset(images, labels)

    splits.train, splits.val, splits.test = widen(splits.train), widen(splits.val), widen(splits.test)
    return splits
