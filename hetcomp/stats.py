"""Confidence intervals for accuracies over hardware repeats *and* over the test sample.

``compiled.evaluate`` gives one accuracy per hardware repeat; their spread is the hardware's. A claim such as
"strategy A beats strategy B" must also survive the test sample: with 359 test images one image is 0.28 points.
This module resamples both (a two-way bootstrap: repeats and samples drawn with replacement, independently):

- ``correctness(module, report, data, repeats)``: the [repeats, samples] matrix of per-sample correctness of a
  lowered model, with the repeats of ``hetcomp.evaluate.evaluate`` (same seeds: its row means are evaluate's
  accuracies): both run ``hetcomp.evaluate.RepeatRunner``, repeat-vectorized where the graph allows it, else one
  repeat at a time.
- ``bootstrap_accuracy(correct)``: the mean accuracy with a percentile interval over repeats and samples.
- ``bootstrap_difference(a, b)``: accuracy(a) - accuracy(b) on the same test samples, paired over samples (both
  use the same resampled samples) and, when both have the same number of repeats, over repeats: hetcomp seeds
  repeat r by (seed, r) (per layer: (seed, layer, r)), so repeat r of two strategies with the same seed shares
  the noise draws of the layers they both lower, and the pairs (a_r, b_r) are i.i.d. over r; resampling them
  jointly is valid whether or not they are correlated (independent repeats: ``paired_repeats=False``). A claim
  "a > b" is supported when this interval excludes 0 (``Interval.excludes_zero``).
- ``bootstrap_repeats(values)``: an interval over repeats alone (for an ``Evaluation.accuracies`` list).

Sample-paired differences are what separates strategies: two strategies fail mostly on the same hard images, so
their difference varies far less over test samples than either accuracy (the marginal intervals may overlap
while the paired difference is clearly nonzero; ``tests/test_stats.py`` constructs such a case).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from hetcomp import checks
from hetcomp.errors import DataError


@dataclass(frozen=True)
class Interval:
    """A point estimate with a percentile bootstrap interval at ``level``."""

    estimate: float
    low: float
    high: float
    level: float = 0.95
    draws: int = 0

    @property
    def excludes_zero(self) -> bool:
        return self.low > 0.0 or self.high < 0.0

    def disjoint(self, other: Interval) -> bool:
        """Whether the two intervals do not overlap."""
        return self.low > other.high or other.low > self.high

    def to_dict(self) -> dict[str, float]:
        return {"estimate": self.estimate, "low": self.low, "high": self.high, "level": self.level,
                "draws": self.draws}

    def format(self, scale: float = 1.0, digits: int = 4) -> str:
        return (f"{self.estimate * scale:.{digits}f} [{self.low * scale:.{digits}f}, "
                f"{self.high * scale:.{digits}f}]")

    def __str__(self) -> str:
        return self.format()


def _matrix(correct: Any) -> np.ndarray:
    matrix = np.asarray(correct.cpu() if isinstance(correct, torch.Tensor) else correct, dtype=np.float64)
    if matrix.ndim != 2 or matrix.size == 0:
        raise DataError(f"correctness must be a non-empty [repeats, samples] matrix, got shape {matrix.shape}")
    return matrix


def _weights(rng: np.random.Generator, draws: int, size: int) -> np.ndarray:
    """Bootstrap resampling as multiplicities: [draws, size] counts summing to ``size`` per draw."""
    return rng.multinomial(size, np.full(size, 1.0 / size), size=draws).astype(np.float64)


def _interval(estimate: float, values: np.ndarray, level: float, draws: int) -> Interval:
    tail = (1.0 - level) / 2.0
    low, high = np.quantile(values, [tail, 1.0 - tail])
    return Interval(float(estimate), float(low), float(high), level, draws)


def bootstrap_accuracy(correct: Any, draws: int = 2000, level: float = 0.95, seed: int = 0,
                       over_samples: bool = True, over_repeats: bool = True) -> Interval:
    """Mean accuracy of a [repeats, samples] correctness matrix with a two-way percentile bootstrap interval
    (repeats and samples resampled independently; either can be switched off to see its share)."""
    matrix = _matrix(correct)
    draws = checks.integer("draws", draws)
    level = checks.real("level", level, 0.0, True, 1.0, True)
    rng = np.random.default_rng(seed)
    repeats, samples = matrix.shape
    w = _weights(rng, draws, repeats) if over_repeats else np.ones((draws, repeats))
    v = _weights(rng, draws, samples) if over_samples else np.ones((draws, samples))
    values = np.einsum("dr,rn,dn->d", w, matrix, v) / (repeats * samples)
    return _interval(matrix.mean(), values, level, draws)


def bootstrap_difference(a: Any, b: Any, draws: int = 2000, level: float = 0.95, seed: int = 0,
                         paired_repeats: bool | None = None) -> Interval:
    """accuracy(a) - accuracy(b) for correctness matrices on the same samples (columns in the same order): the
    samples are resampled once for both (paired); the repeats jointly too when ``paired_repeats`` (None: when both
    have the same number of repeats, i.e. repeat r of both was seeded alike), else each one's independently."""
    ma, mb = _matrix(a), _matrix(b)
    if ma.shape[1] != mb.shape[1]:
        raise DataError(f"paired difference needs the same samples: {ma.shape[1]} vs {mb.shape[1]} columns")
    draws = checks.integer("draws", draws)
    level = checks.real("level", level, 0.0, True, 1.0, True)
    rng = np.random.default_rng(seed)
    samples = ma.shape[1]
    if paired_repeats is None:
        paired_repeats = ma.shape[0] == mb.shape[0]
    if paired_repeats and ma.shape[0] != mb.shape[0]:
        raise DataError(f"paired repeats need the same number of repeats: {ma.shape[0]} vs {mb.shape[0]}")
    v = _weights(rng, draws, samples)
    wa = _weights(rng, draws, ma.shape[0])
    wb = wa if paired_repeats else _weights(rng, draws, mb.shape[0])
    values = (np.einsum("dr,rn,dn->d", wa, ma, v) / (ma.shape[0] * samples)
              - np.einsum("dr,rn,dn->d", wb, mb, v) / (mb.shape[0] * samples))
    return _interval(ma.mean() - mb.mean(), values, level, draws)


