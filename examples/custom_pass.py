"""Writing your own pass: keep every layer with fewer than N parameters digital.

A pass declares what it requires and provides, and tags layers through the same ``assign_layer``
helper the built-in partition passes use. User passes run before the strategy's partition passes,
so a layer this pass pins stays where it put it.

    python examples/custom_pass.py
"""

from __future__ import annotations

import torch.fx as fx

import hetcomp
from hetcomp.passes.assign import assign_layer, most_accurate_digital


class KeepSmallLayersDigital(hetcomp.Pass):
    name = "keep_small_layers_digital"
    requires = ("layers",)
    provides = ("assignment",)

    def __init__(self, max_params: int) -> None:
        self.max_params = max_params

    def settings(self) -> dict:
        return {"max_params": self.max_params}

    def run(self, gm: fx.GraphModule, ctx: hetcomp.CompileContext) -> fx.GraphModule:
        digital = most_accurate_digital(ctx.targets, self.name)
        for _, annotation in hetcomp.mappable_nodes(gm):
            if annotation.layer.params < self.max_params:
                assign_layer(annotation, digital, ctx.targets, self.name,
                             f"{annotation.layer.params} parameters < {self.max_params}: not worth a tile")
        return gm


if __name__ == "__main__":
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parent))
    from digits_cnn import build

    model, data = build()
    example = next(iter(data["test"]))[0]
    compiled = hetcomp.compile(model, target="pcm+digital", example_inputs=(example,), strategy="all-analog",
                               passes=[KeepSmallLayersDigital(max_params=1000)])
    for layer in compiled.manifest.layers:
        print(f"{layer['name']:8s} {layer['params']:7d} params -> {layer['assignment']:8s} ({layer['reason']})")
