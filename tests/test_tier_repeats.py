"""Repeat-vectorized forwards of the torch tier simulators (SRAM/ReRAM PIM, photonic) and of row-split layers
(hetcomp/lower/tier_repeats.py), against the lowered modules' own forwards."""

import copy
import dataclasses
import math

import pytest
import torch
import torch.nn as nn

import hetcomp
from hetcomp import targets
from hetcomp.lower import ROW_SPLIT, tier_sim
from hetcomp.lower.row_split import RowSplit, input_channels, slice_rows
from hetcomp.lower.tier_repeats import RepeatedRowSplit, RepeatedTierLayer
from hetcomp.lower.tier_sim import PhotonicSimulator, PimCrossbarSimulator, UnfoldConv
from hetcomp.zoo import DigitsTransformer

PIM, PHOTONIC = PimCrossbarSimulator(), PhotonicSimulator()
SIMULATORS = {"sram": PIM, "reram": PIM, "photonic": PHOTONIC}
R = 3
SEEDS = [101, 202, 303]
SCALES = (1.0, 3.0, 0.2)  # each repeat's input has its own range: per-repeat max-abs scales matter


def _target(name: str, noise_scale: float = 1.0, loud: bool = False):
    """A tier target; ``loud``: ReRAM with Eq. 1 noise large enough to reach the ADC (at the real parameters it is
    rounded away), photonic with 5% relative noise; ``noise_scale`` multiplies the noise std."""
    target = targets.get(name)
    device = dict(target.device)
    if name == "reram":
        noise = dict(device["conductance_noise"])
        if loud:  # sigma ~ sqrt(f): f x 1e5 -> about 0.7 levels per cell at G_max
            noise["freq_hz"] *= 1e5
        noise["freq_hz"] *= noise_scale**2
        device["conductance_noise"] = noise
    elif name == "photonic":
        device["input_noise_rel"] = (0.05 if loud else device["input_noise_rel"]) * noise_scale
    return dataclasses.replace(target, device=device)


def _quiet(module: nn.Module) -> nn.Module:
    """A copy of a lowered module with its forward noise switched off in its settings (the module's own forward,
    not the repeated one, computes the noise-free reference)."""
    module = copy.deepcopy(module)
    for core in module.modules():
        if isinstance(core, tier_sim.PimCrossbarCore):
            core.settings["conductance_noise"] = None
        elif isinstance(core, tier_sim.PhotonicCore):
            core.settings["input_noise_rel"] = 0.0
    return module


def _layer(kind: str) -> tuple[nn.Module, tuple[int, ...]]:
    """(layer, one repeat's input shape): a Linear on 3-d input spanning 3 crossbars, a grouped strided Conv2d."""
    torch.manual_seed(0)
    if kind == "linear":
        return nn.Linear(300, 24), (4, 5, 300)
    return nn.Conv2d(6, 8, 3, stride=2, padding=1, groups=2), (4, 6, 9, 9)


def _inputs(shape: tuple[int, ...], scales=SCALES) -> torch.Tensor:
    torch.manual_seed(1)
    return torch.cat([s * torch.randn(shape) for s in scales])


def _separate(module: nn.Module, x: torch.Tensor, repeats: int, folded: bool, seeds=None, other=None,
              other_folded=None) -> torch.Tensor:
    """R separate forwards of ``module``, repeat r on its slice of folded inputs (or the shared input), after
    ``torch.manual_seed(seeds[r])`` when given."""
    other_folded = folded if other_folded is None else other_folded
    outputs = []
    for r in range(repeats):
        xr = x.chunk(repeats)[r] if folded else x
        if seeds is not None:
            torch.manual_seed(seeds[r])
        with torch.no_grad():
            if other is None:
                outputs.append(module(xr))
            else:
                outputs.append(module(xr, other.chunk(repeats)[r] if other_folded else other))
    return torch.cat(outputs)


