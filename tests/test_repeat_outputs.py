"""hetcomp.evaluate.RepeatRunner, the one loop over hardware repeats, as the analyses use it: ``repeat_outputs``
(every sample's outputs per repeat) and the curvature study's ``failure_by_decile`` run evaluate's repeats,
vectorized where the graph folds them, and fall back to one repeat at a time where it does not."""

from __future__ import annotations

import torch
from test_repeats import _BakedBatch  # reads the batch size before the first layer: never folds

import hetcomp
from hetcomp.curvature.failures import failure_by_decile, lower_all_analog, profile_target
from hetcomp.evaluate import EvaluationData, RepeatRunner, repeat_outputs
from hetcomp.lower import digital_state_dict


def test_failure_by_decile_runs_vectorized_and_equals_the_tile_path_on_deterministic_profiles(digits_model):
    """The ideal and ADC-only profiles draw no noise, so each repeat's correctness is determined: the vectorized
    path must give the tile path's, sample by sample. The ideal profile is the digital model (independent truth);
    the ADC's 9-bit outputs move the logits by up to about 2 (the next test checks that on the outputs; whether
    that flips a prediction depends on the trained weights, so correctness is not asserted to differ here)."""
    model, data = digits_model
    images, labels = next(iter(data["test"]))
    curvature = torch.rand(len(labels), generator=torch.Generator().manual_seed(0))
    profiles = [(), ("ADC",)]
    vectorized = failure_by_decile(model, (images, labels), curvature, repeats=3, profiles=profiles)
    tiles = failure_by_decile(model, (images, labels), curvature, repeats=3, profiles=profiles, exact_tiles=True)
    assert vectorized.methods == {"ideal": "vectorized", "ADC": "vectorized"}
    assert tiles.methods == {"ideal": "tiles (exact_tiles=True)", "ADC": "tiles (exact_tiles=True)"}
    for name in ("ideal", "ADC"):
        assert vectorized.analog_correct[name].shape == (3, len(labels))
        assert torch.equal(vectorized.analog_correct[name], tiles.analog_correct[name]), name
        assert vectorized.rates[name] == tiles.rates[name]
    with torch.no_grad():
        digital = model(images).argmax(-1) == labels
    assert all(torch.equal(row, digital) for row in vectorized.analog_correct["ideal"])


def test_repeat_outputs_of_a_quantizing_profile_equal_the_tiles_and_differ_from_digital(digits_model):
    model, data = digits_model
    images, _ = next(iter(data["test"]))
    lowered, report = lower_all_analog(model, images[:2], profile_target(("ADC",)))
    vectorized = repeat_outputs(lowered, report, images, repeats=2)
    tiles = repeat_outputs(lowered, report, images, repeats=2, exact_tiles=True)
    with torch.no_grad():
        digital = model(images)
    assert vectorized.shape == (2, len(images), 10) and vectorized.device.type == "cpu"
    torch.testing.assert_close(vectorized, tiles, rtol=1e-4, atol=1e-4)  # measured 1.3e-5
    assert float((vectorized - digital).abs().max()) > 0.5  # ADC rounding moved the logits (measured 2.2)
    assert RepeatRunner.on_inputs(lowered, report, images, 2).method == "vectorized"


def test_repeat_outputs_are_evaluates_repeats_and_do_not_depend_on_grouping(digits_model):
    """With programming noise on, repeat r depends on (seed, r) alone: one repeat per group (fold_bytes=1) or
    fewer repeats give the same rows, each row's accuracy is evaluate's for that repeat on either path, and the
    module is left as it was."""
    model, data = digits_model
    images, labels = next(iter(data["test"]))
    compiled = hetcomp.compile(model, "pcm+digital", (images[:4],), strategy="all-analog")
    module, report = compiled.module, compiled.lowering
    before = digital_state_dict(module, report)
    tile_weights = [m.tile.weight.detach().clone() for m in module.modules() if hasattr(m, "programmed_weights")]
    outputs = repeat_outputs(module, report, images, repeats=4, seed=3)
    assert torch.equal(repeat_outputs(module, report, images, repeats=4, seed=3, fold_bytes=1), outputs)
    assert torch.equal(repeat_outputs(module, report, images, repeats=2, seed=3), outputs[:2])
    assert not torch.equal(outputs[0], outputs[1])  # the repeats differ
    evaluation = compiled.evaluate((images, labels), repeats=4, seed=3)
    assert evaluation.method == "vectorized"
    assert (outputs.argmax(-1) == labels).double().mean(1).tolist() == evaluation.accuracies
    tiles = repeat_outputs(module, report, images, repeats=2, seed=3, exact_tiles=True)
    expected = compiled.evaluate((images, labels), repeats=2, seed=3, exact_tiles=True).accuracies
    assert (tiles.argmax(-1) == labels).double().mean(1).tolist() == expected
    after = digital_state_dict(module, report)
    assert all(torch.equal(before[k], after[k]) for k in before)
    after_tiles = [m.tile.weight for m in module.modules() if hasattr(m, "programmed_weights")]
    assert all(torch.equal(a, b) for a, b in zip(tile_weights, after_tiles, strict=True))




