"""Run a lowered graph for R hardware repeats in one pass over the data (repeats folded into the batch).

Each lowered layer is replaced by its simulator's repeat-vectorized module (``Simulator.repeated``), which holds R
programmed-and-drifted realizations and returns its output for all of them, repeat-major in the batch dimension
([R*B, ...]). ``FoldedRunner`` interprets the graph: nodes that do not depend on an analog layer run once (the
digital prefix, and any digital branch beside the analog layers), nodes downstream run on the folded batch. Where
a shared value (computed once, for B samples) meets a folded node, the folded node sees its value for R*B samples:

- a tensor that carries the batch ([B, ...], a residual connection from the prefix) is repeated R times;
- the batch size read as a value (``aten.sym_size.int(x, 0)``, ``aten.size.int(x, 0)``, ``aten.sym_numel(x)``
  of a shared tensor: torch.export graphs with a dynamic batch, e.g. attention's ``view(h, [B, S, heads, dim])``)
  and everything computed from it (scalars, ``arange(B)``, ``expand(mask, [B, ...])``, indices into the batch)
  is recomputed with R*B, from the graph's inputs repeated R times. Nodes that run unfolded keep seeing B.

What still breaks folding: ops that mix the samples of a batch (``x - x.mean(0)``), and a batch size baked in
as a constant (a Python int traced into the graph; torch.fx's ``x.size(0)`` is a ``call_method`` node and is not
read as the batch size either, see ``_SIZE_READS``). ``folds`` checks one chunk against separate runs (noise
off) on any output structure, and the evaluator falls back to one repeat at a time when it does not hold.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Sequence
from typing import Any

import torch
import torch.fx as fx
import torch.utils._pytree as pytree

from hetcomp.errors import TraceError
from hetcomp.lower.simulator import Simulator, build_repeated


def layer_seed(seed: int, *keys: Any) -> int:
    """A seed that depends only on ``seed`` and ``keys`` (repeat, layer, stream)."""
    digest = hashlib.sha256(repr((seed, *keys)).encode()).digest()
    return int.from_bytes(digest[:8], "little") % (2**63)


def chunk_seed(seed: int, chunk: int) -> int:
    """The forward-noise seed of data chunk ``chunk`` of the repeat whose noise seed is ``seed``: every chunk's
    draws start afresh, so they do not depend on which chunks ran before (evaluation deals chunks to ranks)."""
    return layer_seed(seed, "chunk", chunk)


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


def seed_draws(seed: int, device: torch.device) -> None:
    """Seed the generators that ops on ``device`` draw from (the CPU's, and a GPU's own) as ``torch.manual_seed``
    seeds them: the same draws, without seeding every other backend too (its lazy XPU call captures a stack trace,
    0.8 ms per call under cProfile on the GPU machines, 0.3 s of a 40-repeat evaluation that seeds every repeat's
    every layer).
    hetcomp runs on the CPU and CUDA; other backends' generators (MPS, XPU) are left as they are."""
    torch.default_generator.manual_seed(seed)
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        torch.cuda.default_generators[index].manual_seed(seed)


def programmed_states(module: fx.GraphModule, lowered: dict[str, Simulator], seeds: Iterable[int],
                      t_inference: float) -> dict[str, list[torch.Tensor]]:
    """Every lowered layer's programmed state (``Simulator.programs``) in the repeats seeded by ``seeds``: what
    ``repeated_layers`` draws, drawn alone (a part of a group, on one of the ranks that share it)."""
    seeds = list(seeds)
    return {name: simulator.programs(module.get_submodule(name), t_inference, _layer_seeds(seeds, name, "program"))
            for name, simulator in lowered.items()}


def repeated_layers(module: fx.GraphModule, lowered: dict[str, Simulator], seeds: Iterable[int],
                    t_inference: float, programmed: dict[str, list[torch.Tensor]] | None = None) -> dict[str, Any]:
    """Every lowered layer's repeat-vectorized module for the repeats seeded by ``seeds`` (one per repeat).
    ``programmed``: ``programmed_states`` of these repeats, drawn already (None: drawn here)."""
    seeds = list(seeds)
    layers = {}
    for name, simulator in lowered.items():
        layers[name] = build_repeated(simulator, module.get_submodule(name), t_inference,
                                      _layer_seeds(seeds, name, "program"), _layer_seeds(seeds, name, "forward"),
                                      None if programmed is None else programmed[name])
    return layers


