"""The input-curvature study in one call (used by ``hetcomp curvature`` and the demo): per-sample
curvature, analog-only failure rate by curvature decile for all 8 non-ideality profiles, and the
risk-gated routing curve on the full profile, with plots."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch.nn as nn

from hetcomp.curvature.estimator import InputCurvature, input_curvature
from hetcomp.curvature.failures import FailureAnalysis, failure_by_decile
from hetcomp.curvature.routing import RoutingCurve, routing_curve


@dataclass
class VulnerabilityStudy:
    curvature: InputCurvature
    failures: FailureAnalysis
    routing: RoutingCurve
    label_curvature_auroc: float  # the paper's curvature (needs labels) as a failure predictor
    plots: list[Path]

    def report(self) -> str:
        return "\n".join([
            "analog-only failure rate by input-curvature decile (D1 flattest, D10 most curved):",
            self.failures.table(), "",
            "risk-gated routing on the full ADC+WNoise+PCM profile: accuracy vs inputs re-run digitally",
            self.routing.key_points(),
            f"(for reference, curvature at the true label, which inference cannot compute: AUROC "
            f"{self.label_curvature_auroc:.3f})",
        ])


def vulnerability_study(model: nn.Module, data: Any, repeats: int = 3, h: float = 1e-3, n: int = 10,
                        seed: int = 0, t_inference: float = 86400.0, out: str | Path | None = None,
                        title: str = "") -> VulnerabilityStudy:
    from sklearn.metrics import roc_auc_score

    from hetcomp.curvature import plots

    curvature = input_curvature(model, data, h=h, n=n, seed=seed)
    predicted = input_curvature(model, data, h=h, n=n, seed=seed, labels="predicted")
    failures = failure_by_decile(model, data, curvature.curvature, repeats=repeats, t_inference=t_inference,
                                 seed=seed)
    curve = routing_curve(failures.full_logits, failures.digital_logits, failures.labels,
                          {"curvature@pred": predicted.curvature})
    digital_correct = (failures.digital_logits.argmax(-1) == failures.labels).numpy()
    analog_correct = (failures.full_logits.argmax(-1) == failures.labels[None]).numpy()
    failed = (digital_correct[None] & ~analog_correct).ravel()
    scores = np.broadcast_to(curvature.curvature.numpy(), analog_correct.shape).ravel()
    label_auroc = float(roc_auc_score(failed, scores)) if 0 < failed.sum() < failed.size else float("nan")
    written = []
    if out is not None:
        out = Path(out)
        written = [plots.failure_by_decile(failures, out / "failure_by_decile.png",
                                           f"{title}analog-only failures by input-curvature decile"),
                   plots.routing_curve(curve, out / "routing.png",
                                       f"{title}risk-gated routing to digital (ADC+WNoise+PCM)")]
    return VulnerabilityStudy(curvature, failures, curve, label_auroc, written)
