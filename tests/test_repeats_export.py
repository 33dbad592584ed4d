"""Repeat-vectorized evaluation of torch.export graphs that read the batch size as a value
(hetcomp/lower/repeats.py): a random-init BertModel of all-MiniLM-L6-v2's architecture at tiny sizes (dynamic batch
and sequence length, keyword inputs, a ModelOutput) folds R repeats into the batch and gives what R separate runs
give; the fold check still refuses graphs that mix the samples of a batch or bake the batch size in.

The truth every test compares with is R separate runs of one repeat each (``FoldedRunner`` with R=1 on one
realization, which multiplies an unfolded batch: nothing to fold), with the forward noise off so that both sides
see the same realizations exactly.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
import torch.fx as fx
import torch.nn as nn
import torch.utils._pytree as pytree

import hetcomp
from hetcomp.graph.calls import placeholder_values, set_training
from hetcomp.lower import lowered_modules
from hetcomp.lower.repeats import FoldedRunner, fold_matches, folds, repeated_layers
from hetcomp.zoo.minilm import minilm_config

transformers = pytest.importorskip("transformers")

VOCAB = 60
REPEATS = 3


def _batch(size: int, tokens: int, seed: int) -> dict[str, torch.Tensor]:
    """Token ids with padding masked (every sample at least two tokens; one sample full length)."""
    generator = torch.Generator().manual_seed(seed)
    lengths = torch.randint(2, tokens + 1, (size,), generator=generator)
    lengths[0] = tokens
    mask = (torch.arange(tokens)[None] < lengths[:, None]).long()
    ids = torch.randint(1, VOCAB, (size, tokens), generator=generator) * mask
    return {"input_ids": ids, "attention_mask": mask, "token_type_ids": torch.zeros_like(ids)}


def _tiny_bert() -> nn.Module:
    config = minilm_config(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                           vocab_size=VOCAB, max_position_embeddings=32)
    torch.manual_seed(0)
    return transformers.BertModel(config, add_pooling_layer=False).eval()


@pytest.fixture(scope="module")
def bert() -> tuple[fx.GraphModule, dict[str, Any]]:
    model = _tiny_bert()
    compiled = hetcomp.compile(model, "pcm+digital", example_inputs=_batch(4, 8, 0), strategy="all-analog")
    module = compiled.module
    set_training(module, False)
    assert compiled.graph.meta["hetcomp"]["frontend"] == "export"
    # the premise: the graph reads the batch size and uses it after the first analog layer (attention's view)
    reads = [n for n in module.graph.nodes if n.target is torch.ops.aten.sym_size.int and n.args[1] == 0]
    assert reads and any(u.target is torch.ops.aten.view.default for n in reads for u in n.users)
    return module, lowered_modules(compiled.lowering)


def _quiet(layers: dict[str, Any], indices: list[int]) -> dict[str, Any]:
    chosen = {name: layer.select(indices) for name, layer in layers.items()}
    for layer in chosen.values():
        layer.noise = False
    return chosen


def _prefix_env(gm: fx.GraphModule, layers: dict[str, Any], flat: list[Any]) -> dict[fx.Node, Any]:
    """A digital prefix cache as the evaluator keeps one: values of nodes before the first lowered layer that
    later nodes read, None for the others (placeholders included)."""
    nodes = list(gm.graph.nodes)
    cut = next(i for i, n in enumerate(nodes) if n.op == "call_module" and n.target in layers)
    order = {n: i for i, n in enumerate(nodes)}
    env: dict[fx.Node, Any] = {}
    values = iter(flat)
    interpreter = fx.Interpreter(gm)
    interpreter.env = env
    interpreter.args_iter = values
    for node in nodes[:cut]:
        env[node] = interpreter.run_node(node)
    return {n: (v if any(order[u] >= cut for u in n.users) else None) for n, v in env.items()}


class _Digital:
    """A stand-in repeated layer: the lowered layer's digital weights, the same for every repeat."""

    def __init__(self, weights: tuple[torch.Tensor, torch.Tensor | None], repeats: int) -> None:
        self.weight, self.bias = weights
        self.repeats = repeats

    def __call__(self, x: torch.Tensor, folded: bool = False) -> torch.Tensor:
        out = torch.nn.functional.linear(x, self.weight, self.bias)
        return out if folded else out.repeat(self.repeats, *[1] * (out.dim() - 1))