def _layer_seeds(seeds: list[int], name: str, use: str) -> list[int]:
    """Layer ``name``'s seeds for ``use`` ("program" or "forward") in the repeats ``seeds``: one rule, so that a
    group's programming drawn in parts (``programmed_states``) is what ``repeated_layers`` draws."""
    return [layer_seed(seed, name, use) for seed in seeds]


# Sizes read as values that scale with the batch: (target, dim read; None: the element count). torch.export
# writes ``x.shape[0]`` of a dynamic batch as ``aten.sym_size.int(x, 0)``. torch.fx's ``call_method`` ``size`` is
# left out on purpose: it is traced from plain nn.Modules whose graphs the evaluator checks and, failing the check,
# runs one repeat at a time (tests/test_repeats.py keeps such a graph on the tile path).
_SIZE_READS: dict[Any, int | None] = {
    torch.ops.aten.sym_size.int: 0,
    torch.ops.aten.size.int: 0,
    torch.ops.aten.sym_numel.default: None,
}


def _batch_nodes(gm: fx.GraphModule) -> set[fx.Node]:
    """Nodes whose value derives from the inputs (so a tensor among them may carry the batch dimension)."""
    batch: set[fx.Node] = set()
    for node in gm.graph.nodes:
        if node.op == "placeholder" or any(i in batch for i in node.all_input_nodes):
            batch.add(node)
    return batch


def _reads_batch_size(node: fx.Node, batch_nodes: set[fx.Node]) -> bool:
    """Whether ``node`` reads, as a value, a size that scales with the batch (dim 0 or the element count) of a
    tensor computed from the inputs."""
    if node.op != "call_function" or node.target not in _SIZE_READS or not node.args:
        return False
    source = node.args[0]
    if not isinstance(source, fx.Node) or source not in batch_nodes:
        return False
    wanted = _SIZE_READS[node.target]
    if wanted is None:
        return True
    dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
    if isinstance(dim, int) and dim < 0:  # a negative dim is the batch only counted from the tensor's rank
        meta = source.meta.get("val")
        dim = dim + meta.dim() if isinstance(meta, torch.Tensor) else None
    return dim == wanted


def _batch_symbols(gm: fx.GraphModule) -> set[str]:
    """The symbols of the inputs' leading dimension in a graph exported with a dynamic batch (empty otherwise)."""
    symbols = set()
    for node in gm.graph.nodes:
        meta = node.meta.get("val") if node.op == "placeholder" else None
        if isinstance(meta, torch.Tensor) and meta.dim() >= 1 and isinstance(meta.shape[0], torch.SymInt):
            symbols.add(str(meta.shape[0]))
    return symbols


def _has_tensor(value: Any) -> bool:
    return any(isinstance(leaf, torch.Tensor) for leaf in pytree.tree_leaves(value))


