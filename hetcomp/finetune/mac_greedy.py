"""Partition baseline (LionHeart): map layers to analog one at a time, largest MACs first, keep a layer
only if accuracy after retraining stays within ``threshold`` of the digital baseline.

Each candidate is a fine-tuning stage (``train_stage``, the same code LAFT uses) from the weights of
the last accepted state, followed by LionHeart's acceptance test: accuracy over ``eval_repeats``
programmed-and-drifted repeats at ``t_inference`` on the validation split must be at least the digital
validation accuracy minus ``threshold`` (a fraction: 0.02 = 2 points). A rejected candidate is
reverted. The retrained weights of the final accepted set become the compiled weights, so this
strategy needs no separate ``finetune=`` run; a LAFT object given to compile supplies its training
settings (epochs, patience, learning rates, validation split) and its checkpoint folder. Checkpoints are
LAFT's (hetcomp.storage.StepLog, keyed by ``training_run_key``): after each candidate its trial record, and
the retrained state when the candidate is accepted (a rejected one changes no weights, so it writes no
tensor file); a killed search resumes after the last finished candidate (``resume=True``), reaching the
same result, and a changed run starts over in a folder of its own.

Under torch.distributed each candidate's stage trains data-parallel (``train_stage``), its acceptance test is
the sharded evaluation (the repeats split over the ranks, the same score on every rank, hence the same
verdict), and rank 0 alone writes the checkpoints (StepLog).
"""

from __future__ import annotations

import torch.fx as fx

from hetcomp import checks
from hetcomp.analysis.cache import WEIGHTS
from hetcomp.errors import ConfigError
from hetcomp.evaluate import evaluate
from hetcomp.finetune.data import training_split
from hetcomp.finetune.laft import LAFT, training_run_key
from hetcomp.finetune.stage import derive_seed, train_stage, validation_accuracy
from hetcomp.graph.layers import WEIGHT_STATIC, mappable_nodes
from hetcomp.lower import lower_graph
from hetcomp.passes.assign import assign_layer
from hetcomp.passes.base import CompileContext, Pass
from hetcomp.storage import StepLog


