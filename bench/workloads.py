"""Models and data for bench/fig3.py and bench/claims.py (trained here, weights cached under build/weights/).

- ``digits``: examples/digits_cnn.py's CNN on scikit-learn's 8x8 digits (its fixed train/val/test split);
- ``resnet20``: examples/resnet20.py's ResNet-20 on digits-as-CIFAR (3x32x32, bilinear upsampling): the
  full-size workload, meant for a GPU;
- ``resnet20-8x8``: the same ResNet-20 with one input channel on the native 8x8 digits: a reduced workload that
  trains and evaluates on a small CPU (labelled as such in every result file).
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))

MODELS = ("digits", "resnet20", "resnet20-8x8")
LABELS = {"digits": "digits CNN (8x8 digits)", "resnet20": "ResNet-20 on digits-as-CIFAR (3x32x32)",
          "resnet20-8x8": "ResNet-20 (1 input channel) on native 8x8 digits [reduced CPU workload]"}


def images(name: str, inputs: torch.Tensor) -> torch.Tensor:
    """The model's input form of [N, 1, 8, 8] digits."""
    if name == "resnet20":
        return F.interpolate(inputs, size=32, mode="bilinear", align_corners=False).repeat(1, 3, 1, 1)
    return inputs


def new_model(name: str) -> torch.nn.Module:
    if name == "digits":
        from digits_cnn import DigitsCNN

        return DigitsCNN()
    from resnet20 import ResNet20

    return ResNet20(in_channels=3 if name == "resnet20" else 1)


def all_digits() -> tuple[torch.Tensor, torch.Tensor]:
    """scikit-learn's 1,797 digits as [N, 1, 8, 8] floats in [0, 1] and labels (hetcomp.datasets' scaling)."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    return torch.tensor(bunch.images, dtype=torch.float32).unsqueeze(1) / 16.0, torch.tensor(bunch.target)


def loader(x: torch.Tensor, y: torch.Tensor, batch_size: int = 128, shuffle: bool = False, seed: int = 0) -> DataLoader:
    return DataLoader(TensorDataset(x, y), batch_size=batch_size, shuffle=shuffle,
                      generator=torch.Generator().manual_seed(seed))


def train_model(name: str, x: torch.Tensor, y: torch.Tensor, epochs: int, device: torch.device, seed: int = 0,
                tag: str = "") -> torch.nn.Module:
    """A model trained on (x, y) (already in the model's input form), cached per workload, epochs, seed and tag
    (hetcomp.training.trained keys on the class source only, so each workload gets its own folder)."""
    from hetcomp.training import trained

    torch.manual_seed(seed)
    model = new_model(name).to(device)
    data = loader(x, y, batch_size=64, shuffle=True, seed=seed)
    cache = Path("build/weights") / f"bench-{name}{'-' + tag if tag else ''}"
    return trained(model, data, epochs=epochs, cache_dir=cache, seed=seed).eval()


def fixed_split(name: str, epochs: int, device: torch.device, seed: int = 0):
    """The model trained on hetcomp.datasets.digits' train split, with (train, val, test) loaders."""
    from hetcomp.datasets import digits

    splits = digits(seed=seed)
    parts = {}
    for split in ("train", "val", "test"):
        xs, ys = getattr(splits, split).tensors
        parts[split] = (images(name, xs), ys)
    if name == "digits":
        from digits_cnn import build

        model, _ = build(seed=seed)
        model = model.to(device)
    else:
        model = train_model(name, *parts["train"], epochs=epochs, device=device, seed=seed, tag="split")
    loaders = {split: loader(*parts[split], shuffle=False) for split in parts}
    return model, loaders


def write_results(folder: str | Path, name: str, lines: list[str]) -> Path:
    """Write a bench's result lines to ``folder/name`` (atomically) and print them; the path written."""
    from hetcomp.storage.files import write_atomic

    path = Path(folder) / name
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, "\n".join(lines) + "\n")
    print("\n".join(lines))
    return path
