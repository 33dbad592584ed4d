"""A small CNN on scikit-learn's digits, deep enough (6 mappable layers, one depthwise) for a real split.

``build()`` is what ``hetcomp compile examples/digits_cnn.py:build`` calls: it returns the trained
model and its data (train loader for calibration, test loader for evaluation).
"""

from __future__ import annotations

import torch
import torch.nn as nn

from hetcomp.datasets import digits
from hetcomp.training import trained


class DigitsCNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 16, 3, padding=1)
        self.conv2 = nn.Conv2d(16, 32, 3, padding=1)
        self.conv3 = nn.Conv2d(32, 32, 3, padding=1, groups=32)  # depthwise
        self.conv4 = nn.Conv2d(32, 64, 1)
        self.fc1 = nn.Linear(64 * 2 * 2, 64)
        self.fc2 = nn.Linear(64, 10)
        self.pool = nn.MaxPool2d(2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.conv1(x))
        x = self.pool(torch.relu(self.conv2(x)))  # 8x8 -> 4x4
        x = torch.relu(self.conv3(x))
        x = self.pool(torch.relu(self.conv4(x)))  # 4x4 -> 2x2
        x = torch.relu(self.fc1(x.flatten(1)))
        return self.fc2(x)


def build(seed: int = 0, epochs: int = 30):
    """Trained DigitsCNN plus data: returns (model, {"train": loader, "val": loader, "test": loader})."""
    splits = digits(seed=seed)
    torch.manual_seed(seed)
    model = trained(DigitsCNN(), splits.loader("train", seed=seed), epochs=epochs, seed=seed)
    loaders = {name: splits.loader(name, batch_size=128, shuffle=False) for name in ("train", "val", "test")}
    return model, loaders