def test_failure_by_decile_falls_back_to_the_tiles_per_profile_where_repeats_do_not_fold():
    """A profile whose graph cannot fold repeats runs one repeat at a time by itself: the same repeats (seeds) as
    exact_tiles=True, so even the noisy profile's correctness equals it sample by sample."""
    torch.manual_seed(0)
    model = _BakedBatch().eval()
    x = torch.randn(64, 4, 5)
    with torch.no_grad():
        labels = model(x).argmax(-1)
    curvature = torch.rand(64, generator=torch.Generator().manual_seed(1))
    profiles = [(), ("PCM",)]
    automatic = failure_by_decile(model, (x, labels), curvature, repeats=3, profiles=profiles)
    tiles = failure_by_decile(model, (x, labels), curvature, repeats=3, profiles=profiles, exact_tiles=True)
    assert set(automatic.methods) == {"ideal", "PCM"}
    assert all(method.startswith("tiles (") and "exact_tiles" not in method for method in automatic.methods.values())
    for name in ("ideal", "PCM"):
        assert torch.equal(automatic.analog_correct[name], tiles.analog_correct[name]), name
    assert automatic.analog_correct["ideal"].all()  # ideal analog is the digital model that made the labels
    assert not automatic.analog_correct["PCM"].all()  # PCM noise flips some samples


def test_the_environment_switch_sends_every_evaluation_to_the_tiles(digits_model, monkeypatch):
    """HETCOMP_EXACT_TILES=1 makes a plain ``evaluate`` (and so LAFT validation, mac-greedy, row remap and the
    curvature study, which all run RepeatRunner) take the reference path: the same values as ``exact_tiles=True``
    with programming noise on, where the vectorized path draws other realizations."""
    model, data = digits_model
    images, labels = next(iter(data["test"]))
    compiled = hetcomp.compile(model, "pcm+digital", (images[:4],), strategy="all-analog")
    reference = compiled.evaluate((images, labels), repeats=3, exact_tiles=True)
    vectorized = compiled.evaluate((images, labels), repeats=3)
    monkeypatch.setenv("HETCOMP_EXACT_TILES", "1")
    switched = compiled.evaluate((images, labels), repeats=3)
    assert vectorized.method == "vectorized" and switched.method == "tiles (HETCOMP_EXACT_TILES=1)"
    assert switched.values == reference.values
    # The switch changed paths: the vectorized path draws other realizations of the same distribution, so its
    # logits differ from the tiles' (accuracies alone may coincide), while the switched run's equal them.
    module, report = compiled.module, compiled.lowering
    tiles = repeat_outputs(module, report, images, repeats=2, exact_tiles=True)
    switched_outputs = repeat_outputs(module, report, images, repeats=2)
    monkeypatch.delenv("HETCOMP_EXACT_TILES")
    folded = repeat_outputs(module, report, images, repeats=2)
    assert torch.equal(switched_outputs, tiles)
    assert float((folded - tiles).abs().max()) > 1e-3