@pytest.mark.parametrize("size, tokens", [(3, 6), (5, 11)])
def test_folded_bert_with_digital_layers_is_transformers_own_output_repeated(bert, size, tokens):
    """The graph mechanics against an independent truth: with every lowered layer computing its digital weights,
    each of the R folded repeats is what transformers' BertModel gives for the batch."""
    module, lowered = bert
    layers = {name: _Digital(simulator.digital_weights(module.get_submodule(name)), REPEATS)
              for name, simulator in lowered.items()}
    batch = _batch(size, tokens, seed=size)
    with torch.no_grad():
        expected = _tiny_bert()(**batch).last_hidden_state
        hidden = FoldedRunner(module, layers, REPEATS).run(*placeholder_values(module, (), batch)).last_hidden_state
    assert hidden.shape == (REPEATS * size, tokens, 32)
    for repeat in hidden.view(REPEATS, size, tokens, 32):
        torch.testing.assert_close(repeat, expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("size, tokens", [(3, 6), (5, 11)])
def test_exported_bert_folds_repeats_as_separate_runs_give(bert, size, tokens):
    module, lowered = bert
    layers = repeated_layers(module, lowered, [11, 12, 13], 86400.0)
    batch = _batch(size, tokens, seed=size)
    assert (batch["attention_mask"] == 0).any()  # padding: the mask reaches attention
    flat = placeholder_values(module, (), batch)
    with torch.no_grad():
        folded = FoldedRunner(module, _quiet(layers, [0, 1, 2]), REPEATS).run(*flat)
        apart = [FoldedRunner(module, _quiet(layers, [r]), 1).run(*flat) for r in range(REPEATS)]
        cached = FoldedRunner(module, _quiet(layers, [0, 1, 2]), REPEATS).run(
            *flat, initial_env=_prefix_env(module, layers, flat))
    assert type(folded) is type(apart[0])  # the model's own output structure (a ModelOutput)
    hidden = folded.last_hidden_state
    assert hidden.shape == (REPEATS * size, tokens, 32)
    expected = torch.cat([outputs.last_hidden_state for outputs in apart])
    torch.testing.assert_close(hidden, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(cached.last_hidden_state, expected, rtol=1e-5, atol=1e-5)
    # the repeats differ (the comparison could fail), and each is the model run on that realization
    assert (apart[0].last_hidden_state - apart[1].last_hidden_state).abs().max() > 1e-3
    assert folds(module, layers, flat)


class _FirstRepeatForAll:
    """A repeat-vectorized layer that wrongly gives every repeat repeat 0's output (what a fold that indexes the
    batch with arange(B) instead of arange(R*B) does): the repeats differ only by programming noise."""

    def __init__(self, layer: Any) -> None:
        self.layer = layer

    def select(self, indices: list[int]) -> _FirstRepeatForAll:
        return _FirstRepeatForAll(self.layer.select(indices))

    def __setattr__(self, name: str, value: Any) -> None:
        if name == "noise":
            self.layer.noise = value
        else:
            super().__setattr__(name, value)

    def __call__(self, x: torch.Tensor, folded: bool = False) -> torch.Tensor:
        out = self.layer(x, folded)
        repeats = self.layer.repeats
        return out.view(repeats, -1, *out.shape[1:])[:1].expand(repeats, *[-1] * out.dim()).reshape(out.shape)


def test_fold_check_tells_repeats_apart_when_one_repeat_stands_in_for_the_others(bert):
    module, lowered = bert
    layers = repeated_layers(module, lowered, [5, 6], 86400.0)
    flat = placeholder_values(module, (), _batch(4, 7, 2))
    last = [name for name in layers if name.endswith("layer_1_output_dense")]
    assert len(last) == 1
    wrong = {**layers, last[0]: _FirstRepeatForAll(layers[last[0]])}
    with torch.no_grad():
        together = FoldedRunner(module, _quiet(wrong, [0, 1]), 2).run(*flat).last_hidden_state
        apart = torch.cat([FoldedRunner(module, _quiet(layers, [r]), 1).run(*flat).last_hidden_state
                           for r in range(2)])
    # small beside the outputs (a relative tolerance alone would pass it), large beside the repeats' difference
    error = (together - apart).abs().mean()
    assert error < 1e-2 * apart.abs().mean()
    assert error > 0.2 * (apart[:4] - apart[4:]).abs().mean()
    assert folds(module, layers, flat) and not folds(module, wrong, flat)


class _Mixing(nn.Module):
    """Centres activations over the batch after the analog layer: folding would mix repeats."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(5, 6), nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        hidden = self.fc1(x)
        return self.fc2(hidden - hidden.mean(0, keepdim=True))


class _Baked(nn.Module):
    """Turns the batch size into a Python int before the analog layer: torch.export specializes the batch and
    writes the number into the graph, where folding cannot scale it."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(5, 6), nn.Linear(24, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch = int(x.shape[0])
        return self.fc2(self.fc1(x).reshape(batch, -1))


class _SizeUsers(nn.Module):
    """Reads B*T (a scalar computed from the batch size) and uses it on both sides: to flatten the input of the
    second analog layer (unfolded: B*T rows, shared by the repeats) and to flatten the first layer's output
    (folded: R*B*T rows)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(5, 5), nn.Linear(5, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.shape[0] * x.shape[1]
        hidden = self.fc1(x)
        mixed = self.fc2(x.reshape(rows, 5)) + hidden.reshape(rows, -1)
        return mixed.reshape(x.shape[0], x.shape[1], -1)


def _compiled(model: nn.Module, x: torch.Tensor, frontend: str = "auto") -> tuple[fx.GraphModule, dict[str, Any]]:
    torch.manual_seed(0)
    compiled = hetcomp.compile(model.eval(), "pcm+digital", (x,), strategy="all-analog", frontend=frontend)
    set_training(compiled.module, False)
    return compiled.module, repeated_layers(compiled.module, lowered_modules(compiled.lowering), [1, 2], 86400.0)


def test_fold_check_accepts_bert_and_refuses_batch_mixing_and_a_baked_batch_size(bert):
    module, lowered = bert
    layers = repeated_layers(module, lowered, [5, 6], 86400.0)
    with torch.no_grad():
        assert folds(module, layers, placeholder_values(module, (), _batch(4, 7, 1)))
        torch.manual_seed(0)
        x = torch.randn(4, 5)
        mixing, mixing_layers = _compiled(_Mixing(), x)
        assert not folds(mixing, mixing_layers, [x]) and not fold_matches(mixing, mixing_layers, x, None)
        x = torch.randn(4, 4, 5)
        baked, baked_layers = _compiled(_Baked(), x, frontend="export")
        assert not any(n.target is torch.ops.aten.sym_size.int for n in baked.graph.nodes)  # the 4 is a constant
        assert not folds(baked, baked_layers, [x])
        # the same reshape with the batch size read as a value (x.shape[0] in an exported graph) folds
        readable, readable_layers = _compiled(_SizeUsers(), torch.randn(3, 4, 5), frontend="export")
        assert folds(readable, readable_layers, [torch.randn(6, 2, 5)])


def test_a_size_derived_scalar_keeps_the_batch_size_where_a_node_runs_unfolded():
    module, layers = _compiled(_SizeUsers(), torch.randn(3, 4, 5), frontend="export")
    assert any(n.target is torch.ops.aten.sym_size.int for n in module.graph.nodes)
    seen: list[tuple[int, ...]] = []

    class Recording(FoldedRunner):
        def call_function(self, target: Any, args: tuple, kwargs: dict[str, Any]) -> Any:
            if target in (torch.ops.aten.view.default, torch.ops.aten.reshape.default):
                seen.append(tuple(args[0].shape[:1]) + tuple(int(s) for s in args[1]))
            return super().call_function(target, args, kwargs)

    size, tokens = 6, 2
    x = torch.randn(size, tokens, 5)
    with torch.no_grad():
        folded = Recording(module, _quiet(layers, [0, 1]), 2).run(x)
        seen_folded, seen[:] = list(seen), []
        apart = [FoldedRunner(module, _quiet(layers, [r]), 1).run(x) for r in range(2)]
    torch.testing.assert_close(folded, torch.cat(apart), rtol=1e-5, atol=1e-5)
    assert (apart[0] - apart[1]).abs().max() > 1e-3
    # (rows in, shape asked): the input flattened for fc2 (unfolded) to B*T rows; fc1's output (folded, R*B
    # samples) to R*B*T rows; the sum back to R*B samples
    assert sorted(seen_folded) == sorted([(size, size * tokens, 5), (2 * size, 2 * size * tokens, -1),
                                          (2 * size * tokens, 2 * size, tokens, -1)])


class _LastToken(nn.Module):
    """Each sample's last valid token, picked after the analog layer with ``arange(batch)`` (as Hugging Face's
    sequence-classification heads of decoder models pool): the batch indices must cover all R*B folded samples."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(5, 6), nn.Linear(6, 3)

    def forward(self, x: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        hidden = self.fc1(x)
        return self.fc2(hidden[torch.arange(x.shape[0]), lengths - 1])


def test_batch_indices_computed_from_the_batch_size_cover_the_folded_batch():
    torch.manual_seed(0)
    x, lengths = torch.randn(5, 4, 5), torch.tensor([4, 1, 3, 2, 4])
    compiled = hetcomp.compile(_LastToken().eval(), "pcm+digital", (x[:3], lengths[:3]), strategy="all-analog",
                               frontend="export")
    module = compiled.module
    assert any(n.target is torch.ops.aten.arange.default for n in module.graph.nodes)
    layers = repeated_layers(module, lowered_modules(compiled.lowering), [1, 2], 86400.0)
    with torch.no_grad():
        folded = FoldedRunner(module, _quiet(layers, [0, 1]), 2).run(x, lengths)
        apart = [FoldedRunner(module, _quiet(layers, [r]), 1).run(x, lengths) for r in range(2)]
    torch.testing.assert_close(folded, torch.cat(apart), rtol=1e-5, atol=1e-5)
    assert (apart[0] - apart[1]).abs().max() > 1e-3
    assert folds(module, layers, [x, lengths])


def test_outputs_keep_their_structure_and_shared_leaves_are_repeated():
    """Any output structure: a dict with a folded leaf and a leaf computed from the input alone (shared, repeated
    R times, as R separate runs would each give it)."""

    class Both(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(5, 3)

        def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
            return {"analog": self.fc(x), "digital": x.sum(-1)}

    x = torch.randn(4, 5)
    module, layers = _compiled(Both(), x, frontend="export")
    with torch.no_grad():
        out = FoldedRunner(module, _quiet(layers, [0, 1]), 2).run(x)
        apart = [FoldedRunner(module, _quiet(layers, [r]), 1).run(x) for r in range(2)]
    assert isinstance(out, dict) and set(out) == {"analog", "digital"}
    for key in out:
        torch.testing.assert_close(out[key], torch.cat([a[key] for a in apart]))
    torch.testing.assert_close(out["digital"], x.sum(-1).repeat(2))
    assert folds(module, layers, [x])
    assert pytree.tree_structure(out) == pytree.tree_structure(apart[0])
