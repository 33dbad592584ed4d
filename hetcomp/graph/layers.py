"""The one interface through which passes see mappable layers, whatever front end traced the model."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from typing import Any

import torch.fx as fx

META_KEY = "hetcomp"

# Op kinds of mappable layers: a weight-static layer (Linear/Conv, weights stored on the device) or a dynamic
# product of two activations (attention's Q K^T). Targets say which kinds they run.
WEIGHT_STATIC = "weight-static"
DYNAMIC = "dynamic"
OP_KINDS = (WEIGHT_STATIC, DYNAMIC)


@dataclass
class LayerInfo:
    """A mappable layer: a weight-static layer (Linear/Conv) or a dynamic matrix product.

    ``rows`` are output channels/features: the unit a row-level partition splits.
    ``macs`` are multiply-accumulates per sample (batch = leading dimension of the example input).
    ``weight_param`` is the qualified parameter name of a weight-static layer's weight.
    """

    name: str
    kind: str  # "weight-static" | "dynamic"
    op: str  # "linear" | "conv1d" | "conv2d" | "matmul"
    weight_shape: tuple[int, ...]
    rows: int
    params: int
    macs: int
    node_name: str
    module_name: str | None = None
    weight_param: str | None = None
    groups: int = 1
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["weight_shape"] = list(self.weight_shape)
        return data


@dataclass
class LayerAnnotation:
    """What passes attach to a mappable node under ``node.meta["hetcomp"]``."""

    layer: LayerInfo
    metrics: dict[str, Any] = field(default_factory=dict)
    # A target name, or {target name: number of rows} for a row-split layer.
    assignment: str | dict[str, int] | None = None
    reason: str | None = None
    # For row-split layers: the target of each output row, in row order.
    row_targets: list[str] | None = None


def annotate(node: fx.Node, layer: LayerInfo) -> LayerAnnotation:
    annotation = LayerAnnotation(layer=layer)
    node.meta[META_KEY] = annotation
    return annotation


def mappable_nodes(gm: fx.GraphModule) -> Iterator[tuple[fx.Node, LayerAnnotation]]:
    """Mappable nodes in topological order, with their annotations."""
    for node in gm.graph.nodes:
        annotation = node.meta.get(META_KEY)
        if isinstance(annotation, LayerAnnotation):
            yield node, annotation


def layer_annotations(gm: fx.GraphModule) -> list[LayerAnnotation]:
    return [annotation for _, annotation in mappable_nodes(gm)]
