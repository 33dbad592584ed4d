"""The manifest's summary: derived from the layer records and the targets, recomputed whenever a manifest is
made or read (never trusted from a file).

Cost workload: one sample, i.e. one forward pass of the traced example input divided by its batch size
(``LayerInfo.macs`` are per sample). Latency follows H3PIMAP Eq. 2 (``MappingProblem.evaluate``): layers run
in sequence, the tiers of a row-split layer in parallel. Per target: ``busy_s`` is the time the target
computes, ``energy_j`` its dynamic plus static energy while busy. Scale both by the number of samples for a
larger workload (both are linear in it).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from hetcomp.graph.layers import LayerInfo
from hetcomp.manifest import assigned_rows, mac_summary
from hetcomp.partition.mapping_cost import MappingProblem
from hetcomp.targets.base import Target

WORKLOAD = "one sample (one forward pass of the traced example input, per sample)"


def mapping_summary(layers: list[dict[str, Any]], targets: Sequence[Target]) -> dict[str, Any]:
    """MAC ratio, layer counts and the estimated latency/energy of this mapping, total and per target."""
    targets = list(targets)
    summary = mac_summary(layers, [t.name for t in targets])
    unmodeled = [t.name for t in targets if not t.cost.modeled]
    if unmodeled:
        summary["cost"] = {"workload": WORKLOAD, "modeled": False,
                           "reason": f"target(s) {unmodeled} have no cost model"}
        return summary
    infos = [LayerInfo(name=layer["name"], kind=layer["kind"], op=layer["op"], weight_shape=tuple(layer["shape"]),
                       rows=layer["rows"], params=layer["params"], macs=layer["macs"], node_name=layer["name"],
                       groups=layer.get("groups", 1))
             for layer in layers]
    problem = MappingProblem.build(infos, targets, samples=1.0, require_costs=True)
    counts = np.zeros((len(layers), len(targets)))
    for index, layer in enumerate(layers):
        for target, rows in assigned_rows(layer).items():
            counts[index, problem.names.index(target)] = rows
    cost = problem.evaluate(counts)
    per_target = {}
    for column, target in enumerate(targets):
        macs = float(sum(layer["macs"] * counts[i, column] / layer["rows"] for i, layer in enumerate(layers)))
        per_target[target.name] = {"macs": macs, "busy_s": float(target.cost.latency_s(macs)),
                                   "energy_j": float(target.cost.energy_j(macs))}
    summary["cost"] = {"workload": WORKLOAD, "modeled": True, "latency_s": float(cost.latency_s[0]),
                       "energy_j": float(cost.energy_j[0]), "per_target": per_target}
    return summary
