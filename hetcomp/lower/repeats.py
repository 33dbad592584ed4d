"""Run a lowered graph for R hardware repeats in one pass over the data (repeats folded into the batch).

Each lowered layer is replaced by its simulator's repeat-vectorized module (``Simulator.repeated``), which holds R
programmed-and-drifted realizations and returns its output for all of them, repeat-major in the batch dimension
([R*B, ...]). ``FoldedRunner`` interprets the graph: nodes that do not depend on an analog layer run once (the
digital prefix, and any digital branch beside the analog layers), nodes downstream run on the folded batch, and a
shared value (one that carries the batch, [B, ...]) is repeated R times where it meets a folded one (a residual
connection from the prefix). Ops that mix samples of a batch, or shapes baked from the batch size before the
first analog layer (``view(batch, ...)`` with ``batch`` read from the input), would break folding: ``fold_matches``
checks one chunk against separate runs (noise off) and the evaluator falls back to one repeat at a time.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from typing import Any

import torch
import torch.fx as fx

from hetcomp.lower.simulator import Simulator


def layer_seed(seed: int, *keys: Any) -> int:
    """A seed that depends only on ``seed`` and ``keys`` (repeat, layer, stream)."""
    digest = hashlib.sha256(repr((seed, *keys)).encode()).digest()
    return int.from_bytes(digest[:8], "little") % (2**63)


def why_not_vectorized(module: fx.GraphModule, lowered: dict[str, Simulator]) -> str | None:
    """Why the lowered graph cannot run repeat-vectorized (None: it can)."""
    targets = {node.target for node in module.graph.nodes if node.op == "call_module"}
    for name, simulator in lowered.items():
        if name not in targets:
            return f"lowered module {name!r} is not called directly by the graph"
        reason = simulator.repeats_unsupported(module.get_submodule(name))
        if reason is not None:
            return f"{name}: {reason}"
    return None


def repeated_layers(module: fx.GraphModule, lowered: dict[str, Simulator], seeds: Iterable[int],
                    t_inference: float) -> dict[str, Any]:
    """Every lowered layer's repeat-vectorized module for the repeats seeded by ``seeds`` (one per repeat)."""
    seeds = list(seeds)
    layers = {}
    for name, simulator in lowered.items():
        program = [layer_seed(seed, name, "program") for seed in seeds]
        noise = [layer_seed(seed, name, "forward") for seed in seeds]
        layers[name] = simulator.repeated(module.get_submodule(name), t_inference, program, noise)
    return layers


def _batch_nodes(gm: fx.GraphModule) -> set[fx.Node]:
    """Nodes whose value derives from the inputs (so a tensor among them may carry the batch dimension)."""
    batch: set[fx.Node] = set()
    for node in gm.graph.nodes:
        if node.op == "placeholder" or any(i in batch for i in node.all_input_nodes):
            batch.add(node)
    return batch


class FoldedRunner(fx.Interpreter):
    """Interprets ``gm`` with the lowered layers replaced by repeat-vectorized ones (see the module docstring)."""

    def __init__(self, gm: fx.GraphModule, layers: dict[str, Any], repeats: int) -> None:
        super().__init__(gm)
        self.layers, self.repeats = layers, repeats
        self.batch_nodes = _batch_nodes(gm)
        self.folded: set[fx.Node] = set()
        self.batch = 0

    def run(self, *args: Any, initial_env: dict[fx.Node, Any] | None = None) -> Any:
        """The graph's output for all repeats: tensors [R*B, ...], repeat-major."""
        self.folded = set()
        self.batch = args[0].shape[0]
        out = super().run(*args, initial_env=initial_env)
        output = next(node for node in reversed(self.graph.nodes) if node.op == "output")
        if not any(i in self.folded for i in output.all_input_nodes):
            out = self._fold(out)
        return out

    def run_node(self, node: fx.Node) -> Any:
        inputs = node.all_input_nodes
        if node.op == "call_module" and node.target in self.layers:
            args, kwargs = self.fetch_args_kwargs_from_env(node)
            folded = any(i in self.folded for i in inputs)
            self.folded.add(node)
            return self.layers[node.target](*args, folded=folded, **kwargs)
        if any(i in self.folded for i in inputs):
            for i in inputs:
                if i in self.batch_nodes and i not in self.folded:
                    self.env[i] = self._fold(self.env[i])
                    self.folded.add(i)
            self.folded.add(node)
        return super().run_node(node)

    def _fold(self, value: Any) -> Any:
        def fold(item: Any) -> Any:
            if isinstance(item, torch.Tensor) and item.dim() >= 1 and item.shape[0] == self.batch:
                return item.repeat(self.repeats, *([1] * (item.dim() - 1)))
            return item

        return fx.node.map_aggregate(value, fold)


def fold_matches(gm: fx.GraphModule, layers: dict[str, Any], x: torch.Tensor,
                 initial_env: dict[fx.Node, Any] | None) -> bool:
    """Whether folding two repeats gives what two separate runs give (noise off), on ``x``."""
    pair = {name: layer.select([0, 1]) for name, layer in layers.items()}
    singles = [{name: layer.select([i]) for name, layer in layers.items()} for i in (0, 1)]
    for group in (pair, *singles):
        for layer in group.values():
            layer.noise = False
    try:
        together = FoldedRunner(gm, pair, 2).run(x, initial_env=None if initial_env is None else dict(initial_env))
        apart = [FoldedRunner(gm, single, 1).run(x, initial_env=None if initial_env is None else dict(initial_env))
                 for single in singles]
    except (RuntimeError, ValueError, IndexError, TypeError):
        return False
    if not (isinstance(together, torch.Tensor) and all(isinstance(a, torch.Tensor) for a in apart)):
        return False
    expected = torch.cat(apart)
    if together.shape != expected.shape:
        return False
    # Structure, not float detail: a batch-mixing op gives O(1) differences; re-associated sums flip a quantization
    # level now and then.
    return bool((together - expected).abs().mean() <= 1e-2 * expected.abs().mean() + 1e-12)
