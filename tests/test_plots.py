"""Plots use matplotlib's object API: importing them leaves the user's backend alone, and every plot is a
Figure that saves as a PNG."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from matplotlib.figure import Figure

import hetcomp
from hetcomp import plots
from hetcomp.curvature import plots as curvature_plots
from hetcomp.curvature.failures import FailureAnalysis
from hetcomp.curvature.routing import routing_curve


def test_importing_the_plots_keeps_the_backend_and_never_loads_pyplot():
    script = ("import sys, matplotlib; matplotlib.use('svg'); import hetcomp.plots, hetcomp.curvature.plots, "
              "hetcomp.curvature.study; assert matplotlib.get_backend() == 'svg', matplotlib.get_backend(); "
              "assert 'matplotlib.pyplot' not in sys.modules")
    subprocess.run([sys.executable, "-c", script], check=True)


def test_plot_functions_return_figures_and_save_pngs(tmp_path):
    rows = [{"label": "all-digital", "mac_ratio": 0.0, "mean": 0.98, "std": 0.0},
            {"label": "hilal + LAFT", "mac_ratio": 0.9, "mean": 0.97, "std": 0.004}]
    figure = plots.strategy_comparison_figure(rows, "accuracy")
    assert isinstance(figure, Figure) and figure.axes[0].get_title() == "accuracy"
    path = plots.strategy_comparison(rows, tmp_path / "strategies.png", "accuracy")
    assert path == tmp_path / "strategies.png" and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    analysis = FailureAnalysis(["ideal", "ADC"], {"ideal": [0.0] * 10, "ADC": [0.0] * 9 + [0.2]},
                               {"ideal": 0.0, "ADC": 0.02}, {"ideal": 0.9, "ADC": 0.88}, 0.9, 1, 0.0)
    assert isinstance(curvature_plots.failure_by_decile_figure(analysis, "deciles"), Figure)
    labels = torch.tensor([0, 1, 0, 1])
    digital = torch.nn.functional.one_hot(labels, 2).double()
    curve = routing_curve(digital.flip(-1)[None], digital, labels, fractions=(0.0, 0.5, 1.0))
    assert isinstance(curvature_plots.routing_curve_figure(curve, "routing"), Figure)
    for name, written in [("decile", curvature_plots.failure_by_decile(analysis, tmp_path / "d.png", "deciles")),
                          ("routing", curvature_plots.routing_curve(curve, tmp_path / "r.png", "routing"))]:
        assert written.stat().st_size > 1000, name


@pytest.mark.parametrize("strategy", ["first-last-digital", "pareto-po"])
def test_manifest_plots_are_figures(tmp_path, strategy):
    """Data-free compiles: the assignment bar, and the Pareto front when the pareto search ran."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU(), torch.nn.Linear(8, 8), torch.nn.ReLU(),
                                torch.nn.Linear(8, 4))
    target = "pcm+digital" if strategy == "first-last-digital" else "sram+reram+photonic"
    chosen = strategy if strategy != "pareto-po" else hetcomp.strategies.pareto(population=8, generations=5,
                                                                                 remap=False)
    manifest = hetcomp.compile(model, target, (torch.randn(2, 8),), strategy=chosen).manifest
    assert isinstance(plots.assignment_bar_figure(manifest), Figure)
    assert plots.hni_scr_scatter_figure(manifest) is None  # no Hessian metrics without data
    if strategy == "pareto-po":
        assert isinstance(plots.pareto_front_figure(manifest, final=None), Figure)
    written = plots.write_all(manifest, tmp_path)
    assert all(p.stat().st_size > 1000 for p in written)
    assert [p.name for p in written] == ["assignment.png"] + (["pareto_front.png"] if strategy == "pareto-po" else [])