def bootstrap_accuracies(matrices: list[Any], draws: int = 2000, seed: int = 0,
                         paired_repeats: bool | None = None) -> np.ndarray:
    """[draws, len(matrices)] bootstrap accuracies of several correctness matrices on the same samples: one sample
    resampling shared by all (paired), the repeats resampled jointly when ``paired_repeats`` (None: when all have
    the same number of repeats), else each matrix's independently. For an interval on any statistic of the
    accuracies (e.g. a rank correlation across layers)."""
    mats = [_matrix(m) for m in matrices]
    samples = mats[0].shape[1]
    if any(m.shape[1] != samples for m in mats):
        raise DataError("bootstrap_accuracies needs matrices on the same samples")
    draws = checks.integer("draws", draws)
    rng = np.random.default_rng(seed)
    v = _weights(rng, draws, samples)
    if paired_repeats is None:
        paired_repeats = len({m.shape[0] for m in mats}) == 1
    shared = _weights(rng, draws, mats[0].shape[0]) if paired_repeats else None
    return np.stack([np.einsum("dr,rn,dn->d", shared if paired_repeats else _weights(rng, draws, m.shape[0]), m, v)
                     / (m.shape[0] * samples) for m in mats], axis=1)


def bootstrap_repeats(values: Any, draws: int = 2000, level: float = 0.95, seed: int = 0) -> Interval:
    """Mean of per-repeat values (e.g. ``Evaluation.accuracies``) with an interval over repeats only: it says
    nothing about the test sample (use ``correctness`` + ``bootstrap_accuracy`` for that)."""
    array = np.asarray(values, dtype=np.float64).reshape(1, -1)
    draws = checks.integer("draws", draws)
    rng = np.random.default_rng(seed)
    w = _weights(rng, draws, array.shape[1])
    return _interval(array.mean(), (w @ array[0]) / array.shape[1], level, draws)


def spearman(x: Any, y: Any) -> tuple[float, float]:
    """Spearman's rank correlation and its two-sided p-value (scipy), NaN-free inputs."""
    from scipy.stats import spearmanr

    result = spearmanr(np.asarray(x, dtype=float), np.asarray(y, dtype=float))
    return float(result.statistic), float(result.pvalue)


# --------------------------------------------------------------------------------------------- correctness
def correctness(module: torch.nn.Module, report: dict[str, dict[str, Any]], data: Any, repeats: int = 20,
                t_inference: float = 86400.0, seed: int = 0, batch_size: int | None = None,
                exact_tiles: bool = False, fold_bytes: int | None = None) -> torch.Tensor:
    """[repeats, samples] bool: whether the lowered ``module`` classifies each sample of ``data`` correctly in each
    hardware repeat. The repeats are ``hetcomp.evaluate.evaluate``'s with the same ``seed``, ``batch_size`` and
    ``exact_tiles`` (both run ``hetcomp.evaluate.RepeatRunner``: vectorized where the graph folds repeats, in
    groups sized by ``fold_bytes``, else one repeat at a time on a copy), so the row means are its accuracies;
    ``module`` is not changed."""
    from hetcomp.evaluate import EvaluationData, RepeatRunner
    from hetcomp.metrics import ACCURACY

    repeats = checks.integer("repeats", repeats)
    batch_size = checks.integer("batch_size (None: 128 on CPU, 4096 on CUDA)", batch_size, optional=True)
    device = next(module.parameters()).device
    batch_size = batch_size if batch_size is not None else (4096 if device.type == "cuda" else 128)
    source = EvaluationData(data, device, batch_size, stage_bytes=1 << 30)
    runner = RepeatRunner(module, report, source, range(repeats), seed, t_inference, exact_tiles=exact_tiles,
                          fold_bytes=fold_bytes, check=ACCURACY.check)
    rows: dict[int, list[torch.Tensor]] = {repeat: [] for repeat in range(repeats)}
    for chunk in runner:
        labels = source.fmt.target(chunk.batch)
        for repeat, logits in chunk.per_repeat():
            rows[repeat].append((logits.argmax(-1) == labels).cpu())
    return torch.stack([torch.cat(rows[repeat]) for repeat in range(repeats)])
