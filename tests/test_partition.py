"""HILAL's k-means partition and its ablations on constructed descriptors (known answers), and the
degenerate cases (one layer, two layers, identical descriptors, NaN metrics, dynamic ops)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.fx as fx
import torch.nn as nn

import hetcomp
from hetcomp.graph.layers import mappable_nodes
from hetcomp.passes import Pass, PassManager
from hetcomp.passes.base import CompileConfig, CompileContext
from hetcomp.passes.kmeans_split import KMeansSplit
from hetcomp.strategies import resolve


class Chain(nn.Module):
    def __init__(self, depth: int) -> None:
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(4, 4) for _ in range(depth))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = torch.relu(layer(x))
        return x


class SetMetrics(Pass):
    """Writes given descriptors, standing in for the Hessian passes."""

    name = "set_metrics"
    provides = ("hni", "scr")

    def __init__(self, values: list[tuple[float, float]]) -> None:
        self.values = values

    def run(self, gm: fx.GraphModule, ctx: CompileContext) -> fx.GraphModule:
        static = [a for _, a in mappable_nodes(gm) if a.layer.kind == "weight-static"]
        for annotation, (hni, scr) in zip(static, self.values, strict=True):
            annotation.metrics.update(hni=hni, scr=scr)
        return gm


def split(values, strategy="hilal", seed=0):
    model = Chain(len(values))
    gm = hetcomp.trace(model, (torch.randn(2, 4),))
    targets = hetcomp.targets.parse("pcm+digital")
    passes = [SetMetrics(values), *resolve(strategy, targets).build(targets, None)]
    gm = PassManager(passes).run(gm, CompileContext(CompileConfig(targets, seed=seed)))
    return [a for _, a in mappable_nodes(gm)]


def assignment(annotations):
    return [a.assignment for a in annotations]


def test_two_separated_groups_split_sensitive_to_digital():
    values = [(1e-7, 0.1), (2e-7, 0.12), (1.5e-7, 0.11), (5e-6, 0.4), (6e-6, 0.45), (1.2e-7, 0.09)]
    annotations = split(values)
    assert assignment(annotations) == ["pcm", "pcm", "pcm", "digital", "digital", "pcm"]
    assert [a.metrics["cluster"] for a in annotations][3:5] == ["sensitive", "sensitive"]
    reason = annotations[3].reason
    assert reason.startswith("hilal: sensitive cluster by k-means (k=2, 8 restarts")
    # the centroids are reported in original units: the mean of each group
    assert "sensitive centroid hni=5.5e-06, scr=0.425" in reason
    assert "robust centroid hni=1.425e-07, scr=0.105" in reason


def test_single_feature_ablations_follow_their_feature():
    # HNI and SCR disagree: layers 0-1 have large HNI but small SCR, layers 4-5 the reverse
    values = [(9e-6, 0.10), (8e-6, 0.11), (1e-7, 0.12), (1.1e-7, 0.10), (1.2e-7, 0.9), (1e-7, 0.95)]
    assert assignment(split(values, "hni-only")) == ["digital", "digital", "pcm", "pcm", "pcm", "pcm"]
    assert assignment(split(values, "scr-only")) == ["pcm", "pcm", "pcm", "pcm", "digital", "digital"]


def test_same_seed_same_split_and_scale_invariance():
    values = [(1e-7 * (i + 1), 0.1 + 0.05 * i) for i in range(8)]
    first, second = assignment(split(values, seed=4)), assignment(split(values, seed=4))
    assert first == second
    # z-scoring: multiplying a feature by a constant changes nothing
    scaled = [(hni * 1e3, scr) for hni, scr in values]
    assert assignment(split(scaled, seed=4)) == first


def test_degenerate_cases_are_defined():
    # one layer: nothing to compare against -> analog
    (only,) = split([(1e-6, 0.3)])
    assert only.assignment == "pcm" and "nothing to split" in only.reason
    # two layers: each is its own cluster; the larger HNI is sensitive
    assert assignment(split([(1e-6, 0.3), (1e-7, 0.2)])) == ["digital", "pcm"]
    # identical descriptors: all analog, no random split
    assert assignment(split([(1e-6, 0.3)] * 5)) == ["pcm"] * 5
    # NaN HNI (non-positive trace): kept digital; the rest are clustered without it
    annotations = split([(math.nan, math.nan), (1e-7, 0.1), (1.1e-7, 0.1), (5e-6, 0.5), (6e-6, 0.5)])
    assert assignment(annotations) == ["digital", "pcm", "pcm", "digital", "digital"]
    assert "undefined" in annotations[0].reason and annotations[0].metrics["cluster"] == "undefined"
    # all NaN: all digital
    assert assignment(split([(math.nan, math.nan)] * 3)) == ["digital"] * 3


def test_dynamic_ops_go_digital_with_hilal():
    class Attention(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.q, self.k = nn.Linear(8, 8), nn.Linear(8, 8)

        def forward(self, x):
            return torch.softmax(self.q(x) @ self.k(x).transpose(-1, -2), -1)

    gm = hetcomp.trace(Attention(), (torch.randn(2, 3, 8),))
    targets = hetcomp.targets.parse("pcm+digital")
    passes = [SetMetrics([(1e-7, 0.1), (2e-6, 0.4)]), KMeansSplit("digital", "pcm")]
    gm = PassManager(passes).run(gm, CompileContext(CompileConfig(targets)))
    by_kind = {a.layer.name: (a.layer.kind, a.assignment, a.reason) for _, a in mappable_nodes(gm)}
    dynamic = [v for v in by_kind.values() if v[0] == "dynamic"]
    assert dynamic and all(v[1] == "digital" and "no static weights" in v[2] for v in dynamic)


def test_hilal_is_the_default_for_pcm_digital_and_runs_in_compile(digits_model):
    """Which layers hilal puts on PCM depends on the trained weights (float results differ between CPUs), so
    the split is checked against the documented k-means recomputed from the manifest's own descriptors, not
    against a list of layers."""
    from sklearn.cluster import KMeans
    from sklearn.preprocessing import StandardScaler

    model, data = digits_model
    x = next(iter(data["test"]))[0]
    # "block" probes one layer at a time; the CNN is piecewise linear in each layer's weight (ReLU, max-pool),
    # so each Hessian block is positive semi-definite and every probe's v'Hv >= 0: all six HNI/SCR are defined
    # (no "undefined" layer) whatever the trained weights are, and six distinct points make two clusters.
    compiled = hetcomp.compile(model, "pcm+digital", (x,), data=data["train"],
                               hessian=dict(probes=4, max_iter=5, batches=1, estimator="block"))
    manifest = compiled.manifest
    assert manifest.strategy == "hilal"
    clusters = {layer["name"]: layer["metrics"]["cluster"] for layer in manifest.layers}
    assert set(clusters.values()) == {"sensitive", "robust"}
    descriptors = np.array([[layer["metrics"]["hni"], layer["metrics"]["scr"]] for layer in manifest.layers])
    assert np.isfinite(descriptors).all() and (descriptors > 0).all()
    labels = KMeans(n_clusters=2, n_init=8, random_state=manifest.seed).fit_predict(
        StandardScaler().fit_transform(descriptors))
    sensitive_label = int(np.argmax([descriptors[labels == k, 0].mean() for k in (0, 1)]))
    assert [clusters[layer["name"]] for layer in manifest.layers] == [
        "sensitive" if label == sensitive_label else "robust" for label in labels]
    for layer in manifest.layers:  # the partition follows the clusters, and the larger-HNI cluster is digital
        assert layer["assignment"] == ("digital" if clusters[layer["name"]] == "sensitive" else "pcm")
    sensitive = [layer["metrics"]["hni"] for layer in manifest.layers if clusters[layer["name"]] == "sensitive"]
    robust = [layer["metrics"]["hni"] for layer in manifest.layers if clusters[layer["name"]] == "robust"]
    assert sum(sensitive) / len(sensitive) > sum(robust) / len(robust)


def test_strategies_needing_data_say_so():
    with pytest.raises(hetcomp.ConfigError, match="'hni-only' needs data="):
        hetcomp.compile(Chain(3), "pcm+digital", (torch.randn(2, 4),), strategy="hni-only")
