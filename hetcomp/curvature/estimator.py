"""Per-sample input loss curvature (Garg et al. 2024; Sharma et al., "Input loss curvature as a predictor
of sample vulnerability to hardware noise", Eq. 1).

curv(x) = 1/n sum_i || grad_x( L(x + h v_i, y) - L(x, y) ) ||_2, v_i Rademacher. The finite difference of
input gradients is h H_x v_i + O(h^2), so curv(x) ~ h E||H_x v||, with H_x the Hessian of the loss
w.r.t. the input. As in the reference code, the same probes also give a Hutchinson estimate of
Tr(H_x): 1/n sum_i v_i . (grad difference) / h.

Batched: samples are independent in eval mode, so one backward of the *summed* loss w.r.t. the input
batch gives every sample's input gradient exactly (no 1/B scaling); one backward per probe per batch.
Probes are drawn by ``hetcomp.analysis.hessian.rademacher``, the helper the weight-Hessian estimators use.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn

from hetcomp import checks
from hetcomp.analysis.hessian import rademacher
from hetcomp.data import tensor_pair
from hetcomp.errors import ConfigError
from hetcomp.progress import progress


@dataclass
class InputCurvature:
    curvature: torch.Tensor  # [N]: Eq. 1
    trace: torch.Tensor  # [N]: Hutchinson estimate of Tr(H_x) from the same probes
    labels: torch.Tensor  # [N]: the labels the loss used (given, or predicted)


def _per_sample_loss(loss_fn: Callable | None) -> Callable:
    if loss_fn is None:
        return lambda logits, labels: nn.functional.cross_entropy(logits, labels, reduction="none")
    return loss_fn


def input_curvature(model: nn.Module, data: Any, h: float = 1e-3, n: int = 10, seed: int = 0,
                    loss_fn: Callable | None = None, labels: str = "given") -> InputCurvature:
    """Curvature of every sample in ``data`` (DataLoader of (inputs, labels), or one tensor pair).

    ``labels="given"`` uses the data's labels (the paper's definition). ``labels="predicted"`` uses the
    model's own prediction instead, which needs no label (a risk score usable at inference).
    ``loss_fn(logits, labels)`` must return one loss per sample (default: cross-entropy, reduction none).
    Probes come from a CPU generator seeded with ``seed``: the same on every device.
    """
    h = checks.real("h (finite-difference step)", h, 0.0, exclusive=True)
    n = checks.integer("n (probes)", n)
    seed = checks.seed(seed)
    checks.callable_or_none("loss_fn", loss_fn, "a function (logits, labels) -> one loss per sample")
    if labels not in ("given", "predicted"):
        raise ConfigError(f"labels must be 'given' or 'predicted', got {labels!r}")
    per_sample = _per_sample_loss(loss_fn)
    device = next(model.parameters()).device
    generator = torch.Generator().manual_seed(seed)
    pair = tensor_pair(data)
    batches = [pair] if pair is not None else data
    was_training = model.training
    model.eval()
    curvatures, traces, used_labels = [], [], []
    for inputs, targets in progress(batches, desc="input curvature"):
        inputs, targets = inputs.to(device), targets.to(device)
        if labels == "predicted":
            with torch.no_grad():
                targets = model(inputs).argmax(-1)
        base_gradient = _input_gradient(model, per_sample, inputs, targets)
        norm_sum = torch.zeros(len(inputs), device=device, dtype=inputs.dtype)
        trace_sum = torch.zeros(len(inputs), device=device, dtype=inputs.dtype)
        for _ in range(n):
            probe = rademacher(inputs.shape, inputs, generator)
            difference = _input_gradient(model, per_sample, inputs + h * probe, targets) - base_gradient
            norm_sum += difference.flatten(1).norm(dim=1)
            trace_sum += (probe * difference).flatten(1).sum(1) / h
        curvatures.append((norm_sum / n).cpu())
        traces.append((trace_sum / n).cpu())
        used_labels.append(targets.cpu())
    model.train(was_training)
    if not curvatures:
        raise ConfigError("input_curvature: data yielded no batch")
    return InputCurvature(torch.cat(curvatures), torch.cat(traces), torch.cat(used_labels))


def _input_gradient(model: nn.Module, per_sample: Callable, inputs: torch.Tensor,
                    targets: torch.Tensor) -> torch.Tensor:
    inputs = inputs.detach().requires_grad_(True)
    with torch.enable_grad():
        losses = per_sample(model(inputs), targets)
        (gradient,) = torch.autograd.grad(losses.sum(), inputs)
    return gradient
