"""Latency and energy of row-to-tier mappings, for a whole population at once (H3PIMAP Eq. 2).

A mapping gives each layer l a row count per tier, ``counts[l, i]`` summing to the layer's rows R_l. A tier
running ``counts[l, i]`` rows does that fraction of the layer's MACs; the layer's latency is the slowest of
its tiers (they run in parallel), the model's latency the sum over layers (executed in sequence), the energy
the sum of everything. A tier holds ``counts[l, i] / R_l * weights_l`` weights of a weight-static layer; the
total over layers must fit its capacity. Dynamic products store no weights. A grouped convolution's counts
are whole groups (``unit`` rows, see partition.rows.row_unit); every mapping built here respects that.

The workload is one forward pass over the traced example input, times ``samples``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from hetcomp.errors import ConfigError
from hetcomp.graph.layers import LayerInfo
from hetcomp.partition.rows import row_unit
from hetcomp.targets.base import Target, TargetSet


@dataclass
class MappingCost:
    """Costs of P mappings: ``latency_s``/``energy_j`` shape (P,), per layer (P, L), ``usage`` (P, n) weights."""

    latency_s: np.ndarray
    energy_j: np.ndarray
    layer_latency_s: np.ndarray
    layer_energy_j: np.ndarray
    usage: np.ndarray


@dataclass
class MappingProblem:
    layers: list[LayerInfo]
    tiers: list[Target]
    rows: np.ndarray  # (L,)
    macs: np.ndarray  # (L,) workload MACs
    weights: np.ndarray  # (L,) stored weights (0 for dynamic products)
    allowed: np.ndarray  # (L, n) bool: tier i runs layer l's op kind
    capacity: np.ndarray  # (n,) weights; inf when unbounded
    seconds_per_mac: np.ndarray  # (n,)
    joules_per_mac: np.ndarray  # (n,) dynamic
    static_w: np.ndarray  # (n,)
    unit: np.ndarray | None = None  # (L,) rows that move together (a conv group); None: 1 for every layer

    @classmethod
    def build(cls, layers: Sequence[LayerInfo], targets: TargetSet | Sequence[Target], samples: float = 1.0,
              require_costs: bool = True) -> MappingProblem:
        """Errors (before any search): a tier without a cost model (unless ``require_costs=False``: then
        costs are NaN and only op support and capacity are usable), a layer no tier can run."""
        tiers = list(targets)
        unmodeled = [t.name for t in tiers if not t.cost.modeled]
        if unmodeled and require_costs:
            raise ConfigError(f"target(s) {unmodeled} have no cost model (CostModel.macs_per_second); the multi-tier "
                              "search needs latency and energy for every tier")
        layers = list(layers)
        allowed = np.array([[t.supports_kind(layer.kind) for t in tiers] for layer in layers], dtype=bool)
        orphans = [layer.name for layer, ok in zip(layers, allowed) if not ok.any()]
        if orphans:
            raise ConfigError(f"no target in {'+'.join(t.name for t in tiers)} runs layer(s) {orphans[:5]} "
                              f"({layers[[x.name for x in layers].index(orphans[0])].kind}); add a target that does, "
                              "e.g. photonic or digital for dynamic matmuls")
        capacity = np.array([np.inf if t.capacity_weights is None else float(t.capacity_weights) for t in tiers])
        return cls(
            layers=layers, tiers=tiers,
            rows=np.array([layer.rows for layer in layers], dtype=np.int64),
            macs=np.array([layer.macs for layer in layers], dtype=float) * samples,
            weights=np.array([layer.params if layer.kind == "weight-static" else 0 for layer in layers], dtype=float),
            allowed=allowed, capacity=capacity,
            seconds_per_mac=np.array([1.0 / t.cost.macs_per_second if t.cost.modeled else np.nan for t in tiers]),
            joules_per_mac=np.array([t.cost.energy_per_mac_pj * 1e-12 if t.cost.modeled else np.nan for t in tiers]),
            static_w=np.array([t.cost.static_power_w for t in tiers]),
            unit=np.array([row_unit(layer) for layer in layers], dtype=np.int64),
        )

    @property
    def names(self) -> list[str]:
        return [t.name for t in self.tiers]

    def __post_init__(self) -> None:
        if self.unit is None:
            self.unit = np.ones(len(self.rows), dtype=np.int64)
        # Everything is linear in the row counts: per (layer, tier) seconds and joules per row, weights per row.
        macs_per_row = self.macs / self.rows
        self._seconds_per_row = macs_per_row[:, None] * self.seconds_per_mac[None, :]
        self._joules_per_row = macs_per_row[:, None] * (self.joules_per_mac + self.seconds_per_mac * self.static_w)
        self._weights_per_row = self.weights / self.rows

    def evaluate(self, counts: np.ndarray) -> MappingCost:
        """``counts``: (P, L, n) or (L, n) rows per layer per tier."""
        counts = np.asarray(counts, dtype=float)
        if counts.ndim == 2:
            counts = counts[None]
        # Tier-major layout: numpy reduces over a leading axis of 3-5 tiers far faster than over a trailing one.
        by_tier = np.ascontiguousarray(counts.transpose(2, 0, 1))  # (n, P, L)
        layer_latency = np.maximum.reduce(by_tier * self._seconds_per_row.T[:, None, :], axis=0)  # tiers in parallel
        layer_energy = (by_tier * self._joules_per_row.T[:, None, :]).sum(axis=0)
        usage = (by_tier @ self._weights_per_row).T
        return MappingCost(layer_latency.sum(axis=1), layer_energy.sum(axis=1), layer_latency, layer_energy, usage)

    def capacity_violation(self, usage: np.ndarray) -> np.ndarray:
        """(P, n) weights over capacity (<= 0 when feasible), as pymoo's G."""
        finite = np.where(np.isfinite(self.capacity), self.capacity, 0.0)
        return np.where(np.isfinite(self.capacity), usage - finite, -1.0)

    def check_feasible(self) -> None:
        """Raise if no mapping fits: the weights that only bounded tiers can hold exceed their capacity."""
        unbounded = ~np.isfinite(self.capacity)
        needs_bounded = self.allowed.any(axis=1) & ~(self.allowed & unbounded).any(axis=1)
        demand = float(self.weights[needs_bounded].sum())
        supply = float(self.capacity[np.isfinite(self.capacity)].sum())
        if demand > supply:
            raise ConfigError(
                f"the model does not fit: {demand:,.0f} weights can only go to tiers holding {supply:,.0f} in all "
                f"({', '.join(f'{t.name}: {c:,.0f}' for t, c in zip(self.tiers, self.capacity) if np.isfinite(c))}); "
                "add a tier with unbounded capacity (photonic, digital) or more tiles")

    def single_tier(self, tier: str) -> np.ndarray:
        """Counts with every layer on ``tier``; layers it cannot run go to their most accurate allowed tier."""
        index = self.names.index(tier)
        counts = np.zeros((len(self.layers), len(self.tiers)), dtype=np.int64)
        for layer, ok in enumerate(self.allowed):
            target = index if ok[index] else int(np.flatnonzero(ok)[0])
            counts[layer, target] = self.rows[layer]
        return counts

    def equal_split(self) -> np.ndarray:
        """Counts with each layer's rows split as evenly as possible (in whole units) over the tiers that run it."""
        counts = np.zeros((len(self.layers), len(self.tiers)), dtype=np.int64)
        for layer, ok in enumerate(self.allowed):
            tiers = np.flatnonzero(ok)
            unit = int(self.unit[layer])
            base, extra = divmod(int(self.rows[layer]) // unit, len(tiers))
            counts[layer, tiers] = base * unit
            counts[layer, tiers[:extra]] += unit
        return counts


def lep_scores(latency: Sequence[float], energy: Sequence[float], error: Sequence[float]) -> np.ndarray:
    """H3PIMAP's Latency-Energy-Performance score: each metric min-max normalized over the compared
    strategies, then averaged (lower is better). ``error`` is the quality loss (e.g. 1 - accuracy, or
    perplexity): lower is better. Reproduces Table V's LEP column from its other columns."""
    columns = [np.asarray(c, dtype=float) for c in (latency, energy, error)]
    normalized = []
    for column in columns:
        span = column.max() - column.min()
        normalized.append(np.zeros_like(column) if span == 0 else (column - column.min()) / span)
    return np.mean(normalized, axis=0)
