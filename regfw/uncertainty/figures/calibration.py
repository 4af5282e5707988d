"""Calibration figures: the reliability diagram (classification) and the interval coverage
against the nominal level (regression)."""
from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from matplotlib.axes import Axes
from matplotlib.figure import Figure

from regfw.uncertainty.figures.canvas import BLUE, GRAY, RED, array, legend_below, new_figure

if TYPE_CHECKING:  # pragma: no cover
    from regfw.uncertainty.metrics import ReliabilityData

__all__ = ["coverage_figure", "reliability_figure"]


def reliability_figure(data: ReliabilityData, title: str = "Reliability diagram", *,
                       after: ReliabilityData | None = None, temperature: float | None = None) -> Figure:
    """Accuracy per confidence bin against the diagonal, the gap to the bin's mean confidence
    hatched, and the number of inputs per bin (written on each bar) underneath. Only bins that
    hold inputs get bars. With ``after`` (the same data after temperature scaling) a second
    column shows it, and ``title`` heads the figure."""
    columns = [(data, "before calibration")] if after is not None else [(data, title)]
    if after is not None:
        columns.append((after, "after calibration" + (f", T = {temperature:.2f}" if temperature is not None else "")))
    fig = new_figure(4.5 * len(columns), 5.5)
    grid = fig.subplots(2, len(columns), squeeze=False, sharex=True, gridspec_kw={"height_ratios": (3, 1.3)})
    for col, (d, name) in enumerate(columns):
        _reliability_column(grid[0][col], grid[1][col], d, name)
    if after is not None:
        fig.suptitle(title)
        for ax in grid[0]:
            ax.title.set_fontsize("medium")  # under the figure's title
    legend_below(fig, grid[:, 0])
    return fig


def _reliability_column(top: Axes, bottom: Axes, data: ReliabilityData, title: str) -> None:
    edges, count = array(data.edges), array(data.count)
    filled = count > 0  # bars (accuracy and gap) only where inputs fell
    left, width = edges[:-1][filled], (edges[1:] - edges[:-1])[filled]
    acc, conf, n = array(data.accuracy)[filled], array(data.confidence)[filled], count[filled]
    top.bar(left, acc, width=width, align="edge", color=BLUE, edgecolor="black", linewidth=0.8, label="accuracy")
    top.bar(left, conf - acc, width=width, bottom=acc, align="edge", fill=False, edgecolor=RED, hatch="///",
            linewidth=0.8, label="gap to mean confidence")
    top.plot([0, 1], [0, 1], color="black", linestyle="--", linewidth=1, label="perfect calibration")
    top.set(xlim=(0, 1), ylim=(0, 1), ylabel="accuracy", title=f"{title} (ECE {data.ece:.3f})")
    bars = bottom.bar(left, n, width=width, align="edge", color=GRAY, edgecolor="black", linewidth=0.8,
                      label="inputs per bin")
    bottom.bar_label(bars, labels=[f"{int(c)}" for c in n], fontsize="x-small", padding=1)
    peak = float(n.max()) if n.size else 1.0
    bottom.set(xlim=(0, 1), ylim=(0, 1.3 * peak), xlabel="confidence (max prob)", ylabel="inputs")


def coverage_figure(levels: Sequence[float], coverage: Sequence[float]) -> Figure:
    """Observed coverage of the central predictive intervals against their nominal level."""
    fig = new_figure(4.5, 4.75)
    ax = fig.subplots()
    ax.plot([0, 1], [0, 1], color="black", linestyle="--", linewidth=1, label="calibrated (observed = nominal)")
    ax.plot(array(levels), array(coverage), color=BLUE, marker="o", label="observed")
    ax.set(xlim=(0, 1), ylim=(0, 1), title="Interval calibration", xlabel="nominal interval level",
           ylabel="observed coverage")
    ax.grid(alpha=0.3)
    legend_below(fig, [ax])
    return fig
