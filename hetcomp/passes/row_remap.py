"""Partition, H3PIMAP stage 2 (RR, Algorithm 2): trade efficiency for accuracy, rows at a time.

1. Measure the accuracy of up to ``candidates`` points spread along the stage-1 Pareto front (lowered,
   ``repeats`` noisy repeats each) and start from the most accurate (§III-D).
2. While accuracy is more than ``tolerance`` below the digital model's: take the least accurate tier that
   still holds rows, and move the ``step`` most sensitive of its rows (``row_sensitivity``, Eq. 4, compared
   across layers: it is an expected loss increase) to the most accurate tier that runs the layer, has
   room for the row's weights, and is more accurate; re-measure. Stop when within tolerance, when no row
   can move, or after ``max_steps``. Rows of dynamic products have no weights and hence no sensitivity;
   they move after every weight row of their tier.

Within every layer the most sensitive rows sit on the most accurate tiers (``apply_counts``). The
trajectory (accuracy, latency, energy and the move of every step) goes to ``extra["row_remap"]``.
Accuracy is top-1 on ``val_data`` (default: the data given to compile).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.fx as fx

from hetcomp.errors import ConfigError
from hetcomp.evaluate import batched_logits, evaluate, staged
from hetcomp.graph.layers import mappable_nodes
from hetcomp.lower import lower_graph
from hetcomp.partition.rows import apply_counts, rows_by_sensitivity
from hetcomp.passes.base import CompileContext, Pass
from hetcomp.passes.pareto_search import mapping_problem
from hetcomp.progress import bar


class RowRemap(Pass):
    name = "row_remap"
    requires = ("layers", "pareto_front", "row_sensitivity")
    provides = ("assignment", "row_remap")

    def __init__(self, tolerance: float = 0.01, step: float = 0.02, candidates: int = 5, repeats: int = 3,
                 max_steps: int = 60, samples: float = 1.0, val_data=None) -> None:
        if not 0 <= tolerance < 1:
            raise ConfigError(f"tolerance is a fraction of accuracy in [0, 1), got {tolerance}")
        if not (0 < step < 1 or (step >= 1 and float(step).is_integer())):
            raise ConfigError(f"step is a fraction (0, 1) of the movable rows or a whole number of rows, got {step}")
        if candidates < 1 or repeats < 1 or max_steps < 0:
            raise ConfigError("candidates and repeats must be >= 1 and max_steps >= 0")
        self.tolerance, self.step, self.candidates = tolerance, step, candidates
        self.repeats, self.max_steps, self.samples, self.val_data = repeats, max_steps, samples, val_data

    def settings(self) -> dict:
        return {"tolerance": self.tolerance, "step": self.step, "candidates": self.candidates,
                "repeats": self.repeats, "max_steps": self.max_steps}

    def run(self, gm: fx.GraphModule, ctx: CompileContext) -> fx.GraphModule:
        data = self.val_data if self.val_data is not None else ctx.data
        annotations = [a for _, a in mappable_nodes(gm)]
        free = [a.assignment is None or (a.reason or "").startswith("pareto_search") for a in annotations]
        problem = mapping_problem(gm, ctx, self.samples, pinned=[not movable for movable in free])
        tiers = problem.tiers
        front = ctx.manifest_extra["pareto"]["front"]
        baseline = _digital_accuracy(gm, data)

        def apply(counts: np.ndarray, why: str) -> None:
            for annotation, layer_counts, movable in zip(annotations, counts, free):
                if movable:
                    apply_counts(annotation, layer_counts, tiers, why)

        def measure(counts: np.ndarray, why: str) -> dict:
            apply(counts, why)
            module, report = lower_graph(gm, ctx.targets)
            accuracy = evaluate(module, report, data, repeats=self.repeats, seed=ctx.seed).mean
            cost = problem.evaluate(counts)
            return {"accuracy": accuracy, "latency_s": float(cost.latency_s[0]), "energy_j": float(cost.energy_j[0])}

        picks = sorted(set(np.linspace(0, len(front) - 1, min(self.candidates, len(front))).round().astype(int)))
        tried = []
        for index in picks:
            counts = np.array(front[index]["counts"])
            tried.append({"front_index": int(index), **measure(counts, f"{self.name}: Pareto point {index}")})
        start = max(tried, key=lambda r: r["accuracy"])
        counts = np.array(front[start["front_index"]]["counts"])
        state = measure(counts, f"{self.name}: Pareto point {start['front_index']} (most accurate of {len(picks)})")
        trajectory = [{"step": 0, **state, "moved": None}]
        sensitivity = _row_sensitivities(annotations)
        movable_rows = int(sum(a.layer.rows for a, m in zip(annotations, free) if m))
        step_rows = int(self.step) if self.step >= 1 else max(1, round(self.step * movable_rows))
        progress = bar(self.max_steps, "row remap")
        while baseline - state["accuracy"] > self.tolerance + 1e-9 and len(trajectory) <= self.max_steps:
            move = _plan_move(problem, counts, sensitivity, free, step_rows)
            if move is None:
                break
            counts, moved = move
            state = measure(counts, f"{self.name}: after {len(trajectory)} move(s) of up to {step_rows} rows")
            trajectory.append({"step": len(trajectory), **state, "moved": moved})
            progress.update(1)
            progress.set_postfix(accuracy=f"{state['accuracy']:.4f}", target=f"{baseline - self.tolerance:.4f}")
        progress.close()
        met = baseline - state["accuracy"] <= self.tolerance + 1e-9  # means of repeats: float noise
        ctx.manifest_extra["row_remap"] = {
            "baseline_accuracy": baseline, "tolerance": self.tolerance, "met": met, "step_rows": step_rows,
            "candidates": tried, "trajectory": trajectory,
            "stopped": "within tolerance" if met else ("max_steps" if len(trajectory) > self.max_steps
                                                       else "no row can move to a more accurate tier"),
        }
        return gm


def _digital_accuracy(gm: fx.GraphModule, data) -> float:
    device = next(gm.parameters()).device
    inputs, labels = staged(data, device)
    was_training = gm.training
    gm.eval()
    with torch.no_grad():
        accuracy = int((batched_logits(gm, inputs).argmax(-1) == labels).sum()) / len(labels)  # as evaluate()
    gm.train(was_training)
    return accuracy


def _row_sensitivities(annotations) -> list[np.ndarray]:
    """Per layer: sensitivity of each row, in the order rows_by_sensitivity ranks them (descending)."""
    out = []
    for annotation in annotations:
        values = annotation.metrics.get("row_sensitivity")
        order = rows_by_sensitivity(annotation)
        if values is None:
            out.append(np.full(annotation.layer.rows, -np.inf))
        else:
            out.append(np.asarray(values, dtype=float)[order])
    return out


def _plan_move(problem, counts: np.ndarray, sensitivity: list[np.ndarray], free: list[bool], step_rows: int):
    """Move up to ``step_rows`` of the most sensitive rows off the least accurate tier that can shed any."""
    ranks = np.array([t.accuracy_rank for t in problem.tiers])
    usage = problem.evaluate(counts).usage[0]
    per_row = problem.weights / problem.rows
    for worst in np.argsort(-ranks, kind="stable"):
        candidates = []  # (sensitivity, layer, destination)
        for layer in np.flatnonzero(counts[:, worst] > 0):
            if not free[layer]:
                continue
            better = [t for t in np.argsort(ranks, kind="stable") if ranks[t] < ranks[worst]
                      and problem.allowed[layer, t]]
            if not better:
                continue
            # rows of this layer on `worst` are the least sensitive ones: those ranked after all better tiers' rows
            first = int(sum(counts[layer, t] for t in range(len(ranks)) if ranks[t] < ranks[worst]))
            for value in sensitivity[layer][first : first + counts[layer, worst]]:
                candidates.append((value, int(layer), better))
        if not candidates:
            continue
        candidates.sort(key=lambda c: -c[0])
        new = counts.copy()
        room = problem.capacity - usage
        moved: dict[str, int] = {}
        for _, layer, better in candidates:
            if sum(moved.values()) >= step_rows:
                break
            destination = next((t for t in better if room[t] >= per_row[layer]), None)
            if destination is None:
                continue
            new[layer, worst] -= 1
            new[layer, destination] += 1
            room[destination] -= per_row[layer]
            key = f"{problem.layers[layer].name}: {problem.tiers[worst].name}->{problem.tiers[destination].name}"
            moved[key] = moved.get(key, 0) + 1
        if moved:
            return new, moved
    return None
