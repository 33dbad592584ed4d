"""Defects found in review, each with the scenario that showed it."""

import pytest
import torch
import torch.nn as nn
from torch.utils.data import DataLoader, TensorDataset

import hetcomp
from hetcomp.errors import ManifestError
from hetcomp.evaluate import evaluate


class Shared(nn.Module):
    """``a`` is called twice: two call sites, one module."""

    def __init__(self):
        super().__init__()
        self.a, self.h = nn.Linear(8, 8), nn.Linear(8, 3)

    def forward(self, x):
        return self.h(self.a(torch.relu(self.a(x))))


def test_a_module_called_twice_is_one_layer_per_call_and_saves_and_loads(tmp_path):
    torch.manual_seed(0)
    model, x = Shared(), torch.randn(4, 8)
    compiled = hetcomp.compile(model, "pcm+digital", (x,), strategy="first-last-digital")
    names = [layer["name"] for layer in compiled.manifest.layers]
    assert len(names) == len(set(names)) == 3 and names[0] == "a" and names[1].startswith("a@")
    assert [layer["assignment"] for layer in compiled.manifest.layers] == ["digital", "pcm", "digital"]
    assert compiled.manifest.summary["mac_ratio"]["pcm"] == pytest.approx(64 / (64 + 64 + 24))
    from hetcomp.lower import tier_sim  # noqa: F401  (the ideal switch lives with the torch simulators)

    lowered = compiled.module
    assert isinstance(lowered.a, nn.Linear)  # the first call stays digital: the module itself is not swapped
    assert any(name.startswith("hetcomp_lowered_a_") for name, _ in lowered.named_children())
    loaded = hetcomp.load(compiled.save(tmp_path / "out"), Shared(), (x,))
    assert [layer["assignment"] for layer in loaded.manifest.layers] == ["digital", "pcm", "digital"]


def test_the_lowered_model_runs_in_eval_mode():
    """aihwkit adds training noise on every forward of a module in training mode: compiled(x) must not."""
    torch.manual_seed(0)
    compiled = hetcomp.compile(Shared(), "pcm+digital", (torch.randn(4, 8),), strategy="all-analog")
    assert not any(module.training for module in compiled.module.modules())


def test_streamed_evaluation_of_a_plain_dataloader_equals_staged():
    """A DataLoader without its own generator draws its seeds from the global RNG when iterated: streaming it
    inside a seeded repeat must not shift that repeat's noise."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3))
    x, y = torch.randn(96, 8), torch.randint(0, 3, (96,))
    compiled = hetcomp.compile(model, "pcm+digital", (x[:2],), strategy="all-analog")
    loader = DataLoader(TensorDataset(x, y), batch_size=32)  # draws its base seed from the global RNG per pass
    staged = evaluate(compiled.module, compiled.lowering, loader, repeats=3, seed=4, batch_size=96)
    streamed = evaluate(compiled.module, compiled.lowering, loader, repeats=3, seed=4, batch_size=96, stage_bytes=0)
    assert streamed.accuracies == staged.accuracies


def test_the_prefix_cache_is_not_recomputed_in_every_repeat():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 3))
    x, y = torch.randn(40, 8), torch.randint(0, 3, (40,))
    compiled = hetcomp.compile(model, "pcm+digital", (x[:2],), strategy="first-last-digital")
    module = compiled.module
    calls = []
    handle = module.get_submodule("0").register_forward_hook(lambda *args: calls.append(1))
    try:
        cached = evaluate(module, compiled.lowering, (x, y), repeats=5, seed=1)
        assert len(calls) == 1  # the digital first layer ran once, for the cache, not once per repeat
        uncached = evaluate(module, compiled.lowering, (x, y), repeats=5, seed=1, prefix_cache_bytes=0)
    finally:
        handle.remove()
    assert cached.accuracies == uncached.accuracies


def test_an_in_memory_manifest_is_validated_like_a_file():
    torch.manual_seed(0)
    model, x = Shared(), torch.randn(4, 8)
    compiled = hetcomp.compile(model, "pcm+digital", (x,), strategy="first-last-digital")
    edited = compiled.manifest
    edited.layers.append(dict(edited.layers[0]))
    with pytest.raises(ManifestError, match="more than once"):
        hetcomp.apply_manifest(model, edited, (x,))


def test_mac_greedy_keeps_layers_pinned_to_analog_lowered_in_every_trial(monkeypatch):
    import hetcomp.finetune.mac_greedy as greedy

    class PinFirst(hetcomp.Pass):
        name = "pin_first"
        provides = ("assignment",)

        def run(self, gm, ctx):
            first = next(a for _, a in hetcomp.mappable_nodes(gm))
            first.assignment, first.reason = "pcm", "pinned by the user"
            return gm

    trials = []
    real = greedy.train_stage

    def recording(gm, targets, analog_layers, *args, **kwargs):
        trials.append(list(analog_layers))
        return real(gm, targets, analog_layers, *args, **kwargs)

    monkeypatch.setattr(greedy, "train_stage", recording)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 3))
    x, y = torch.randn(48, 6), torch.randint(0, 3, (48,))
    hetcomp.compile(model, "pcm+digital", data=(x, y), strategy=hetcomp.strategies.mac_greedy(eval_repeats=1),
                    passes=[PinFirst()], hessian={"probes": 1, "max_iter": 2, "batches": 1},
                    finetune=hetcomp.LAFT(epochs=1, patience=1, val_repeats=1, checkpoint_dir=None))
    assert len(trials) == 2 and all(trial[0] == "0" for trial in trials)  # the pinned layer, in every trial
