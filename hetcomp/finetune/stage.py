"""One fine-tuning stage: lower a set of layers, train with noise injection, keep the validation-best.

Shared by LAFT (one stage per added layer) and the ``mac-greedy`` search (one stage per candidate).
The stage starts from the digital graph's weights, lowers ``analog_layers`` (aihwkit applies the
training-noise modifier to analog weights in train mode), trains with AnalogSGD (separate learning
rates for analog and digital parameters), validates after every epoch in eval mode (read/ADC noise,
no drift), and stops after ``patience`` epochs without gain. The pre-training validation score is
the initial best, so a stage never returns weights worse on validation than those it started from.
"""

from __future__ import annotations

import copy
import hashlib
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx

from hetcomp.errors import ConfigError
from hetcomp.evaluate import accuracy_labels, batched_logits, evaluate
from hetcomp.finetune.data import TrainingData
from hetcomp.lower import Simulator, digital_state_dict, lower_graph, lowered_modules
from hetcomp.progress import bar
from hetcomp.targets.base import TargetSet


def derive_seed(seed: int, *keys: Any) -> int:
    """A seed for a sub-step (stage, epoch, ...) that depends only on ``seed`` and the keys."""
    digest = hashlib.sha256(repr((seed, *keys)).encode()).digest()
    return int.from_bytes(digest[:8], "little") % (2**63)


@dataclass
class StageSettings:
    epochs: int
    patience: int
    lr_analog: float
    lr_digital: float
    momentum: float
    lr_decay: bool
    val_repeats: int
    val_t_inference: float | None  # None: read/ADC noise only; else programmed and drifted to this time


@dataclass
class StageResult:
    layers: list[str]
    start_val: float
    best_val: float
    best_epoch: int  # 0: no epoch beat the starting weights
    epochs: int
    history: list[float]
    seconds: float
    state: dict[str, torch.Tensor] = field(repr=False, default_factory=dict)

    def record(self) -> dict[str, Any]:
        return {"layers": self.layers, "start_val": self.start_val, "best_val": self.best_val,
                "best_epoch": self.best_epoch, "epochs": self.epochs, "history": self.history,
                "seconds": round(self.seconds, 3)}


def validation_accuracy(module: torch.nn.Module, val: tuple[torch.Tensor, torch.Tensor], repeats: int,
                        seed: int, t_inference: float | None = None, report: dict | None = None,
                        batch_size: int = 256) -> float:
    """Mean top-1 accuracy over ``repeats`` noisy passes, seeded.

    ``t_inference=None``: eval-mode forward noise only (read noise, ADC). Otherwise each repeat programs
    and drifts a copy of the module (drift overwrites tile weights, so the trained module is untouched).
    """
    if t_inference is not None and report is not None and lowered_modules(report):
        return evaluate(copy.deepcopy(module), report, val, repeats=repeats, t_inference=t_inference,
                        seed=seed, batch_size=batch_size).mean
    device = next(module.parameters()).device
    was_training = module.training
    module.eval()
    inputs, labels = val[0].to(device), val[1].to(device)
    correct = 0
    with torch.no_grad(), torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        for repeat in range(repeats):
            logits = batched_logits(module, inputs, batch_size)
            if repeat == 0:
                accuracy_labels(logits, labels, "validation data")
            correct += int((logits.argmax(-1) == labels).sum())
    module.train(was_training)
    return correct / (len(labels) * repeats)


def train_stage(gm: fx.GraphModule, targets: TargetSet, analog_layers: Sequence[str], data: TrainingData,
                settings: StageSettings, loss_fn: Callable, seed: int, desc: str) -> StageResult:
    """Fine-tune ``gm`` with ``analog_layers`` lowered; returns the validation-best digital state. The optimizer
    is the lowered layers' simulator's (aihwkit: AnalogSGD; one simulator per stage: LAFT checks it)."""
    start = time.perf_counter()
    lowered, report = lower_graph(gm, targets, layers=analog_layers)
    device = next(lowered.parameters()).device
    analog_prefixes = tuple(name + "." for name in lowered_modules(report))
    analog_params, digital_params = [], []
    for name, parameter in lowered.named_parameters():
        (analog_params if name.startswith(analog_prefixes) else digital_params).append(parameter)
    groups = [{"params": analog_params, "lr": settings.lr_analog}]
    if digital_params:
        groups.append({"params": digital_params, "lr": settings.lr_digital})
    simulators = {type(simulator): simulator for simulator in lowered_modules(report).values()}
    if len(simulators) > 1:
        names = sorted(each.name for each in simulators.values())
        raise ConfigError(f"one fine-tuning stage trains layers of several simulators ({names}); fine-tune one "
                          "device's layers at a time")
    simulator = next(iter(simulators.values()), Simulator())
    optimizer = simulator.optimizer(groups, lr=settings.lr_analog, momentum=settings.momentum)
    scheduler = (torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=settings.epochs)
                 if settings.lr_decay else None)
    val_seed = derive_seed(seed, "validation")
    best_val = start_val = validation_accuracy(lowered, data.val, settings.val_repeats, val_seed,
                                                   settings.val_t_inference, report)
    best_state = digital_state_dict(lowered, report)
    best_epoch, since_best, history = 0, 0, []
    progress_bar = bar(settings.epochs, desc)
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(derive_seed(seed, "noise"))
        for epoch in range(1, settings.epochs + 1):
            lowered.train()
            for inputs, labels in data.batches(derive_seed(seed, "epoch", epoch)):
                optimizer.zero_grad()
                loss = loss_fn(lowered(inputs.to(device)), labels.to(device))
                loss.backward()
                optimizer.step()
            if scheduler is not None:
                scheduler.step()
            val = validation_accuracy(lowered, data.val, settings.val_repeats, val_seed, settings.val_t_inference,
                                      report)
            history.append(val)
            progress_bar.update(1)
            progress_bar.set_postfix(val=f"{val:.4f}", best=f"{max(best_val, val):.4f}")
            if val > best_val:
                best_val, best_epoch, since_best = val, epoch, 0
                best_state = digital_state_dict(lowered, report)
            else:
                since_best += 1
                if since_best >= settings.patience:
                    break
    progress_bar.close()
    return StageResult(list(analog_layers), start_val, best_val, best_epoch, len(history), history,
                       time.perf_counter() - start, best_state)
