"""The one way partition passes assign a layer: respecting op support, recording who decided and why.

A partition pass only tags layers (``assignment`` + ``reason``); lowering is a separate step.
A layer a target cannot run goes to the most accurate target in the set that can, with the rejection
in its reason (as ExecuTorch partitioners report rejected nodes).
"""

from __future__ import annotations

from hetcomp.errors import TargetError
from hetcomp.graph.layers import LayerAnnotation
from hetcomp.targets.base import TargetSet


def assign_layer(annotation: LayerAnnotation, target: str, targets: TargetSet, decided_by: str, why: str) -> bool:
    """Assign ``annotation`` to ``target`` unless an earlier pass already did. Returns True if assigned."""
    if annotation.assignment is not None:
        return False
    chosen = targets[target]
    kind = annotation.layer.kind
    if not chosen.supports_kind(kind):
        fallback = targets.supporting(kind)
        if not fallback:
            raise TargetError(
                f"layer '{annotation.layer.name}' is a {kind} op and no target in {targets} runs {kind} ops; "
                "add one that does (e.g. digital or photonic)"
            )
        annotation.assignment = fallback[0].name
        annotation.reason = (f"{decided_by}: {why}; but {chosen.name} does not run {kind} ops, "
                             f"so it goes to {fallback[0].name} (most accurate target that does)")
        return True
    annotation.assignment = target
    annotation.reason = f"{decided_by}: {why}"
    return True


def sole_analog(targets: TargetSet, purpose: str) -> str:
    analog = targets.analog
    if len(analog) != 1:
        raise TargetError(
            f"{purpose} needs exactly one analog target, {targets} has {len(analog)}; "
            "name one with strategy='all-<target>'"
        )
    return analog[0].name


def most_accurate_digital(targets: TargetSet, purpose: str) -> str:
    digital = targets.digital
    if not digital:
        raise TargetError(f"{purpose} needs a digital target in the set; use e.g. target='{targets}+digital'")
    return digital[0].name
