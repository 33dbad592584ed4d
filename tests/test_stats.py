"""hetcomp.stats: two-way bootstrap intervals (repeats x test samples), the sample-paired difference, and the
per-sample correctness matrix that matches hetcomp.evaluate's repeats."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import hetcomp
from hetcomp.stats import bootstrap_accuracy, bootstrap_difference, bootstrap_repeats, correctness, spearman


def test_sample_interval_has_the_binomial_width():
    # one repeat, 2000 Bernoulli(0.9) samples: the interval is the sampling interval, +-1.96 sqrt(p(1-p)/n)
    rng = np.random.default_rng(0)
    correct = rng.random((1, 2000)) < 0.9
    interval = bootstrap_accuracy(correct, draws=4000)
    expected = 2 * 1.96 * np.sqrt(0.9 * 0.1 / 2000)
    assert interval.low < correct.mean() < interval.high
    assert abs((interval.high - interval.low) / expected - 1) < 0.15
    # switched off, the sample part vanishes (one repeat: no repeat spread either)
    assert bootstrap_accuracy(correct, over_samples=False).high == pytest.approx(correct.mean())


def test_repeat_spread_is_part_of_the_interval():
    # every repeat gets all samples right or 10% wrong at random: half the repeats are bad. Only repeats vary,
    # so the interval is that of a mean of 20 two-valued repeats, whatever the number of samples.
    repeats, samples = 20, 5000
    correct = np.ones((repeats, samples), dtype=bool)
    correct[::2, : samples // 10] = False
    both = bootstrap_accuracy(correct, draws=4000)
    samples_only = bootstrap_accuracy(correct, draws=4000, over_repeats=False)
    expected = 2 * 1.96 * 0.05 / np.sqrt(repeats)  # per-repeat values 1.0 / 0.9: std 0.05
    assert abs((both.high - both.low) / expected - 1) < 0.2
    assert (samples_only.high - samples_only.low) < 0.5 * (both.high - both.low)
    over_repeats = bootstrap_repeats(correct.mean(axis=1), draws=4000)
    assert abs((over_repeats.high - over_repeats.low) / expected - 1) < 0.2


def test_paired_difference_separates_what_marginal_intervals_cannot():
    # b fails the same 100 hard images as a, plus 20 more, in every repeat: a is better by 2 points. Marginal
    # intervals (each +-1.9 points over 1000 samples) overlap; the sample-paired difference does not include 0.
    repeats, samples = 10, 1000
    rng = np.random.default_rng(1)
    a = np.ones((repeats, samples), dtype=bool)
    a[:, :100] = False
    b = a.copy()
    b[:, 100:120] = False
    base = a.copy()

    def noisy(matrix):  # a little independent repeat noise
        return matrix ^ (rng.random((repeats, samples)) < 0.005)

    a, b = noisy(a), noisy(b)
    ia, ib = bootstrap_accuracy(a), bootstrap_accuracy(b)
    difference = bootstrap_difference(a, b)
    assert not ia.disjoint(ib)
    assert difference.excludes_zero and difference.low > 0.01
    # and the paired test is not a rubber stamp: equal strategies give an interval around 0
    same = bootstrap_difference(a, noisy(base))
    assert not same.excludes_zero
    with pytest.raises(ValueError, match="same samples"):
        bootstrap_difference(a, b[:, :-1])


def test_repeats_seeded_alike_are_paired():
    # Repeat r of both strategies shares its hardware draw (hetcomp seeds repeats by (seed, r)): here repeat r is
    # good or bad for both alike, and b loses 5 extra images of 2000 in every repeat. Paired over repeats the
    # difference is resolved; resampling each one's repeats independently adds the repeat spread twice and is not.
    rng = np.random.default_rng(3)
    repeats, samples = 20, 2000
    bad = rng.random(repeats) < 0.5
    a = np.ones((repeats, samples), dtype=bool)
    a[bad, :200] = False  # a bad repeat loses 10%
    b = a.copy()
    b[:, 1000:1005] = False
    paired = bootstrap_difference(a, b)
    assert paired.excludes_zero and paired.low > 0
    assert not bootstrap_difference(a, b, paired_repeats=False).excludes_zero
    assert bootstrap_difference(a, a).high == 0.0  # identical results: exactly no difference
    with pytest.raises(ValueError, match="same number of repeats"):
        bootstrap_difference(a, b[:5], paired_repeats=True)


def test_spearman_on_a_monotone_and_a_reversed_relation():
    x = [1, 2, 3, 4, 5, 6]
    assert spearman(x, [v**3 for v in x])[0] == pytest.approx(1.0)
    assert spearman(x, [-v for v in x])[0] == pytest.approx(-1.0)


@pytest.mark.parametrize(("strategy", "exact_tiles"), [("first-last-digital", False), ("first-last-digital", True),
                                                      ("all-digital", False)])
def test_correctness_rows_are_evaluates_repeats(digits_model, strategy, exact_tiles):
    model, data = digits_model
    x = next(iter(data["test"]))[0]
    compiled = hetcomp.compile(model, "pcm+digital", (x,), strategy=strategy)
    evaluation = compiled.evaluate(data["test"], repeats=3, seed=7, exact_tiles=exact_tiles)
    # fold_bytes=1: after the first group of two repeats, one repeat per group
    matrix = correctness(compiled.module, compiled.lowering, data["test"], repeats=3, seed=7, fold_bytes=1,
                         exact_tiles=exact_tiles)
    assert evaluation.method == ("tiles (exact_tiles=True)" if exact_tiles else
                                 "vectorized" if strategy != "all-digital" else "exact (no analog layer)")
    assert matrix.shape == (3, len(data["test"].dataset)) and matrix.dtype == torch.bool
    assert matrix.double().mean(1).tolist() == pytest.approx(evaluation.accuracies, abs=1e-12)
    if strategy != "all-digital":  # the repeats differ sample by sample (programming noise is on)
        assert not all(torch.equal(matrix[0], row) for row in matrix[1:])
    else:  # no analog layer: every repeat is the digital model's answer
        with torch.no_grad():
            truth = torch.cat([model(images).argmax(-1) == labels for images, labels in data["test"]])
        assert all(torch.equal(row, truth) for row in matrix)
