"""Plots people would rather see than read.

Built with matplotlib's object API (``matplotlib.figure.Figure``), never pyplot: importing this module or
drawing a plot leaves the user's backend (e.g. a notebook's) alone. Each ``*_figure`` function returns the
Figure (to show, restyle or save in another format); the function of the same name without the suffix
saves it as a PNG (``save``, atomically) and returns the path.
"""

from __future__ import annotations

import io
import math
from pathlib import Path

import matplotlib
import matplotlib.ticker
from matplotlib.figure import Figure

from hetcomp.errors import ConfigError
from hetcomp.manifest import Manifest
from hetcomp.storage import write_atomic

TARGET_COLORS = {"digital": "#4c72b0", "pcm": "#dd8452", "sram": "#55a868", "reram": "#c44e52",
                 "photonic": "#8172b3"}


def palette(index: int) -> tuple[float, float, float, float]:
    """The ``index``-th colour of matplotlib's tab10 cycle (wrapping around)."""
    return matplotlib.colormaps["tab10"](index % 10)


def _color(target: str, index: int) -> str | tuple:
    """A built-in target's colour; a variant named after one (``photonic4``) gets its family's colour."""
    family = next((name for name in TARGET_COLORS if target.startswith(name)), None)
    return TARGET_COLORS[family] if family else palette(index)