def test_every_repeat_and_chunk_computes_alike_on_any_number_of_ranks(digits_model):
    """On CUDA the folded batch's size picks the matrix kernels, and with them the rounding; and a chunk's read
    noise must not depend on the chunks before it. For evaluate's values to be one process's on any number of
    ranks, each rank's share of the (group, chunk) pairs must hold one process's groups, and every (repeat, chunk)
    output must be one process's, read noise (PCM's ``out_noise``) included: also when ``fold_bytes`` makes the
    groups smaller, and whatever share of the pairs a rank holds."""
    model, data = digits_model
    images, labels = next(iter(data["test"]))
    compiled = hetcomp.compile(model, "pcm+digital", (images[:4],), strategy="all-analog")
    source = EvaluationData((images[:96], labels[:96]), torch.device("cpu"), 32, stage_bytes=1 << 30)

    def runner(repeats, share=None, fold_bytes=None):
        made = RepeatRunner(compiled.module, compiled.lowering, source, range(repeats), seed=2, t_inference=86400.0,
                            fold_bytes=fold_bytes, share=share)
        assert made.method == "vectorized" and made.per_repeat_bytes > 0  # measured by the fold probe
        return made

    def run(repeats, world=1, fold_bytes=None):
        groups, outputs = set(), {}
        for rank in range(world):
            for chunk in runner(repeats, (rank, world) if world > 1 else None, fold_bytes):
                groups.add(tuple(chunk.repeats))
                for repeat, value in chunk.per_repeat():
                    assert (repeat, chunk.index) not in outputs  # every pair on exactly one rank
                    outputs[(repeat, chunk.index)] = value
        return sorted(groups), outputs

    # A budget of three repeats: 8 repeats fold as 3 + 3 + 2, 7 as 3 + 2 + 2 (groups differ by one at most).
    three = int(3 * runner(8).per_repeat_bytes)
    cases = [(8, None, [tuple(range(8))]), (8, three, [(0, 1, 2), (3, 4, 5), (6, 7)]),
             (7, three, [(0, 1, 2), (3, 4), (5, 6)])]
    for repeats, fold_bytes, expected in cases:
        groups, outputs = run(repeats, 1, fold_bytes)
        assert groups == expected
        assert len(outputs) == repeats * 3  # 96 samples in chunks of 32
        assert not torch.equal(outputs[(0, 0)], outputs[(1, 0)])  # the repeats differ
        for world in (2, 3, 5):
            groups_many, outputs_many = run(repeats, world, fold_bytes)
            assert groups_many == expected, (repeats, world, fold_bytes)
            assert outputs_many.keys() == outputs.keys()
            assert all(torch.equal(outputs_many[key], outputs[key]) for key in outputs), (repeats, world)
    # A share's work: 8 repeats in one group over 3 chunks on 2 ranks: chunks [0, 1) and [1, 3).
    assert [(group, list(chunks)) for group, chunks in runner(8, (0, 2)).work] == [(list(range(8)), [0])]
    assert [(group, list(chunks)) for group, chunks in runner(8, (1, 2)).work] == [(list(range(8)), [1, 2])]


def test_shares_are_cut_by_cost_contiguous_and_may_leave_a_rank_idle():
    """``RepeatRunner._owners``: the (group, chunk) pairs in group-major order go to ranks in contiguous shares of
    about equal cost (group size x chunk weight), each pair to the share its cost's midpoint falls in."""
    from types import SimpleNamespace

    def owners(weights, groups, world):
        holder = SimpleNamespace(share=(0, world), source=SimpleNamespace(chunk_weights=lambda: weights))
        return RepeatRunner._owners(holder, groups)

    # Two heavy chunks then four light ones: by count each rank would take 3 chunks (costs 21 and 3); by cost
    # rank 0 takes the first heavy chunk alone (10 against 14).
    assert owners([10.0, 10.0, 1.0, 1.0, 1.0, 1.0], [[0, 1, 2]], 2) == [[0, 1, 1, 1, 1, 1]]
    # Groups weigh by their size: pairs cost 3, 3, 1, 1 (8 in all); by count rank 0 would take the group of 3
    # whole (6 against 2); the second pair's midpoint, 4.5, is past half, so rank 0 takes 3 and rank 1 5.
    assert owners([1.0, 1.0], [[0, 1, 2], [3]], 2) == [[0, 1], [1, 1]]
    # Fewer pairs than ranks: a rank may hold nothing.
    assert owners([1.0], [[0], [1]], 3) == [[0], [2]]
    for world in (2, 3, 5):  # contiguous and in order, whatever the weights
        flat = [rank for row in owners([3.0, 1.0, 7.0, 1.0, 1.0], [[0, 1], [2], [3, 4, 5]], world) for rank in row]
        assert flat == sorted(flat) and flat[0] == 0 and flat[-1] == world - 1


def test_a_shuffling_loader_is_read_in_one_order_without_touching_the_callers_rng():
    """Ranks score their shares of one chunk order, so a shuffling DataLoader must give the same chunks on every
    rank and every pass: it is read from a fixed seed, and the caller's RNG stream is left as it was."""
    from torch.utils.data import DataLoader, TensorDataset

    x = torch.arange(40.0).unsqueeze(1)
    loader = DataLoader(TensorDataset(x, torch.zeros(40, dtype=torch.long)), batch_size=8, shuffle=True)

    def order():
        source = EvaluationData(loader, torch.device("cpu"), 8, stage_bytes=0)  # streamed: read on every pass
        return torch.cat([batch[0] for _, batch in source.indexed_chunks()]).flatten().tolist()

    torch.manual_seed(5)
    state = torch.get_rng_state()
    first = order()
    assert torch.equal(torch.get_rng_state(), state)
    torch.manual_seed(6)  # another caller state: the same order
    assert order() == first and sorted(first) == x.flatten().tolist() and first != sorted(first)


