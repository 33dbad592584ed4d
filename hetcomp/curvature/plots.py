"""Figures of the input-curvature study (object API, as in ``hetcomp.plots``: no pyplot, the user's
backend is left alone). ``*_figure`` returns the Figure; the function without the suffix saves it as a PNG
and returns the path."""

from __future__ import annotations

from pathlib import Path

from matplotlib.figure import Figure

from hetcomp.curvature.failures import FailureAnalysis
from hetcomp.curvature.routing import RoutingCurve
from hetcomp.plots import palette, save


def failure_by_decile_figure(analysis: FailureAnalysis, title: str) -> Figure:
    """Analog-only failure rate vs input-curvature decile, one line per non-ideality profile (Fig. 1 style)."""
    fig = Figure(figsize=(7.5, 4.8))
    ax = fig.subplots()
    for index, name in enumerate(analysis.profiles):
        rates = [100 * r for r in analysis.rates[name]]
        deciles = range(1, len(rates) + 1)
        ax.plot(deciles, rates, marker="o", markersize=4, label=name,
                color=palette(index), linewidth=2.2 if name.count("+") == 2 else 1.2)
        intervals = analysis.intervals.get(name)
        if intervals:  # 95% bootstrap interval per decile (repeats and samples)
            ax.fill_between(deciles, [100 * low for low, _ in intervals], [100 * high for _, high in intervals],
                            color=palette(index), alpha=0.15, linewidth=0)
    ax.set_xticks(range(1, len(analysis.rates[analysis.profiles[0]]) + 1))
    ax.set_xlabel("input-curvature decile (1 = flattest, 10 = most curved)")
    ax.set_ylabel("analog-only failure rate (% of digitally-correct samples)\nshaded: 95% interval")
    ax.grid(True, alpha=0.3)
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8, title="non-idealities", title_fontsize=8)
    return fig


def failure_by_decile(analysis: FailureAnalysis, path: str | Path, title: str) -> Path:
    """``failure_by_decile_figure`` saved to ``path``."""
    return save(failure_by_decile_figure(analysis, title), path)


def routing_curve_figure(curve: RoutingCurve, title: str) -> Figure:
    """Accuracy vs fraction of inputs re-run on the digital path, per risk score and for random routing."""
    fig = Figure(figsize=(7.5, 4.8))
    ax = fig.subplots()
    fractions = [100 * f for f in curve.fractions]
    for index, (name, accuracy) in enumerate(curve.accuracy.items()):
        ax.plot(fractions, accuracy, marker="o", markersize=4, color=palette(index),
                label=f"{name} (AUROC {curve.auroc[name]:.3f})")
    ax.plot(fractions, curve.random, linestyle="--", color="gray", label="random routing (expected)")
    ax.set_xscale("symlog", linthresh=5)
    ax.set_xticks(fractions, [f"{f:g}" for f in fractions])
    ax.set_xlabel("inputs routed to digital (%, symlog axis)")
    ax.set_ylabel("accuracy")
    ax.grid(True, which="both", alpha=0.3)
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8)
    return fig


def routing_curve(curve: RoutingCurve, path: str | Path, title: str) -> Path:
    """``routing_curve_figure`` saved to ``path``."""
    return save(routing_curve_figure(curve, title), path)
