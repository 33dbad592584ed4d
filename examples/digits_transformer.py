"""A small transformer on scikit-learn's digits (each 8x8 image row a token), for the multi-tier tiers.

``build()`` is what ``hetcomp compile examples/digits_transformer.py:build -t sram+reram+photonic`` calls:
the trained model and its data (train / val / test loaders).
"""

from __future__ import annotations

import torch

from hetcomp.datasets import digits
from hetcomp.training import trained
from hetcomp.zoo import DigitsTransformer


def build(seed: int = 0, epochs: int = 40):
    splits = digits(seed=seed)
    torch.manual_seed(seed)
    model = trained(DigitsTransformer(), splits.loader("train", seed=seed), epochs=epochs, lr=3e-3, seed=seed)
    loaders = {name: splits.loader(name, batch_size=128, shuffle=False) for name in ("train", "val", "test")}
    return model, loaders