@pytest.mark.parametrize("tier", ["sram", "reram", "photonic"])
@pytest.mark.parametrize("kind", ["linear", "conv"])
@pytest.mark.parametrize("folded", [True, False])
def test_noise_off_folded_equals_separate_forwards(tier, kind, folded):
    layer, shape = _layer(kind)
    lowered = SIMULATORS[tier].lower(layer, _target(tier, loud=True)).eval()
    assert isinstance(lowered, UnfoldConv) == (kind == "conv")
    x = _inputs(shape) if folded else _inputs(shape, scales=(2.0,))
    repeated = SIMULATORS[tier].repeated(lowered, 0.0, [0] * R, SEEDS)
    repeated.noise = False
    got = repeated(x, folded=folded)
    expected = _separate(_quiet(lowered), x, R, folded)
    assert got.shape == expected.shape == (R * shape[0], *expected.shape[1:])
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    if folded:  # the quantization scale is per repeat: one scale over all repeats would differ
        pooled = _quiet(lowered)(x)
        assert not torch.allclose(pooled, expected, rtol=1e-3, atol=1e-4)


@pytest.mark.parametrize("mode", ["both", "a", "b", "none"])
def test_noise_off_dynamic_product_folded_and_shared_operands(mode):
    """a @ b on photonic: either operand folded [R*B, ...] or shared [B, ...] (the runner passes folded=True if
    any is), operands with a transposed memory layout as attention's k^T."""
    lowered = PHOTONIC.lower(None, _target("photonic", loud=True)).eval()
    torch.manual_seed(2)
    a = torch.cat([s * torch.randn(4, 2, 5, 8) for s in SCALES])
    b = torch.cat([s * torch.randn(4, 2, 6, 8) for s in reversed(SCALES)]).transpose(-1, -2)
    a_in, b_in = (a if mode in ("both", "a") else a[:4]), (b if mode in ("both", "b") else b[:4])
    repeated = PHOTONIC.repeated(lowered, 0.0, [0] * R, SEEDS)
    repeated.noise = False
    got = repeated(a_in, b_in, folded=mode != "none")
    expected = _separate(_quiet(lowered), a_in, R, mode in ("both", "a"), other=b_in,
                         other_folded=mode in ("both", "b"))
    assert got.shape == (R * 4, 2, 5, 6)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)


def _row_split(kind: str) -> tuple[RowSplit, tuple[int, ...]]:
    """A layer whose rows run on sram, reram and photonic (a dynamic product: photonic and digital columns)."""
    if kind == "dynamic":
        parts = {"photonic": PHOTONIC.lower(None, _target("photonic", loud=True)), "digital": _MatMulPart()}
        rows = {"photonic": [0, 2, 3, 5], "digital": [1, 4]}
        return RowSplit(parts, rows, {"photonic": "photonic", "digital": None}, 6, -1).eval(), (4, 2, 5, 8)
    layer, shape = _layer(kind)
    out = layer.weight.shape[0]
    tiers = ["sram", "reram", "photonic"]
    # a grouped conv splits in whole groups (4 rows each): sram none, reram group 1, photonic group 0
    rows = ({"sram": [0, 3, 6, 9, 12, 15, 18, 21], "reram": [1, 4, 7, 10, 13, 16, 19, 22],
             "photonic": [2, 5, 8, 11, 14, 17, 20, 23]} if kind == "linear" else
            {"reram": [4, 5, 6, 7], "photonic": [0, 1, 2, 3]})
    parts = {tier: SIMULATORS[tier].lower(slice_rows(layer, index), _target(tier, loud=True))
             for tier, index in rows.items()}
    inputs = None if kind == "linear" else {tier: input_channels(layer, index) for tier, index in rows.items()}
    split = RowSplit(parts, rows, {t: ("photonic" if t == "photonic" else "pim-crossbar") for t in rows}, out,
                     -1 if kind == "linear" else 1, inputs=inputs)
    assert set(rows) <= set(tiers)
    return split.eval(), shape


class _MatMulPart(nn.Module):
    def forward(self, a, b):
        return a @ b