def save(fig: Figure, path: str | Path) -> Path:
    """Write ``fig`` to ``path`` as a PNG (120 dpi, tight bounding box), atomically; returns the path."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=120, bbox_inches="tight")
    return write_atomic(Path(path), buffer.getvalue())


def assignment_bar_figure(manifest: Manifest) -> Figure:
    """Per-layer bar: share of output rows on each target (whole-layer assignments are one colour)."""
    layers = manifest.layers
    targets = [t["name"] for t in manifest.targets]
    fig = Figure(figsize=(8, 0.45 * len(layers) + 1.6))
    ax = fig.subplots()
    names = [f"{layer['name']} ({'static' if layer['kind'] == 'weight-static' else 'dynamic'})" for layer in layers]
    left = [0.0] * len(layers)
    for index, target in enumerate(targets):
        shares = []
        for layer in layers:
            assignment = layer["assignment"]
            if isinstance(assignment, dict):
                shares.append(assignment.get(target, 0) / layer["rows"])
            else:
                shares.append(1.0 if assignment == target else 0.0)
        ax.barh(names, shares, left=left, color=_color(target, index), label=target)
        left = [a + b for a, b in zip(left, shares)]
    for position, layer in enumerate(layers):
        ax.text(1.01, position, f"{layer['macs']:,} MACs", va="center", fontsize=8)
    ax.invert_yaxis()
    ax.set_xlim(0, 1)
    ax.set_xlabel("share of the layer's output rows")
    ratio = ", ".join(f"{t} {r:.1%}" for t, r in manifest.summary["mac_ratio"].items())
    ax.set_title(f"{manifest.model['class']} on {manifest.target_set} — {manifest.strategy}\nMAC ratio: {ratio}",
                 fontsize=10)
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.12 - 0.2 / max(len(layers), 1)), ncol=len(targets),
              frameon=False)
    return fig


def assignment_bar(manifest: Manifest, path: str | Path) -> Path:
    """``assignment_bar_figure`` saved to ``path``."""
    return save(assignment_bar_figure(manifest), path)


def hni_scr_scatter_figure(manifest: Manifest, color_by: str = "assignment") -> Figure | None:
    """Layers in the (HNI, SCR) plane, coloured by assignment (or a metric key such as a cluster id).

    Returns None when no layer has finite HNI and SCR (no Hessian metrics in the manifest).
    """
    points = [(layer["name"], layer["metrics"].get("hni"), layer["metrics"].get("scr"), layer)
              for layer in manifest.layers]
    points = [(n, h, s, layer) for n, h, s, layer in points
              if isinstance(h, float) and isinstance(s, float) and h > 0 and math.isfinite(s)]
    if not points:
        return None
    fig = Figure(figsize=(7, 5))
    ax = fig.subplots()
    groups: dict[str, list] = {}
    for name, hni, scr, layer in points:
        key = layer["assignment"] if color_by == "assignment" else layer["metrics"].get(color_by)
        groups.setdefault(str(key), []).append((name, hni, scr))
    for index, (group, members) in enumerate(sorted(groups.items())):
        ax.scatter([m[1] for m in members], [m[2] for m in members], s=60, color=_color(group, index),
                   label=group, edgecolor="black", linewidth=0.5, zorder=3)
        for name, hni, scr in members:
            ax.annotate(name, (hni, scr), textcoords="offset points", xytext=(5, 4), fontsize=8)
    ax.set_xscale("log")
    ax.set_xlabel("HNI = σ²/(2d)·Tr(H)  (log scale)")
    ax.set_ylabel("SCR = λmax / Tr(H)")
    ax.grid(True, which="both", alpha=0.3)
    ax.set_title(f"{manifest.model['class']}: layer sensitivity ({manifest.strategy})", fontsize=10)
    ax.legend(title=color_by)
    return fig


def hni_scr_scatter(manifest: Manifest, path: str | Path, color_by: str = "assignment") -> Path | None:
    """``hni_scr_scatter_figure`` saved to ``path``; None (nothing written) when there is nothing to plot."""
    fig = hni_scr_scatter_figure(manifest, color_by)
    return None if fig is None else save(fig, path)


def strategy_comparison_figure(rows: list[dict], title: str) -> Figure:
    """One row per strategy: mean accuracy with a ±std bar over repeats, labelled with its analog MAC ratio.

    ``rows``: dicts with ``label``, ``mac_ratio``, ``mean``, ``std``. (A dot plot rather than accuracy
    against MAC ratio: mixed strategies crowd near ratio 1, which hides their differences.)
    """
    fig = Figure(figsize=(8, 0.42 * len(rows) + 1.4))
    ax = fig.subplots()
    labels = [f"{row['label']}  (MAC ratio {row['mac_ratio']:.3f})" for row in rows]
    for position, row in enumerate(rows):
        color = TARGET_COLORS["digital"] if row["mac_ratio"] == 0 else TARGET_COLORS["pcm"]
        ax.errorbar(row["mean"], position, xerr=row["std"], fmt="s" if "LAFT" in row["label"] else "o",
                    color=color, capsize=3, markersize=7, markeredgecolor="black", markeredgewidth=0.5)
        ax.text(row["mean"] + row["std"], position, f"  {row['mean']:.4f}", va="center", fontsize=8)
    ax.set_yticks(range(len(rows)), labels, fontsize=9)
    ax.invert_yaxis()
    ax.set_xlabel("test accuracy (mean ± std over independent repeats; squares: with LAFT)")
    ax.grid(True, axis="x", alpha=0.3)
    ax.margins(x=0.1)  # room for the value labels
    ax.set_title(title, fontsize=10)
    return fig


def strategy_comparison(rows: list[dict], path: str | Path, title: str) -> Path:
    """``strategy_comparison_figure`` saved to ``path``."""
    return save(strategy_comparison_figure(rows, title), path)


def write_all(manifest: Manifest, directory: str | Path) -> list[Path]:
    """Assignment bar, the (HNI, SCR) scatter when the manifest has Hessian metrics (coloured by
    k-means cluster when the strategy clustered, else by assignment), and the Pareto front and row-remap
    trajectory when the pareto strategy ran."""
    directory = Path(directory)
    written = [assignment_bar(manifest, directory / "assignment.png")]
    if manifest.extra.get("pareto"):
        remap = manifest.extra.get("row_remap")
        final = (remap["trajectory"][-1]["latency_s"], remap["trajectory"][-1]["energy_j"]) if remap else None
        written.append(pareto_front(manifest, directory / "pareto_front.png", final=final))
    if manifest.extra.get("row_remap"):
        written.append(row_remap_trajectory(manifest, directory / "row_remap.png"))
    clustered = any("cluster" in layer["metrics"] for layer in manifest.layers)
    scatter = hni_scr_scatter(manifest, directory / "hni_scr.png", color_by="cluster" if clustered else "assignment")
    if scatter is not None:
        written.append(scatter)
    return written


def si_scale(values: list[float], unit: str) -> tuple[float, str]:
    """A factor and unit label that bring the largest of ``values`` into [1, 1000)."""
    top = max(abs(v) for v in values) if values else 1.0
    for factor, prefix in ((1, ""), (1e3, "m"), (1e6, "µ"), (1e9, "n"), (1e12, "p")):
        if top * factor >= 1:
            return factor, f"{prefix}{unit}"
    return 1e12, f"p{unit}"


def pareto_front_figure(manifest: Manifest, baselines: dict[str, tuple[float, float]] | None = None,
                        final: tuple[float, float] | None = None) -> Figure:
    """Stage-1 front (latency vs energy) with the chosen point marked; optional baselines and the point
    row remap ended at (``final``), all as (latency s, energy J)."""
    pareto = manifest.extra.get("pareto")
    if not pareto:
        raise ConfigError("the manifest has no Pareto front (extra['pareto']): compile with strategy='pareto' or "
                          "'pareto-po' to plot one")
    front = pareto["front"]
    points = [(p["latency_s"], p["energy_j"]) for p in front] + list((baselines or {}).values())
    points += [final] if final is not None else []
    t_scale, t_unit = si_scale([p[0] for p in points], "s")
    e_scale, e_unit = si_scale([p[1] for p in points], "J")
    latency = [p["latency_s"] * t_scale for p in front]
    energy = [p["energy_j"] * e_scale for p in front]
    fig = Figure(figsize=(6.4, 4.6))
    ax = fig.subplots()
    ax.plot(latency, energy, "o-", color="#8172b3", markersize=3, linewidth=1, label=f"Pareto front ({len(front)})")
    chosen = pareto["chosen"]
    ax.plot(latency[chosen], energy[chosen], "*", color="black", markersize=14, label="chosen (stage 1)")
    for index, (name, (lat, en)) in enumerate((baselines or {}).items()):
        ax.plot(lat * t_scale, en * e_scale, "s", color=palette(index), label=name)
    if final is not None:
        ax.plot(final[0] * t_scale, final[1] * e_scale, "P", color="#c44e52", markersize=11, label="after row remap")
    all_latency = [p[0] for p in points]
    log = max(all_latency) > 10 * min(all_latency)  # log scale only when latencies span a decade
    if log:
        ax.set_xscale("log")
        ax.xaxis.set_major_formatter(matplotlib.ticker.FormatStrFormatter("%g"))
        ax.xaxis.set_minor_formatter(matplotlib.ticker.FormatStrFormatter("%g"))
        ax.tick_params(axis="x", which="minor", labelsize=7)
    ax.set_xlabel(f"latency ({t_unit}, {pareto['samples']:g} sample{'s' if pareto['samples'] != 1 else ''}"
                  + ("; log scale)" if log else ")"))
    ax.set_ylabel(f"energy ({e_unit})")
    ax.set_title(f"{manifest.model['class']} on {manifest.target_set}: latency vs energy", fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8, loc="upper left")
    if baselines:  # the front is small next to the baselines: show it enlarged
        inset = ax.inset_axes([0.47, 0.1, 0.48, 0.36])
        inset.plot(latency, energy, "o-", color="#8172b3", markersize=2, linewidth=1)
        inset.plot(latency[chosen], energy[chosen], "*", color="black", markersize=10)
        if final is not None:
            inset.plot(final[0] * t_scale, final[1] * e_scale, "P", color="#c44e52", markersize=8)
        inset.set_title("front, enlarged", fontsize=7)
        inset.tick_params(labelsize=6)
        inset.grid(True, alpha=0.3)
    return fig


def pareto_front(manifest: Manifest, path: str | Path, baselines: dict[str, tuple[float, float]] | None = None,
                 final: tuple[float, float] | None = None) -> Path:
    """``pareto_front_figure`` saved to ``path``."""
    return save(pareto_front_figure(manifest, baselines, final), path)


def row_remap_trajectory_figure(manifest: Manifest) -> Figure:
    """Accuracy and latency at each row-remap step, with the digital baseline and tolerance band."""
    remap = manifest.extra.get("row_remap")
    if not remap:
        raise ConfigError("the manifest has no row-remap record (extra['row_remap']): compile with "
                          "strategy='pareto' (with data=) to plot one")
    steps = [s["step"] for s in remap["trajectory"]]
    fig = Figure(figsize=(6.4, 4))
    ax = fig.subplots()
    metric = remap.get("metric", "accuracy")
    baseline = remap[f"baseline_{metric}"]
    ax.plot(steps, [s[metric] for s in remap["trajectory"]], "o-", color="#55a868", label=f"{metric} (validation)")
    ax.axhline(baseline, color="black", linestyle="--", linewidth=1, label="digital")
    band = (baseline - remap["tolerance"], baseline) if remap.get("higher_is_better", True) else (
        baseline, baseline + remap["tolerance"])
    ax.axhspan(*band, color="grey", alpha=0.2, label=f"tolerance {remap['tolerance']:g}")
    ax.set_xlabel(f"row-remap step ({remap['step_rows']} rows each)")
    ax.set_ylabel(metric)
    twin = ax.twinx()
    t_scale, t_unit = si_scale([s["latency_s"] for s in remap["trajectory"]], "s")
    twin.plot(steps, [s["latency_s"] * t_scale for s in remap["trajectory"]], "s:", color="#8172b3", label="latency")
    twin.set_ylabel(f"latency ({t_unit})")
    lines = ax.get_legend_handles_labels()
    more = twin.get_legend_handles_labels()
    ax.legend(lines[0] + more[0], lines[1] + more[1], fontsize=8, loc="lower right")
    ax.set_title(f"Row remap: {remap['stopped']}", fontsize=10)
    return fig


def row_remap_trajectory(manifest: Manifest, path: str | Path) -> Path:
    """``row_remap_trajectory_figure`` saved to ``path``."""
    return save(row_remap_trajectory_figure(manifest), path)