class MacGreedy(Pass):
    name = "mac_greedy"
    requires = ("layers",)
    provides = ("assignment", "finetuned")
    changes = frozenset({WEIGHTS})  # fine-tuning changes weights, not the graph

    def __init__(self, digital: str, analog: str, threshold: float = 0.02, training: LAFT | None = None,
                 eval_repeats: int = 5, t_inference: float = 86400.0) -> None:
        self.threshold, self.eval_repeats, self.t_inference = self.check_settings(threshold, eval_repeats, t_inference)
        if training is not None and not isinstance(training, LAFT):
            raise ConfigError(f"mac-greedy takes its training settings from finetune=hetcomp.LAFT(...), got "
                              f"{checks.got(training)}")
        self.digital, self.analog = digital, analog
        self.training = training if training is not None else LAFT()

    @staticmethod
    def check_settings(threshold: float, eval_repeats: int, t_inference: float) -> tuple[float, int, float]:
        """The settings checked (ConfigError naming the first bad one); also run by strategies.mac_greedy()."""
        return (checks.real("mac-greedy threshold (a fraction of accuracy)", threshold, 0.0, False, 1.0, True),
                checks.integer("mac-greedy eval_repeats", eval_repeats),
                checks.real("mac-greedy t_inference (seconds)", t_inference, 0.0))

    def settings(self) -> dict:
        return {"digital": self.digital, "analog": self.analog, "threshold": self.threshold,
                "eval_repeats": self.eval_repeats, "t_inference": self.t_inference,
                "training": self.training.settings()}

    def run(self, gm: fx.GraphModule, ctx: CompileContext) -> fx.GraphModule:
        training = self.training
        data = training_split(ctx.data, training.val_data, training.val_fraction, ctx.seed, training.batch_size,
                              class_labels=ctx.loss_fn is None, fmt=ctx.fmt, metric=ctx.config.metric)
        candidates, pinned = [], []
        for _, annotation in mappable_nodes(gm):
            if annotation.layer.kind == WEIGHT_STATIC and annotation.assignment is None:
                candidates.append(annotation)
            elif isinstance(annotation.assignment, str) and ctx.targets[annotation.assignment].analog:
                pinned.append(annotation.layer.name)  # put on analog by an earlier pass: analog in every trial
        candidates.sort(key=lambda a: -a.layer.macs)  # stable: ties keep graph order
        baseline = validation_accuracy(gm, data.val, 1, derive_seed(ctx.seed, "baseline"), metric=data.metric,
                                       fmt=data.fmt)
        better = ctx.metric.higher_is_better  # the metric's direction: accuracy, Recall@1 up; a loss down
        floor = baseline - self.threshold if better else baseline + self.threshold
        log = StepLog(training.checkpoint_dir, training_run_key(
            gm, ctx, data, method="mac-greedy", candidates=[c.layer.name for c in candidates], pinned=pinned,
            settings=self.settings()), "mac-greedy")
        trials = log.resume() if training.resume else log.restart()
        try:
            accepted = [t["candidate"] for t in trials if t["accepted"]]
            verdicts = {t["candidate"]: (i + 1, t["drift_val_accuracy"], t["accepted"]) for i, t in enumerate(trials)}
        except (KeyError, TypeError) as error:
            raise log.corrupted("progress.json", f"a trial record is malformed ({error!r})") from None
        for candidate in candidates:  # a resumed search: the accepted layers keep their tentative tag
            if candidate.layer.name in accepted:
                candidate.assignment = self.analog
        fp_state = {k: v.detach().clone() for k, v in gm.state_dict().items()}
        state = log.latest_tensors(fp_state)  # the last accepted candidate's
        state = fp_state if state is None else state
        for index, candidate in enumerate(candidates):
            if index < len(trials):
                continue
            name = candidate.layer.name
            candidate.assignment = self.analog  # tentatively, so lowering knows its target
            gm.load_state_dict(state)
            result = train_stage(gm, ctx.targets, [*pinned, *accepted, name], data, training.stage_settings(), ctx.loss,
                                 derive_seed(ctx.seed, "mac-greedy", index),
                                 desc=f"mac-greedy {index + 1}/{len(candidates)} (+{name})")
            gm.load_state_dict(result.state)
            lowered, report = lower_graph(gm, ctx.targets, layers=[*pinned, *accepted, name])
            score = evaluate(lowered, report, data.val, repeats=self.eval_repeats, t_inference=self.t_inference,
                             seed=derive_seed(ctx.seed, "mac-greedy-eval", index), metric=data.metric,
                             inputs_fn=data.fmt.inputs_fn).mean
            keep = score >= floor if better else score <= floor
            if keep:
                accepted.append(name)
                state = result.state
            else:
                candidate.assignment = None  # reverted
            verdicts[name] = (index + 1, score, keep)
            trials.append({**result.record(), "candidate": name, "macs": candidate.layer.macs,
                           "drift_val_accuracy": score, "accepted": keep})
            log.append(trials[-1], result.state if keep else None)
        gm.load_state_dict(state)
        sign = "-" if better else "+"
        test = (f"validation {ctx.metric.name} at t={self.t_inference:g}s vs digital baseline {baseline:.4f} {sign} "
                f"{self.threshold}")
        for _, annotation in mappable_nodes(gm):
            if annotation.layer.name in verdicts:
                rank, score, keep = verdicts[annotation.layer.name]
                annotation.assignment = None  # the search's tentative tag; assign with the reason now
                relation = ('>=' if keep else '<') if better else ('<=' if keep else '>')
                why = f"candidate {rank} by MACs; retrained {test}: {score:.4f} {relation} {floor:.4f}"
                assign_layer(annotation, self.analog if keep else self.digital, ctx.targets, "mac-greedy", why)
            else:
                assign_layer(annotation, self.digital, ctx.targets, "mac-greedy",
                             "not an analog candidate (dynamic op or pinned earlier)")
        ctx.manifest_extra["finetune"] = {
            "method": "mac-greedy", "metric": ctx.metric.name, "baseline_val": baseline, "trials": trials,
            "accepted": accepted,
            "checkpoints": None if log.directory is None else str(log.directory)}
        return gm