@pytest.mark.parametrize("kind", ["linear", "conv", "dynamic"])
@pytest.mark.parametrize("folded", [True, False])
def test_row_split_noise_off_and_noise_on_equal_separate_forwards(kind, folded):
    """Noise off: R separate forwards of the RowSplit. Noise on: the RowSplit's own forward after
    torch.manual_seed(seed_r), exactly (its parts draw from repeat r's generator in the order the module's parts draw
    from torch's RNG; the digital part runs once)."""
    split, shape = _row_split(kind)
    assert ROW_SPLIT.repeats_unsupported(split) is None
    x = _inputs(shape) if folded else _inputs(shape, scales=(2.0,))
    other = None
    if kind == "dynamic":
        torch.manual_seed(3)
        other = torch.randn(R * 4 if folded else 4, 2, 8, 6)
    call = (x,) if other is None else (x, other)
    repeated = ROW_SPLIT.repeated(split, 0.0, [0] * R, SEEDS)
    assert isinstance(repeated, RepeatedRowSplit)
    quiet = repeated.select(range(R))
    quiet.noise = False
    torch.testing.assert_close(quiet(*call, folded=folded), _separate(_quiet(split), x, R, folded, other=other),
                               rtol=1e-5, atol=1e-6)
    got = repeated(*call, folded=folded)
    assert torch.equal(got, _separate(split, x, R, folded, seeds=SEEDS, other=other))


@pytest.mark.parametrize("tier", ["reram", "photonic"])
@pytest.mark.parametrize("kind", ["linear", "conv"])
def test_noise_on_repeat_r_is_its_own_stream(tier, kind):
    """Repeat r of a folded run is exactly a single-repeat run with its seed (``select`` and a fresh R=1 layer),
    whatever the block size, over two successive calls (two data chunks); on the CPU it is also exactly the
    module's own forward after torch.manual_seed(seed_r)."""
    layer, shape = _layer(kind)
    simulator = SIMULATORS[tier]
    lowered = simulator.lower(layer, _target(tier, loud=True)).eval()
    x, x2 = _inputs(shape), 0.5 * _inputs(shape).flip(0)
    together = simulator.repeated(lowered, 0.0, [0] * R, SEEDS)
    first, second = together(x, folded=True), together(x2, folded=True)
    assert not torch.equal(first.chunk(R)[0], first.chunk(R)[1] * 1.0)
    one_at_a_time = simulator.repeated(lowered, 0.0, [0] * R, SEEDS)
    one_at_a_time.block_bytes = 1  # blocks of one repeat
    assert torch.equal(one_at_a_time(x, folded=True), first)
    for r in range(R):
        for single in (together.select([r]), simulator.repeated(lowered, 0.0, [0], [SEEDS[r]])):
            assert torch.equal(single(x.chunk(R)[r], folded=True), first.chunk(R)[r])
            assert torch.equal(single(x2.chunk(R)[r], folded=True), second.chunk(R)[r])
    assert torch.equal(first, _separate(lowered, x, R, True, seeds=SEEDS))


