"""Partition (HILAL §III-2): k-means with k = 2 on z-scored layer descriptors; sensitive cluster -> digital.

The descriptor is ``features`` of each weight-static layer's metrics: [hni, scr] for ``hilal``, one of
them for the ``hni-only`` / ``scr-only`` ablations. scikit-learn's StandardScaler + KMeans (several
restarts, lowest inertia kept, ``random_state`` = the compile seed) do the work.

The *sensitive* cluster is the one whose centroid is larger on the first feature (HNI for hilal, as
in the paper; SCR for scr-only). Degenerate cases have a defined outcome, recorded in each reason:

- a layer with a NaN/missing feature (non-positive trace estimate) is kept digital: curvature that
  cannot be estimated is not evidence of robustness;
- fewer than two distinguishable descriptors (one layer, or identical descriptors) leave nothing to
  split: those layers all go analog, since HILAL's split is relative and maximises analog use
  (LAFT then recovers accuracy); with two, k-means puts each in its own cluster as usual.
"""

from __future__ import annotations

import math
import warnings

import numpy as np
import torch.fx as fx

from hetcomp import checks
from hetcomp.errors import ConfigError
from hetcomp.graph.layers import WEIGHT_STATIC, mappable_nodes
from hetcomp.passes.assign import assign_layer
from hetcomp.passes.base import CompileContext, Pass


class KMeansSplit(Pass):
    name = "kmeans_split"
    provides = ("assignment", "cluster")

    def __init__(self, digital: str, analog: str, features: tuple[str, ...] = ("hni", "scr"),
                 restarts: int = 8, name: str | None = None) -> None:
        if isinstance(features, str) or not isinstance(features, tuple | list) or not features or \
                not all(isinstance(f, str) for f in features):
            raise ConfigError(f"KMeansSplit features must be a non-empty tuple of metric names such as ('hni', "
                              f"'scr'), got {checks.got(features)}")
        self.digital, self.analog = digital, analog
        self.features = tuple(features)
        self.restarts = checks.integer("restarts", restarts)
        self.requires = ("layers", *self.features)
        if name is not None:
            self.name = name

    def settings(self) -> dict:
        return {"digital": self.digital, "analog": self.analog, "features": list(self.features),
                "restarts": self.restarts}

    def run(self, gm: fx.GraphModule, ctx: CompileContext) -> fx.GraphModule:
        layers = []
        for _, annotation in mappable_nodes(gm):
            if annotation.layer.kind == WEIGHT_STATIC:
                layers.append(annotation)
            else:
                assign_layer(annotation, self.digital, ctx.targets, self.name,
                             "dynamic matrix product: no static weights to characterise")
        described, undefined = [], []
        for annotation in layers:
            values = [annotation.metrics.get(f) for f in self.features]
            finite = all(isinstance(v, int | float) and math.isfinite(v) for v in values)
            (described if finite else undefined).append(annotation)
        for annotation in undefined:
            annotation.metrics["cluster"] = "undefined"
            assign_layer(annotation, self.digital, ctx.targets, self.name,
                         f"{'/'.join(self.features)} undefined (non-positive or missing Hessian trace): "
                         "kept digital as sensitive")
        if not described:
            return gm
        descriptors = np.array([[a.metrics[f] for f in self.features] for a in described], dtype=np.float64)
        if len(np.unique(descriptors, axis=0)) < 2:
            for annotation in described:
                annotation.metrics["cluster"] = "robust"
                assign_layer(annotation, self.analog, ctx.targets, self.name,
                             f"fewer than two distinguishable {self.features} descriptors: nothing to split, "
                             "all go analog")
            return gm
        sensitive, centroids, inertia = self._cluster(descriptors, ctx.seed)
        summary = "; ".join(
            f"{label} centroid " + ", ".join(f"{f}={v:.4g}" for f, v in zip(self.features, centroids[index],
                                                                              strict=True))
            for index, label in ((1, "sensitive"), (0, "robust"))
        )
        how = (f"k-means (k=2, {self.restarts} restarts, inertia {inertia:.4g}) on z-scored "
               f"[{', '.join(self.features)}]; {summary}")
        for annotation, is_sensitive in zip(described, sensitive, strict=True):
            annotation.metrics["cluster"] = "sensitive" if is_sensitive else "robust"
            if is_sensitive:
                assign_layer(annotation, self.digital, ctx.targets, self.name, f"sensitive cluster by {how}")
            else:
                assign_layer(annotation, self.analog, ctx.targets, self.name, f"robust cluster by {how}")
        return gm

    def _cluster(self, descriptors: np.ndarray, seed: int) -> tuple[np.ndarray, np.ndarray, float]:
        """Labels (True = sensitive), centroids in original units as [robust, sensitive], inertia."""
        from sklearn.cluster import KMeans
        from sklearn.preprocessing import StandardScaler

        scaler = StandardScaler()
        scaled = scaler.fit_transform(descriptors)
        kmeans = KMeans(n_clusters=2, n_init=self.restarts, random_state=seed % 2**32)  # sklearn: < 2**32
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # duplicate points: sklearn warns, the result is still defined
            labels = kmeans.fit_predict(scaled)
        centroids = scaler.inverse_transform(kmeans.cluster_centers_)
        sensitive_label = int(np.argmax(centroids[:, 0]))
        order = [1 - sensitive_label, sensitive_label]
        return labels == sensitive_label, centroids[order], float(kmeans.inertia_)
