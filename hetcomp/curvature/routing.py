"""Risk-gated routing: the analog model answers; inputs whose risk exceeds a threshold are re-run on the
digital path (the hybrid analog/digital routing Sharma et al. propose for high-curvature inputs).

Input curvature needs the label, which inference does not have, so routing needs a label-free risk.
Scores (higher = riskier):

- ``margin``: minus the analog top-1/top-2 softmax margin. Free: computed from the analog output.
- ``entropy``: the analog softmax entropy. Free.
- ``curvature@pred``: input curvature at the *digital* model's predicted label. Not free: it needs
  n + 1 digital forward/backward passes per input, more than just running the digital model, so it
  is an analysis reference (how much curvature knows) rather than a deployable router.

Cost model of routing (per input): every input pays one analog inference plus the score (free for
margin/entropy); a routed input also pays one digital inference. With a fraction f routed, the
expected cost is E_analog + f * E_digital (+ the transfer of routed inputs to the digital unit), and
accuracy moves from the analog model's (f = 0) to the digital model's (f = 1). Random routing of the
same fraction is the baseline a score must beat: its expected accuracy is
(1 - f) * acc_analog + f * acc_digital.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn

from hetcomp.errors import ConfigError

SCORES = ("margin", "entropy")


def risk(logits: torch.Tensor, score: str = "margin") -> torch.Tensor:
    """Label-free risk of each prediction from its logits (higher = more likely to be wrong)."""
    probabilities = logits.float().softmax(-1)
    if score == "margin":
        top = probabilities.topk(2, dim=-1).values
        return -(top[..., 0] - top[..., 1])
    if score == "entropy":
        return -(probabilities * probabilities.clamp_min(1e-12).log()).sum(-1)
    raise ConfigError(f"unknown risk score {score!r}; known: {SCORES}")


class RiskRouted(nn.Module):
    """Runs ``analog``; re-runs inputs whose risk is at least ``threshold`` on ``digital``.

    ``threshold=inf`` routes nothing (the analog model), ``-inf`` routes everything (the digital
    answers). ``calibrate(inputs, fraction)`` sets the threshold so that ``fraction`` of those inputs
    would be routed. ``last_routed`` holds the mask of the last forward.
    """

    def __init__(self, analog: nn.Module, digital: nn.Module, score: str = "margin",
                 threshold: float = float("inf")) -> None:
        super().__init__()
        if score not in SCORES:
            raise ConfigError(f"unknown risk score {score!r}; known: {SCORES}")
        self.analog, self.digital, self.score, self.threshold = analog, digital, score, threshold
        self.last_routed: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        output = self.analog(x)
        routed = risk(output, self.score) >= self.threshold
        self.last_routed = routed
        if routed.any():
            output = output.clone()
            output[routed] = self.digital(x[routed]).to(output.dtype)
        return output

    @torch.no_grad()
    def calibrate(self, inputs: torch.Tensor, fraction: float) -> float:
        """Threshold routing ``fraction`` of ``inputs`` (a quantile of their analog risk); returns it."""
        if not 0 <= fraction <= 1:
            raise ConfigError(f"fraction must be in [0, 1], got {fraction}")
        scores = risk(self.analog(inputs), self.score)
        self.threshold = _threshold(scores, fraction)
        return self.threshold


def _threshold(scores: torch.Tensor, fraction: float) -> float:
    if fraction <= 0:
        return float("inf")
    if fraction >= 1:
        return float("-inf")
    ordered = scores.flatten().sort(descending=True).values
    count = int(round(fraction * len(ordered)))
    if count == 0:
        return float("inf")
    return float(ordered[count - 1])  # the count riskiest (and any tied with the last) are routed


@dataclass
class RoutingCurve:
    fractions: list[float]
    accuracy: dict[str, list[float]]  # score -> accuracy at each fraction (mean over repeats)
    random: list[float]  # expected accuracy of random routing at each fraction
    auroc: dict[str, float]  # score -> AUROC for predicting analog-only failure

    def key_points(self) -> str:
        names = list(self.accuracy)
        lines = [f"{'routed':>7s} " + " ".join(f"{n:>15s}" for n in names) + f" {'random':>8s}"]
        for index, fraction in enumerate(self.fractions):
            lines.append(f"{fraction:7.0%} " + " ".join(f"{self.accuracy[n][index]:15.4f}" for n in names)
                         + f" {self.random[index]:8.4f}")
        lines.append("AUROC for analog-only failure: " + ", ".join(f"{n} {v:.3f}" for n, v in self.auroc.items()))
        return "\n".join(lines)


def routing_curve(analog_logits: torch.Tensor, digital_logits: torch.Tensor, labels: torch.Tensor,
                  extra_scores: dict[str, torch.Tensor] | None = None,
                  fractions: tuple[float, ...] = (0.0, 0.02, 0.05, 0.1, 0.2, 0.3, 0.5, 1.0)) -> RoutingCurve:
    """Accuracy vs fraction routed to digital, per risk score, from recorded logits.

    ``analog_logits`` is [repeats, N, C] (independent programmings); margin and entropy are computed per
    repeat from them. ``extra_scores`` are fixed per-sample scores (e.g. ``curvature@pred``). Routing
    picks the riskiest ``fraction`` of the N inputs in each repeat.
    """
    from sklearn.metrics import roc_auc_score

    analog_correct = (analog_logits.argmax(-1) == labels[None]).numpy()
    digital_correct = (digital_logits.argmax(-1) == labels).numpy()
    repeats, count = analog_correct.shape
    scores = {name: risk(analog_logits, name).numpy() for name in SCORES}
    for name, values in (extra_scores or {}).items():
        scores[name] = np.broadcast_to(np.asarray(values, dtype=np.float64), (repeats, count))
    accuracy = {}
    for name, values in scores.items():
        curve = []
        for fraction in fractions:
            routed_count = int(round(fraction * count))
            correct = []
            for repeat in range(repeats):
                routed = np.zeros(count, dtype=bool)
                routed[np.argsort(-values[repeat], kind="stable")[:routed_count]] = True
                correct.append(np.where(routed, digital_correct, analog_correct[repeat]).mean())
            curve.append(float(np.mean(correct)))
        accuracy[name] = curve
    acc_analog, acc_digital = float(analog_correct.mean()), float(digital_correct.mean())
    random = [(1 - f) * acc_analog + f * acc_digital for f in fractions]
    failures = (digital_correct[None] & ~analog_correct).ravel()
    auroc = {name: float(roc_auc_score(failures, values.ravel())) if 0 < failures.sum() < failures.size
             else float("nan") for name, values in scores.items()}
    return RoutingCurve(list(fractions), accuracy, random, auroc)