class FoldedRunner(fx.Interpreter):
    """Interprets ``gm`` with the lowered layers replaced by repeat-vectorized ones (see the module docstring).

    A node runs folded when it is a lowered layer fed by a folded value or any other node with a folded input;
    the output node always does (every output carries R*B samples). A folded node reads each shared input through
    ``folded_value``, per use: the shared value itself stays what unfolded nodes see (B samples).
    """

    def __init__(self, gm: fx.GraphModule, layers: dict[str, Any], repeats: int) -> None:
        super().__init__(gm)
        self.layers, self.repeats = layers, repeats
        self.batch_nodes = _batch_nodes(gm)
        self.size_reads = {node for node in gm.graph.nodes if _reads_batch_size(node, self.batch_nodes)}
        self.sized: set[fx.Node] = set(self.size_reads)  # the batch size read, and everything computed from it
        for node in gm.graph.nodes:
            if any(i in self.sized for i in node.all_input_nodes):
                self.sized.add(node)
        self.batch_symbols = _batch_symbols(gm)
        self.placeholders = [node for node in gm.graph.nodes if node.op == "placeholder"]
        self.folded: set[fx.Node] = set()
        self.shadow: dict[fx.Node, Any] = {}  # shared nodes' values for R*B samples, made where folded nodes read them
        self.inputs: dict[fx.Node, Any] = {}
        self.batch = 0

    def run(self, *args: Any, initial_env: dict[fx.Node, Any] | None = None) -> Any:
        """The graph's output for all repeats: every tensor that carries the batch is [R*B, ...], repeat-major.

        ``args``: the placeholders' values in order; ``initial_env``: values already computed (the evaluator's
        digital prefix cache, which may hold None for prefix nodes nothing later reads)."""
        self.folded, self.shadow = set(), {}
        # Kept apart from env: an initial env may stand in for the inputs, and a size-derived value is recomputed
        # from them.
        self.inputs = dict(zip(self.placeholders, self.graph.process_inputs(*args)))
        self.batch = self._batch_size(initial_env or {})
        try:
            return super().run(*args, initial_env=initial_env)
        finally:
            self.shadow, self.inputs = {}, {}

    def _batch_size(self, env: dict[fx.Node, Any]) -> int:
        for node in self.placeholders:
            value = self.inputs.get(node, env.get(node))
            if isinstance(value, torch.Tensor) and value.dim() >= 1:
                return value.shape[0]
        raise TraceError("no input tensor carries a batch dimension: repeats cannot be folded into it")

    def run_node(self, node: fx.Node) -> Any:
        folded = node.op == "output" or any(i in self.folded for i in node.all_input_nodes)
        if node.op == "call_module" and node.target in self.layers:
            args, kwargs = self._fetch(node, folded)
            self.folded.add(node)
            return self.layers[node.target](*args, folded=folded, **kwargs)
        if not folded:
            return super().run_node(node)
        args, kwargs = self._fetch(node, True)
        self.folded.add(node)
        with self._set_current_node(node):
            return getattr(self, node.op)(node.target, args, kwargs)

    def _fetch(self, node: fx.Node, folded: bool) -> tuple[tuple, dict[str, Any]]:
        if not folded:  # a lowered layer's shared input: it multiplies all R realizations at once
            return self.fetch_args_kwargs_from_env(node)
        args = fx.node.map_arg(node.args, self.folded_value)
        kwargs = fx.node.map_arg(node.kwargs, self.folded_value)
        for done in self.user_to_last_uses.get(node, []):  # as the interpreter frees env: no later node reads it
            self.shadow.pop(done, None)
        return tuple(args), dict(kwargs)

    def folded_value(self, node: fx.Node) -> Any:
        """``node``'s value for the R*B samples of the folded batch (computed once per run)."""
        if node in self.folded:
            return self.env[node]
        if node in self.shadow:
            return self.shadow[node]
        value = self._shared(node)
        if node in self.size_reads and value is not None and self._shared(node.args[0]) is not None:
            # The size read from a shared tensor: R times larger if that tensor carries the batch.
            source = node.args[0]
            folded = value * self.repeats if self._carries_batch(source, self._shared(source)) else value
        elif node not in self.sized and value is not None:
            folded = self._tile(node, value) if node in self.batch_nodes else value
        elif node.op == "placeholder":
            raise TraceError(f"input {node.name!r} has no value to fold (pass the inputs with the prefix env)")
        else:
            # Computed from the batch size (arange(B), expand(mask, [B, ...]), B * S), or no longer held: computed
            # again for R*B samples, from folded inputs. Tiling a value of arange(B) would index repeat 0 R times.
            args = fx.node.map_arg(node.args, self.folded_value)
            kwargs = fx.node.map_arg(node.kwargs, self.folded_value)
            folded = getattr(self, node.op)(node.target, tuple(args), dict(kwargs))
        self.shadow[node] = folded
        return folded

    def _shared(self, node: fx.Node) -> Any:
        """``node``'s value as computed for B samples, or None where it is no longer held."""
        if node in self.inputs:
            return self.inputs[node]
        return self.env.get(node)

    def _carries_batch(self, node: fx.Node, value: Any) -> bool:
        """Whether the tensor ``value`` of ``node`` has the batch as its leading dimension. A graph exported with a
        dynamic batch says so symbolically (a leading 1 or S that happens to equal B is not the batch);
        otherwise the size decides."""
        if not (isinstance(value, torch.Tensor) and value.dim() >= 1 and value.shape[0] == self.batch):
            return False
        meta = node.meta.get("val")
        if self.batch_symbols and isinstance(meta, torch.Tensor) and meta.dim() >= 1:
            return str(meta.shape[0]) in self.batch_symbols
        return True

    def _tile(self, node: fx.Node, value: Any) -> Any:
        def tile(item: Any) -> Any:
            if isinstance(item, torch.Tensor) and item.dim() >= 1 and item.shape[0] == self.batch:
                return item.repeat(self.repeats, *([1] * (item.dim() - 1)))
            return item

        if isinstance(value, torch.Tensor):
            return tile(value) if self._carries_batch(node, value) else value
        return pytree.tree_map(tile, value)  # a structure (e.g. a split's parts): by size