def test_the_fold_probe_is_kept_per_module_and_input_shapes_until_a_module_is_replaced(digits_model, monkeypatch):
    """The fold probe (folding check, working-set measure) depends on the graph, its modules, their dtypes and the
    inputs' shapes, not on weights or values: a later runner of the module on inputs of those shapes reuses it (no
    probe run, no realization drawn for it) with the same groups and outputs; other shapes, a replaced module, a
    dtype, or a check asked for after an unchecked probe run it again; a graph that does not fold is remembered
    too, but only for probes that check (one that takes folding on trust would find otherwise); the probes of
    replaced modules are dropped."""
    import copy
    import gc

    import hetcomp.evaluate as evaluation
    from hetcomp.lower import lowered_modules

    model, data = digits_model
    images, labels = next(iter(data["test"]))
    compiled = hetcomp.compile(model, "pcm+digital", (images[:4],), strategy="all-analog")
    probes = []
    real_probe = evaluation.RepeatRunner._probed

    def counted(self, *args, **kwargs):
        probes.append(self.module)
        return real_probe(self, *args, **kwargs)

    monkeypatch.setattr(evaluation.RepeatRunner, "_probed", counted)

    def runner(module, report, inputs=images[:96], batch_size=32, check=None, fold_bytes=None, repeats=5):
        source = EvaluationData((inputs, torch.zeros(len(inputs), dtype=torch.long)), torch.device("cpu"), batch_size,
                                stage_bytes=1 << 30)
        return RepeatRunner(module, report, source, range(repeats), seed=2, t_inference=86400.0, probe_folding=check,
                            fold_bytes=fold_bytes)

    def outputs(made):
        return {(repeat, chunk.index): value for chunk in made for repeat, value in chunk.per_repeat()}

    module, report = compiled.module, compiled.lowering
    first = runner(module, report)
    assert len(probes) == 1 and first._probe_layers is not None
    first_outputs = outputs(first)
    again = runner(module, report)
    assert len(probes) == 1 and again._probe_layers is None  # kept: nothing ran or was drawn for it
    assert again.per_repeat_bytes == first.per_repeat_bytes > 0
    assert outputs(again).keys() == first_outputs.keys()
    assert all(torch.equal(value, first_outputs[key]) for key, value in outputs(again).items())
    budget = int(2 * first.per_repeat_bytes)  # groups of two: sized by the kept measure alike
    assert [group for group, _ in runner(module, report, fold_bytes=budget).work] == [[0, 1], [2, 3], [4]]
    assert len(probes) == 1
    runner(module, report, batch_size=16)  # other shapes
    assert len(probes) == 2
    name = next(iter(lowered_modules(report)))
    module.set_submodule(name, copy.deepcopy(module.get_submodule(name)))  # a replaced module
    gc.collect()
    replaced = runner(module, report)
    assert len(probes) == 3 and replaced.per_repeat_bytes == first.per_repeat_bytes
    kept = evaluation._FOLD_PROBES[module]
    assert len(kept) == 1 and all(probe.alive() for probe in kept.values())  # the replaced module's probes dropped
    runner(module, report, batch_size=8, check=False)
    runner(module, report, batch_size=8, check=True)  # an unchecked probe does not answer a check
    runner(module, report, batch_size=8)
    assert len(probes) == 5
    key, _ = evaluation._probe_key(module, lowered_modules(report), [images[:8]])
    module.register_buffer("marker", torch.zeros(1, dtype=torch.float64))  # a dtype the module did not hold
    assert evaluation._probe_key(module, lowered_modules(report), [images[:8]])[0] != key
    del module.marker
    assert evaluation._probe_key(module, lowered_modules(report), [images[:8]])[0] == key
    torch.manual_seed(0)
    baked = _BakedBatch().eval()
    x = torch.randn(8, 4, 5)
    lowered, baked_report = lower_all_analog(baked, x[:2], profile_target(("PCM",)))
    methods = [RepeatRunner.on_inputs(lowered, baked_report, x, 3).method for _ in range(2)]
    assert methods == ["tiles (the graph does not fold repeats)"] * 2 and probes[5:] == [lowered]
    trusting = runner(lowered, baked_report, inputs=x, batch_size=8, check=False, repeats=2)
    assert trusting.method == "vectorized" and probes[6:] == [lowered]  # a failed check answers no unchecked probe
