"""Turn per-tier row counts into a row-split assignment: most sensitive rows to the most accurate tiers.

H3PIMAP §III-D: only the row *counts* per tier matter for latency and energy; which rows go where is
chosen by row sensitivity (Eq. 4), the most sensitive rows on the most accurate tier. Without a
``row_sensitivity`` metric rows are taken in index order.

A grouped convolution's rows move in whole groups (``row_unit``: a group's rows share its input channels,
so a tier computes whole groups): counts are multiples of the group size, and groups are ranked by their
summed row sensitivity.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from hetcomp.errors import ConfigError
from hetcomp.graph.layers import WEIGHT_STATIC, LayerAnnotation, LayerInfo
from hetcomp.targets.base import Target


def row_unit(layer: LayerInfo) -> int:
    """Rows that must stay on one tier together: a group of a grouped convolution (out_channels / groups;
    1 for a depthwise one), else 1."""
    return layer.rows // layer.groups if layer.kind == WEIGHT_STATIC and layer.groups > 1 else 1


def rows_by_sensitivity(annotation: LayerAnnotation) -> np.ndarray:
    """Row indices, most sensitive first (index order when the layer has no row sensitivity); a grouped
    convolution's groups stay together, ranked by their summed sensitivity, rows in order within a group."""
    sensitivity = annotation.metrics.get("row_sensitivity")
    rows, unit = annotation.layer.rows, row_unit(annotation.layer)
    if sensitivity is None or len(sensitivity) != rows:
        return np.arange(rows)
    scores = np.asarray(sensitivity, dtype=float).reshape(-1, unit).sum(axis=1)
    groups = np.argsort(-scores, kind="stable")
    return (groups[:, None] * unit + np.arange(unit)).ravel()


def apply_counts(annotation: LayerAnnotation, counts: Sequence[int], tiers: Sequence[Target], reason: str,
                 order: Sequence[str] | None = None) -> None:
    """Assign ``counts[i]`` rows of the layer to ``tiers[i]``; ``tiers`` in any order (sorted here by accuracy:
    ``accuracy_rank``, or ``order``, tier names most accurate first, e.g. row remap's measured order).

    A layer whose rows all land on one tier gets a plain target name; otherwise ``assignment`` is
    {tier: rows} and ``row_targets`` names each row's tier in row order.
    """
    counts = [int(c) for c in counts]
    if sum(counts) != annotation.layer.rows or min(counts) < 0:
        raise ConfigError(f"row counts {counts} for layer {annotation.layer.name!r} do not sum to its "
                          f"{annotation.layer.rows} rows")
    unit = row_unit(annotation.layer)
    if any(count % unit for count in counts):
        raise ConfigError(f"row counts {counts} for layer {annotation.layer.name!r} split its groups: a grouped "
                          f"convolution ({annotation.layer.groups} groups) moves in whole groups of {unit} rows")
    used = [(tier, count) for tier, count in zip(tiers, counts) if count > 0]
    annotation.reason = reason
    if len(used) == 1:
        annotation.assignment, annotation.row_targets = used[0][0].name, None
        return
    if order is not None:
        position = {name: index for index, name in enumerate(order)}
        used.sort(key=lambda pair: (position.get(pair[0].name, len(position)), pair[0].accuracy_rank, pair[0].name))
    else:
        used.sort(key=lambda pair: (pair[0].accuracy_rank, pair[0].name))
    order = rows_by_sensitivity(annotation)
    row_targets = [""] * annotation.layer.rows
    start = 0
    for tier, count in used:
        for row in order[start : start + count]:
            row_targets[int(row)] = tier.name
        start += count
    annotation.assignment = {tier.name: count for tier, count in used}
    annotation.row_targets = row_targets


def counts_of(annotation: LayerAnnotation, tiers: Sequence[Target]) -> list[int]:
    """The layer's current rows per tier (inverse of ``apply_counts``)."""
    assignment = annotation.assignment
    if isinstance(assignment, dict):
        return [int(assignment.get(t.name, 0)) for t in tiers]
    return [annotation.layer.rows if t.name == assignment else 0 for t in tiers]
