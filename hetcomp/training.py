"""Plain supervised training with a weights cache (used by examples, demo and tests).

The cache (``build/weights/<class>-<key>.pt``) is written with hetcomp.storage.write_atomic; a cache file
that cannot be loaded (truncated, or another model's) is retrained and rewritten, never trusted.
"""

from __future__ import annotations

import inspect
import io
import pickle
from pathlib import Path

import torch
import torch.nn as nn
from torch.utils.data import DataLoader

from hetcomp.progress import progress
from hetcomp.storage import sha256_bytes, write_atomic


def train(model: nn.Module, loader: DataLoader, epochs: int, lr: float = 1e-2, seed: int = 0,
          desc: str = "train") -> nn.Module:
    torch.manual_seed(seed)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=epochs)
    device = next(model.parameters()).device
    model.train()
    for _ in progress(range(epochs), desc=desc, total=epochs):
        for inputs, labels in loader:
            optimizer.zero_grad()
            loss = nn.functional.cross_entropy(model(inputs.to(device)), labels.to(device))
            loss.backward()
            optimizer.step()
        scheduler.step()
    model.eval()
    return model


def trained(model: nn.Module, loader: DataLoader, epochs: int, cache_dir: str | Path = "build/weights",
            lr: float = 1e-2, seed: int = 0) -> nn.Module:
    """Train ``model`` once and cache its weights, keyed by its class source, epochs, lr and seed.

    The cache is a plain state dict loaded with ``weights_only=True`` (no arbitrary unpickling).
    """
    source = inspect.getsource(type(model))
    key = sha256_bytes(f"{source}|{epochs}|{lr}|{seed}".encode())[:12]
    path = Path(cache_dir) / f"{type(model).__name__}-{key}.pt"
    if path.exists():
        initial = {k: v.clone() for k, v in model.state_dict().items()}
        try:
            model.load_state_dict(torch.load(path, weights_only=True, map_location="cpu"))
            return model.eval()
        except (OSError, EOFError, RuntimeError, ValueError, pickle.UnpicklingError):
            model.load_state_dict(initial)  # a damaged cache entry: retrain from the initial weights, rewrite it
    train(model, loader, epochs, lr=lr, seed=seed, desc=f"train {type(model).__name__}")
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    write_atomic(path, buffer.getvalue())
    return model