def folds(gm: fx.GraphModule, layers: dict[str, Any], inputs: Sequence[Any],
          initial_env: dict[fx.Node, Any] | None = None) -> bool:
    """Whether running two repeats folded into the batch gives what two separate runs give (forward noise off).

    ``inputs``: the placeholders' values in graph order (``hetcomp.graph.calls.placeholder_values``);
    ``initial_env``: an optional precomputed prefix (copied, never changed). The outputs may be any structure
    (tuple, dict, ModelOutput) of tensors: each leaf of the folded run is compared with the separate runs' leaves
    joined along the batch (or with the shared leaf where it carries no batch). ``layers``: repeat-vectorized
    layers with at least two realizations (``select`` and ``noise`` as ``RepeatedAnalogLayer`` has them). A run that
    raises does not fold, except one that runs out of memory: that says nothing of the graph, and is raised."""
    pair = {name: layer.select([0, 1]) for name, layer in layers.items()}
    singles = [{name: layer.select([i]) for name, layer in layers.items()} for i in (0, 1)]
    for group in (pair, *singles):
        for layer in group.values():
            layer.noise = False

    def run(group: dict[str, Any], repeats: int) -> tuple[Any, int]:
        runner = FoldedRunner(gm, group, repeats)
        return runner.run(*inputs, initial_env=None if initial_env is None else dict(initial_env)), runner.batch

    try:
        with torch.no_grad():  # a check: nothing to differentiate (and in-place periphery ops refuse autograd)
            together, batch = run(pair, 2)
            apart = [run(single, 1)[0] for single in singles]
    except torch.OutOfMemoryError:
        raise
    except (RuntimeError, ValueError, IndexError, TypeError):
        return False
    return _joined_matches(together, apart, batch)


def _joined_matches(together: Any, apart: list[Any], batch: int) -> bool:
    """Whether the folded run's outputs are the separate runs' outputs joined along the batch (same structure)."""
    leaves, spec = pytree.tree_flatten(together)
    separate = [pytree.tree_flatten(outputs) for outputs in apart]
    if any(other != spec for _, other in separate) or not _has_tensor(leaves):
        return False
    for index, leaf in enumerate(leaves):
        parts = [flat[index] for flat, _ in separate]
        if not isinstance(leaf, torch.Tensor):
            if any(isinstance(part, torch.Tensor) or part != leaf for part in parts):
                return False
            continue
        if not all(isinstance(part, torch.Tensor) and part.dim() == leaf.dim() for part in parts):
            return False
        if leaf.dim() >= 1 and leaf.shape[0] == 2 * batch and all(part.shape[0] == batch for part in parts):
            if not _close(leaf, torch.cat(parts), between=parts):
                return False
        elif not (_close(leaf, parts[0]) and _close(parts[1], parts[0])):  # a leaf without the batch: shared
            return False
    return True


def _close(got: torch.Tensor, expected: torch.Tensor, between: list[torch.Tensor] | None = None) -> bool:
    """Equal up to structure, not float detail: a batch-mixing op gives O(1) differences, while re-associated sums
    flip a quantization level now and then. ``between``: the two repeats' separate outputs; the error must also be
    small beside their difference, or repeats mixed with each other (repeat 0's rows read for repeat 1, which
    differ from them only by programming noise) would pass."""
    if got.shape != expected.shape:
        return False
    if expected.numel() == 0:
        return True
    error = (got.double() - expected.double()).abs().mean()
    if error > 1e-2 * expected.double().abs().mean() + 1e-12:
        return False
    if between is not None:
        spread = (between[0].double() - between[1].double()).abs().mean()
        # Mixing the two repeats gives about half their difference: a tenth of it is far from that.
        return bool(spread == 0 or error <= 0.1 * spread)
    return True


def fold_matches(gm: fx.GraphModule, layers: dict[str, Any], x: torch.Tensor,
                 initial_env: dict[fx.Node, Any] | None) -> bool:
    """``folds`` for a graph of one input ``x``."""
    return folds(gm, layers, [x], initial_env)