def _moments(samples: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    samples = samples.double()
    return samples.mean(0), samples.std(0)


@pytest.mark.parametrize("tier", ["reram", "photonic"])
def test_noise_distribution_matches_separate_forwards_and_tells_a_larger_noise_apart(tier):
    """Over 300 repeats of one input, each output's mean and std match 300 forwards of the original module under
    different torch seeds (Monte Carlo), and a module with 1.5x the noise std is told apart."""
    torch.manual_seed(0)
    layer = nn.Linear(200, 16)
    x = torch.randn(6, 200)
    n = 300
    lowered = SIMULATORS[tier].lower(layer, _target(tier, loud=True)).eval()
    repeated = SIMULATORS[tier].repeated(lowered, 0.0, [0] * n, [10_000 + r for r in range(n)])
    mean, std = _moments(repeated(x, folded=False).view(n, *x.shape[:-1], -1))

    def reference(module):
        outputs = []
        for r in range(n):
            torch.manual_seed(50_000 + r)  # streams of their own: not the repeated layer's seeds
            with torch.no_grad():
                outputs.append(module(x))
        return _moments(torch.stack(outputs))

    ref_mean, ref_std = reference(lowered)
    louder_mean, louder_std = reference(SIMULATORS[tier].lower(layer, _target(tier, 1.5, loud=True)).eval())
    assert float(ref_std.mean()) > 0.01 * float(ref_mean.abs().mean())  # the noise really acts
    ratio = float(std.mean() / ref_std.mean())
    louder = float(louder_std.mean() / ref_std.mean())
    # 300 samples per output: ~4% standard error per std; averaged over 96 outputs (correlated within a repeat)
    assert ratio == pytest.approx(1.0, abs=0.08)
    assert louder > 1.25  # the 1.5x noise shows in the outputs' spread ...
    assert abs(float(std.mean() / louder_std.mean()) - 1.0) > 0.08  # ... so the check above would catch it
    z = (mean - ref_mean) / torch.sqrt((std**2 + ref_std**2) / n).clamp_min(1e-12)
    assert float(z.abs().mean()) < 1.3  # |N(0, 1)| averages 0.8
    assert float(z.abs().max()) < 5.0


def test_lsq_learned_steps_and_ideal_mode():
    """A core fine-tuned with LSQ (learned weight step below max-abs, learned input step): in eval, and with
    ``learned_input_steps()``, the repeated forward is the module's own, per seed; ``ideal()`` gives the float
    layer for every repeat."""
    torch.manual_seed(0)
    layer = nn.Linear(40, 10)
    for tier in ("sram", "photonic"):
        core = SIMULATORS[tier].lower(layer, _target(tier, loud=True))
        core.train()
        core(torch.randn(8, 40)).sum().backward()  # the first training forward sets the steps
        with torch.no_grad():
            core.weight_step.mul_(0.7)
            core.input_step.mul_(0.8)
        core.eval()
        assert SIMULATORS[tier].repeats_unsupported(core) is None
        x = _inputs((5, 40))
        for context in (tier_sim.learned_input_steps, _nothing):
            with context():
                got = SIMULATORS[tier].repeated(core, 0.0, [0] * R, SEEDS)(x, folded=True)
                assert torch.equal(got, _separate(core, x, R, True, seeds=SEEDS))
        with tier_sim.ideal():
            got = SIMULATORS[tier].repeated(core, 0.0, [0] * R, SEEDS)(x[:5], folded=False)
            expected = nn.functional.linear(x[:5], core.float_weight(), core.bias).detach()
        torch.testing.assert_close(got, expected.repeat(R, 1))
        core.train()
        reason = SIMULATORS[tier].repeats_unsupported(core)
        assert reason is not None and "training mode" in reason


class _nothing:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def test_peak_bytes_and_blocks_bound_the_working_set():
    """A ReRAM layer with per-repeat conductance noise: blocks of repeats within block_bytes, the same result."""
    torch.manual_seed(0)
    layer = nn.Linear(256, 64)
    lowered = PIM.lower(layer, _target("reram", loud=True)).eval()
    x = torch.randn(8 * 16, 256)
    whole = PIM.repeated(lowered, 0.0, [0] * 8, list(range(8)))
    out = whole(x, folded=True)
    blocked = PIM.repeated(lowered, 0.0, [0] * 8, list(range(8)))
    blocked.block_bytes = 3 * blocked._per_repeat_bytes(x, None, True, False)  # blocks of 3, 3, 2 repeats
    assert torch.equal(blocked(x, folded=True), out)
    assert 0 < blocked.peak_bytes < whole.peak_bytes
    # a repeat's noisy conductances: 2 arrays x 4 slices x 64 x 256 cells (float32), a few temporaries each
    assert whole.peak_bytes > 8 * 2 * 4 * 64 * 256 * 4


def _teacher_task(samples: int = 384):
    """A digits transformer (random init) and inputs labelled by its own digital predictions: digital accuracy 1,
    every error on the tiers comes from their quantization and noise. Small-margin samples are kept half-and-half
    with clear ones, so noise flips some of them from repeat to repeat."""
    torch.manual_seed(0)
    model = DigitsTransformer().eval()
    x = torch.randn(4 * samples, 1, 8, 8)
    with torch.no_grad():
        logits = model(x)
    top2 = logits.topk(2, -1).values
    margin = top2[:, 0] - top2[:, 1]
    order = margin.argsort()
    keep = torch.cat([order[: samples // 2], order[-samples // 2 :]])
    return model, x[keep], logits[keep].argmax(-1)


@pytest.mark.parametrize("tiers", ["sram+reram+photonic", "pcm+sram+photonic"])
def test_multitier_compile_evaluates_vectorized_and_agrees_with_one_repeat_at_a_time(tiers):
    """Every layer split over three tiers (equal-split; attention products on photonic): ``evaluate`` runs
    vectorized, and its per-repeat accuracies agree in distribution with the one-repeat-at-a-time path
    (``exact_tiles=True``: hardware_repeat, the modules' own forwards). With PCM rows the row split composes
    aihwkit's repeated layer (programmed per repeat) with the tier layers."""
    model, x, y = _teacher_task()
    compiled = hetcomp.compile(model, tiers, example_inputs=(x[:8],), strategy="equal-split")
    layers = {layer["name"]: layer["assignment"] for layer in compiled.manifest.layers}
    assert set(layers["blocks.0.fc1"]) == set(tiers.split("+")) and sum(layers["blocks.0.fc1"].values()) == 64
    assert layers["matmul"] == "photonic"
    repeats = 8
    fast = compiled.evaluate((x, y), repeats=repeats, batch_size=128)
    slow = compiled.evaluate((x, y), repeats=repeats, batch_size=128, exact_tiles=True)
    assert fast.method == "vectorized"
    assert slow.method.startswith("tiles")
    assert len(fast.values) == len(slow.values) == repeats
    assert len(set(fast.values)) > 1  # the noise is in the path
    a, b = torch.tensor(fast.values, dtype=torch.float64), torch.tensor(slow.values, dtype=torch.float64)
    se = math.sqrt(float(a.var() + b.var()) / repeats)
    assert abs(float(a.mean() - b.mean())) <= 3 * se + 1 / len(y)
    assert 0.5 < float(a.mean()) < 1.0
    # same seed, same repeats: reproducible
    assert compiled.evaluate((x, y), repeats=repeats, batch_size=128).values == fast.values


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_repeated_runs_on_cuda():
    layer, shape = _layer("conv")
    for tier in ("reram", "photonic"):
        lowered = SIMULATORS[tier].lower(layer, _target(tier, loud=True)).cuda().eval()
        x = _inputs(shape).cuda()
        repeated = SIMULATORS[tier].repeated(lowered, 0.0, [0] * R, SEEDS)
        out = repeated(x, folded=True)
        assert out.is_cuda
        for r in range(R):
            assert torch.equal(repeated.select([r])(x.chunk(R)[r], folded=True), out.chunk(R)[r])
        repeated.noise = False
        torch.testing.assert_close(repeated(x, folded=True), _separate(_quiet(lowered), x, R, True),
                                   rtol=1e-5, atol=1e-5)


def test_repeated_layer_types():
    lowered = PIM.lower(nn.Linear(4, 2), targets.get("sram")).eval()
    assert isinstance(PIM.repeated(lowered, 0.0, [0], [1]), RepeatedTierLayer)
    assert "not a PIM crossbar" in PIM.repeats_unsupported(nn.Linear(4, 2))


def test_programming_drawn_in_parts_builds_the_same_repeats():
    """Ranks that share a group of repeats each draw a part of its programming (hetcomp.evaluate): every lowered
    layer's programmed state drawn for repeats 0-1 and 2-4 apart stacks to the state drawn for 0-4 at once, bit for
    bit, and the layers built from it compute what layers that draw it themselves compute. Here row splits with PCM
    rows (aihwkit's programmed weights) beside SRAM and photonic rows, and a photonic product (nothing programmed)."""
    from hetcomp.lower import lowered_modules
    from hetcomp.lower.repeats import FoldedRunner, programmed_states, repeated_layers

    model, x, _ = _teacher_task()
    compiled = hetcomp.compile(model, "pcm+sram+photonic", example_inputs=(x[:8],), strategy="equal-split")
    module, lowered = compiled.module, lowered_modules(compiled.lowering)
    seeds = [11, 12, 13, 14, 15]
    whole = programmed_states(module, lowered, seeds, 86400.0)
    parts = [programmed_states(module, lowered, part, 86400.0) for part in (seeds[:2], seeds[2:])]
    assert {len(state) for state in whole.values()} == {0, 2}  # the product programs nothing; PCM rows two stacks
    for name, state in whole.items():
        joined = [torch.cat(pieces) for pieces in zip(*(part[name] for part in parts), strict=True)]
        assert len(joined) == len(state)
        assert all(torch.equal(a, b) and a.shape[0] == len(seeds) for a, b in zip(joined, state, strict=True))
    with torch.no_grad():
        drawn = FoldedRunner(module, repeated_layers(module, lowered, seeds, 86400.0), 5).run(x[:16])
        given = FoldedRunner(module, repeated_layers(module, lowered, seeds, 86400.0, whole), 5).run(x[:16])
        other = FoldedRunner(module, repeated_layers(module, lowered, seeds[::-1], 86400.0), 5).run(x[:16])
    assert torch.equal(given, drawn)
    assert not torch.equal(drawn, other)  # the states decide the outputs
