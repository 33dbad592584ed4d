"""Partition, H3PIMAP stage 2 (RR, Algorithm 2): trade efficiency for accuracy, rows at a time.

0. Order the tiers by measured quality (``tier_order="measured"``, the default): each tier alone (every movable
   layer on it; layers it cannot run on their most accurate allowed tier, as the Pareto baselines do) is
   lowered and measured once, like any point below; the best is "most accurate". A target's fixed
   ``accuracy_rank`` only breaks ties (``tier_order="rank"`` uses it alone, without these measurements). A tier
   can look better on paper than it computes: at Eq. 1's parameters ReRAM's noise is rounded away, so 100%
   ReRAM scored at least as high as 100% SRAM in the demo.
1. Measure the accuracy of up to ``candidates`` points spread along the stage-1 Pareto front (lowered,
   ``repeats`` noisy repeats each) and start from the most accurate (§III-D).
2. While accuracy is more than ``tolerance`` below the digital model's: take the least accurate tier that
   still holds rows, and move the ``step`` most sensitive of its rows (``row_sensitivity``, Eq. 4, compared
   across layers: it is an expected loss increase) to the most accurate tier that runs the layer, has
   room for the row's weights, and is more accurate; re-measure. Stop when within tolerance, when no row
   can move, or after ``max_steps``. Rows of dynamic products have no weights and hence no sensitivity;
   they move after every weight row of their tier. A grouped convolution's rows move in whole groups
   (ranked by their mean row sensitivity, so a group competes per row with single rows); a group that
   would overshoot ``step`` waits for the next step, unless nothing else moved.

Within every layer the most sensitive rows sit on the most accurate tiers (``apply_counts``, in the same order).
The trajectory (accuracy, latency, energy and the move of every step), each tier's measured quality
(``tier_quality``) and the order used (``tier_order``, beside ``accuracy_rank_order``) go to
``extra["row_remap"]``.
Accuracy is the compile's metric (top-1 by default; ``metric=`` of compile, e.g. Recall@1) on ``val_data``
(default: the data given to compile). ``quality=f(module, data) ->
float`` replaces it (e.g. perplexity, with ``higher_is_better=False``; H3PIMAP's tolerance is 0.1 PPL),
averaged over ``repeats`` noisy repeats. Under torch.distributed the repeats of every measurement are split
over the ranks (``_score``): each rank gets the single-process value, so every rank makes the same moves.

``checkpoint=FOLDER``: the run is checkpointed with hetcomp.storage.StepLog (the mechanism of LAFT and
mac-greedy) in ``FOLDER/<run key>/progress.json``, one step per measurement round: step 0 records the
measured tier qualities and candidates, the start and its row counts, each later step a move (its trajectory
entry and the row counts after it). A killed run started again with the same model, targets, seed, settings,
Pareto front and row sensitivities resumes after its last finished step (the evaluations are seeded per repeat, so the
result is the same as an uninterrupted run); a changed run starts over in a folder of its own, and a
corrupted progress.json is a CheckpointError (delete the run's folder to start over).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.fx as fx

from hetcomp import checks, distributed
from hetcomp.data import DataFormat, take_batches
from hetcomp.errors import ConfigError
from hetcomp.evaluate import evaluate, hardware_repeat
from hetcomp.graph.calls import set_training
from hetcomp.graph.layers import mappable_nodes
from hetcomp.lower import lower_graph
from hetcomp.manifest import data_hash, fingerprint
from hetcomp.partition.rows import apply_counts, row_unit, rows_by_sensitivity
from hetcomp.passes.base import CompileContext, Pass
from hetcomp.passes.pareto_search import mapping_problem
from hetcomp.progress import bar
from hetcomp.storage import StepLog, run_key
from hetcomp.storage.checkpoints import describe_callable

Quality = Callable[[torch.nn.Module, Any], float]


class RowRemap(Pass):
    name = "row_remap"
    requires = ("layers", "pareto_front", "row_sensitivity")
    provides = ("assignment", "row_remap")

    _task: tuple[Any, Any] = (None, None)  # (metric, inputs_fn) of the compile, set by run

    def __init__(self, tolerance: float = 0.01, step: float = 0.02, candidates: int = 5, repeats: int = 3,
                 max_steps: int = 60, samples: float = 1.0, val_data=None, quality: Quality | None = None,
                 higher_is_better: bool = True, checkpoint: str | Path | None = None,
                 tier_order: str = "measured") -> None:
        checks.callable_or_none("quality", quality, "a function (module, data) -> float, e.g. a perplexity")
        if quality is None:
            checks.real("tolerance (a fraction of accuracy for the default quality)", tolerance, 0.0, False, 1.0, True)
        tolerance = checks.real("tolerance", tolerance, 0.0)
        step = checks.real("step", step, 0.0, exclusive=True)
        if not (step < 1 or step.is_integer()):
            raise ConfigError(f"step is a fraction (0, 1) of the movable rows or a whole number of rows, got {step}")
        self.tolerance, self.step = tolerance, step if step < 1 else int(step)
        self.candidates = checks.integer("candidates", candidates)
        self.repeats = checks.integer("repeats", repeats)
        self.max_steps = checks.integer("max_steps", max_steps, 0)
        self.samples = checks.real("samples", samples, 0.0, exclusive=True)
        self.val_data = val_data
        self.quality, self.higher_is_better = quality, checks.boolean("higher_is_better", higher_is_better)
        self.checkpoint = None if checks.path_or_none("checkpoint", checkpoint) is None else Path(checkpoint)
        if tier_order not in ("measured", "rank"):
            raise ConfigError(f"tier_order must be 'measured' (each tier alone, measured once on the validation data) "
                              f"or 'rank' (the targets' fixed accuracy_rank), got {tier_order!r}")
        self.tier_order = tier_order

    def settings(self) -> dict:
        return {"tolerance": self.tolerance, "step": self.step, "candidates": self.candidates,
                "repeats": self.repeats, "max_steps": self.max_steps,
                "quality": "top-1 accuracy" if self.quality is None else getattr(self.quality, "__qualname__",
                                                                                 "custom"),
                "higher_is_better": self.higher_is_better, "samples": self.samples, "tier_order": self.tier_order,
                "checkpoint": None if self.checkpoint is None else str(self.checkpoint)}

    def _shortfall(self, baseline: float, value: float) -> float:
        """How far ``value`` is worse than ``baseline`` (<= tolerance: good enough)."""
        return baseline - value if self.higher_is_better else value - baseline

    def _score(self, module: torch.nn.Module, report: dict, data, seed: int) -> float:
        """The mean quality over ``repeats`` hardware repeats. Under torch.distributed the repeats are split over
        the ranks (top-1: the sharded ``evaluate``; a ``quality`` function: each rank runs every world-th
        repeat, seeded (seed, repeat) as in one process, and the values are gathered in repeat order), so every
        rank gets the single-process mean and takes the same next move."""
        if self.quality is None:
            return evaluate(module, report, data, repeats=self.repeats, seed=seed, metric=self._task[0],
                            inputs_fn=self._task[1]).mean
        rank, world = distributed.rank(), distributed.world_size()
        mine = {}
        set_training(module, False)
        with torch.no_grad():
            for repeat in range(rank, self.repeats, world):
                with hardware_repeat(module, report, 86400.0, seed, repeat):
                    mine[repeat] = float(self.quality(module, data))
        values = {repeat: value for part in distributed.all_agree(mine) for repeat, value in part.items()}
        ordered = [values[repeat] for repeat in range(self.repeats)]
        return sum(ordered) / len(ordered)

    def run(self, gm: fx.GraphModule, ctx: CompileContext) -> fx.GraphModule:
        data = self.val_data if self.val_data is not None else ctx.data
        # The default quality is the compile's metric (top-1 accuracy unless metric= was given), on batches read
        # as the compile reads them (inputs_fn); its direction is the metric's.
        self._task = (ctx.config.metric, ctx.config.inputs_fn)
        if self.quality is None:
            self.higher_is_better = ctx.metric.higher_is_better
        annotations = [a for _, a in mappable_nodes(gm)]
        free = [a.assignment is None or (a.reason or "").startswith("pareto_search") for a in annotations]
        problem = mapping_problem(gm, ctx, self.samples, pinned=[not movable for movable in free])
        tiers = problem.tiers
        front = ctx.manifest_extra["pareto"]["front"]
        if self.quality is None:  # nothing lowered: the digital model's score
            baseline = evaluate(gm, {}, data, repeats=1, metric=self._task[0], inputs_fn=self._task[1]).mean
        else:
            set_training(gm, False)
            with torch.no_grad():
                baseline = float(self.quality(gm, data))
        log = StepLog(self.checkpoint, self._run_key(gm, ctx, front, baseline, data), "row remap", restart_with=None)
        steps = log.resume()

        order: list[str] | None = None  # tier names, most accurate first (None: accuracy_rank)

        def apply(counts: np.ndarray, why: str) -> None:
            for annotation, layer_counts, movable in zip(annotations, counts, free):
                if movable:
                    apply_counts(annotation, layer_counts, tiers, why, order=order)

        def measure(counts: np.ndarray, why: str) -> dict:
            apply(counts, why)
            module, report = lower_graph(gm, ctx.targets)
            value = self._score(module, report, data, ctx.seed)
            cost = problem.evaluate(counts)
            return {"accuracy" if self.quality is None else "quality": value,
                    "latency_s": float(cost.latency_s[0]), "energy_j": float(cost.energy_j[0])}

        metric = "accuracy" if self.quality is None else "quality"
        if steps:  # resume: the same run was interrupted after its last finished step
            try:
                tried, trajectory = steps[0]["candidates"], [step["state"] for step in steps]
                counts = np.array(steps[-1]["counts"])
                tier_quality = steps[0]["tier_quality"]
            except (KeyError, TypeError) as error:
                raise log.corrupted("progress.json", f"a step record is malformed ({error!r})") from None
            if tier_quality is not None and set(tier_quality) != {t.name for t in tiers}:
                raise log.corrupted("progress.json", "its measured tier qualities name other tiers")
            if counts.shape != np.shape(front[0]["counts"]) or counts.dtype.kind != "i":
                raise log.corrupted("progress.json", f"its row counts are not {np.shape(front[0]['counts'])} integers")
            order = self._order(tiers, tier_quality)
            apply(counts, f"{self.name}: resumed after {len(trajectory) - 1} move(s)")
        else:
            tier_quality = None
            if self.tier_order == "measured":
                tier_quality = {tier.name: measure(problem.single_tier(tier.name),
                                                   f"{self.name}: {tier.name} alone")[metric] for tier in tiers}
            order = self._order(tiers, tier_quality)
            picks = sorted(set(np.linspace(0, len(front) - 1, min(self.candidates, len(front))).round().astype(int)))
            tried = []
            for index in picks:
                counts = np.array(front[index]["counts"])
                tried.append({"front_index": int(index), **measure(counts, f"{self.name}: Pareto point {index}")})
            pick = min(tried, key=lambda r: self._shortfall(baseline, r[metric]))
            counts = np.array(front[pick["front_index"]]["counts"])
            state = measure(counts, f"{self.name}: Pareto point {pick['front_index']} (best of {len(picks)})")
            trajectory = [{"step": 0, **state, "moved": None}]
            log.append({"candidates": tried, "state": trajectory[0], "counts": counts.tolist(),
                        "tier_quality": tier_quality})
        state = trajectory[-1]
        sensitivity = _row_sensitivities(annotations)
        movable_rows = int(sum(a.layer.rows for a, m in zip(annotations, free) if m))
        step_rows = int(self.step) if self.step >= 1 else max(1, round(self.step * movable_rows))
        progress = bar(self.max_steps, "row remap")
        progress.update(len(trajectory) - 1)
        stopped = None
        while self._shortfall(baseline, state[metric]) > self.tolerance + 1e-9:  # means of repeats: float noise
            if len(trajectory) > self.max_steps:
                stopped = "max_steps"
                break
            move = _plan_move(problem, counts, sensitivity, free, step_rows, order)
            if move is None:
                stopped = "no row can move to a more accurate tier"
                break
            counts, moved = move
            state = measure(counts, f"{self.name}: after {len(trajectory)} move(s) of up to {step_rows} rows")
            trajectory.append({"step": len(trajectory), **state, "moved": moved})
            log.append({"state": trajectory[-1], "counts": counts.tolist()})
            progress.update(1)
            progress.set_postfix({metric: f"{state[metric]:.4f}", "baseline": f"{baseline:.4f}"})
        progress.close()
        met = stopped is None
        ctx.manifest_extra["row_remap"] = {
            "metric": metric, "higher_is_better": self.higher_is_better,
            "measure": ctx.metric.name if self.quality is None else self.settings()["quality"],
            "baseline_accuracy" if self.quality is None else "baseline_quality": baseline,
            "tolerance": self.tolerance, "met": met, "step_rows": step_rows,
            "tier_quality": tier_quality, "tier_order": order,
            "accuracy_rank_order": self._order(tiers, None),
            "candidates": tried, "trajectory": trajectory, "stopped": "within tolerance" if met else stopped,
        }
        return gm

    def _order(self, tiers, tier_quality: dict[str, float] | None) -> list[str]:
        """Tier names, most accurate first: by measured quality (ties by accuracy_rank, then name), or by
        accuracy_rank alone when nothing was measured."""
        sign = -1.0 if self.higher_is_better else 1.0
        return [t.name for t in sorted(tiers, key=lambda t: (
            0.0 if tier_quality is None else sign * tier_quality[t.name], t.accuracy_rank, t.name))]

    def _run_key(self, gm: fx.GraphModule, ctx: CompileContext, front: list, baseline: float, data: Any) -> str:
        """Everything a step depends on: model, targets, seed, settings (not the checkpoint folder), the quality
        measure, the validation data and the row sensitivities (hashed), the Pareto front and the baseline."""
        rows = {a.layer.name: a.metrics.get("row_sensitivity") for _, a in mappable_nodes(gm)}
        rows = {name: None if v is None else torch.tensor(v, dtype=torch.float64) for name, v in rows.items()}
        return run_key({
            "method": "row-remap", "model": fingerprint(gm, gm), "targets": [t.to_dict() for t in ctx.targets],
            "seed": ctx.seed, "settings": {k: v for k, v in self.settings().items() if k != "checkpoint"},
            "front": [p["counts"] for p in front], "baseline": baseline,
            "rows": data_hash([rows]), "quality": describe_callable(self.quality),
            "data": data_hash([_validation_sample(data, ctx.fmt)]),
            **({} if ctx.config.metric is None and ctx.config.inputs_fn is None else
               {"task": [describe_callable(ctx.config.inputs_fn), ctx.metric.name]}),
        })


def _row_sensitivities(annotations) -> list[np.ndarray]:
    """Per layer: sensitivity of each unit (a row, or a grouped conv's group: its rows' mean), in the order
    rows_by_sensitivity ranks them (descending)."""
    out = []
    for annotation in annotations:
        values = annotation.metrics.get("row_sensitivity")
        unit = row_unit(annotation.layer)
        if values is None:
            out.append(np.full(annotation.layer.rows // unit, -np.inf))
        else:
            ranked = np.asarray(values, dtype=float)[rows_by_sensitivity(annotation)]
            out.append(ranked.reshape(-1, unit).mean(axis=1))
    return out


def _plan_move(problem, counts: np.ndarray, sensitivity: list[np.ndarray], free: list[bool], step_rows: int,
               order: list[str] | None = None):
    """Move up to ``step_rows`` of the most sensitive rows (whole groups of a grouped conv) off the least
    accurate tier that can shed any. ``order``: tier names, most accurate first (None: by accuracy_rank)."""
    if order is None:
        ranks = np.array([t.accuracy_rank for t in problem.tiers])
    else:
        ranks = np.array([order.index(t.name) for t in problem.tiers])
    usage = problem.evaluate(counts).usage[0]
    per_unit = problem.weights / problem.rows * problem.unit
    for worst in np.argsort(-ranks, kind="stable"):
        candidates = []  # (sensitivity, layer, better tiers), one per unit
        for layer in np.flatnonzero(counts[:, worst] > 0):
            if not free[layer]:
                continue
            better = [t for t in np.argsort(ranks, kind="stable") if ranks[t] < ranks[worst]
                      and problem.allowed[layer, t]]
            if not better:
                continue
            # rows of this layer on `worst` are the least sensitive ones: those ranked after all better tiers' rows
            unit = int(problem.unit[layer])
            first = int(sum(counts[layer, t] for t in range(len(ranks)) if ranks[t] < ranks[worst])) // unit
            for value in sensitivity[layer][first : first + counts[layer, worst] // unit]:
                candidates.append((value, int(layer), better))
        if not candidates:
            continue
        candidates.sort(key=lambda c: -c[0])
        new = counts.copy()
        room = problem.capacity - usage
        moved: dict[str, int] = {}
        for _, layer, better in candidates:
            unit, done = int(problem.unit[layer]), sum(moved.values())
            if done >= step_rows:
                break
            if done and done + unit > step_rows:
                continue  # a whole group would overshoot the step
            destination = next((t for t in better if room[t] >= per_unit[layer]), None)
            if destination is None:
                continue
            new[layer, worst] -= unit
            new[layer, destination] += unit
            room[destination] -= per_unit[layer]
            key = f"{problem.layers[layer].name}: {problem.tiers[worst].name}->{problem.tiers[destination].name}"
            moved[key] = moved.get(key, 0) + unit
        if moved:
            return new, moved
    return None


def _validation_sample(data: Any, fmt: DataFormat | None = None, batches: int = 8) -> Any:
    """What of the validation data a run key hashes: a tensor pair, or a loader's first ``batches`` batches."""
    return take_batches(data, batches, what="validation data", fmt=fmt)
