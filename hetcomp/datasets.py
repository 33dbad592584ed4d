"""Small data sets that ship with packages (no downloads): scikit-learn's 8x8 digits."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.utils.data import DataLoader, TensorDataset


@dataclass
class Splits:
    train: TensorDataset
    val: TensorDataset
    test: TensorDataset

    def loader(self, split: str, batch_size: int = 64, shuffle: bool | None = None, seed: int = 0) -> DataLoader:
        dataset = getattr(self, split)
        shuffle = (split == "train") if shuffle is None else shuffle
        generator = torch.Generator().manual_seed(seed)
        return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, generator=generator)


def digits(seed: int = 0, val_fraction: float = 0.15, test_fraction: float = 0.2) -> Splits:
    """scikit-learn's bundled digits (1797 images, 8x8, 10 classes) as [N, 1, 8, 8] floats in [0, 1].

    A seeded, fixed split: train / validation (for early stopping) / held-out test.
    """
    from sklearn.datasets import load_digits

    bunch = load_digits()
    images = torch.tensor(bunch.images, dtype=torch.float32).unsqueeze(1) / 16.0
    labels = torch.tensor(bunch.target, dtype=torch.long)
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed))
    n_test = int(len(labels) * test_fraction)
    n_val = int(len(labels) * val_fraction)
    test, val, train = order[:n_test], order[n_test : n_test + n_val], order[n_test + n_val :]
    return Splits(
        train=TensorDataset(images[train], labels[train]),
        val=TensorDataset(images[val], labels[val]),
        test=TensorDataset(images[test], labels[test]),
    )


def accuracy(model: torch.nn.Module, loader: DataLoader) -> float:
    """Top-1 accuracy of ``model`` on ``loader`` (eval mode, on the model's device)."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    correct = total = 0
    with torch.no_grad():
        for inputs, labels in loader:
            predictions = model(inputs.to(device)).argmax(-1)
            correct += int((predictions == labels.to(device)).sum())
            total += len(labels)
    model.train(was_training)
    return correct / max(total, 1)
