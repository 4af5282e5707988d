"""Histograms of uncertainty scores: by outcome (correct against incorrect) and in- against
out-of-distribution. Groups are drawn as densities (unit area) over shared bins, so groups of
different sizes compare; the legend gives each group's size."""
from __future__ import annotations

import math

import numpy as np
import torch
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from torch import Tensor

from regfw.uncertainty.figures.canvas import BLUE, GREEN, RED, array, legend_below, new_figure
from regfw.uncertainty.figures.labels import score_label
from regfw.uncertainty.metrics import auroc

__all__ = ["density", "edges", "ood_histogram_figure", "score_histogram_figure"]

#: Panels per row of the OOD figure (five scores: two rows).
_OOD_COLUMNS = 3


def edges(values: np.ndarray, bins: int) -> np.ndarray:
    """``bins + 1`` equal-width edges over the finite ``values`` (a tiny span when all are equal)."""
    finite = values[np.isfinite(values)]
    lo, hi = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 1.0)
    if not hi > lo:
        hi = lo + 1e-6
    return np.linspace(lo, hi, bins + 1)


def density(values: np.ndarray, bin_edges: np.ndarray) -> np.ndarray:
    """The finite ``values`` per bin normalised to unit area (the last bin is closed; zeros when
    none is finite)."""
    finite = values[np.isfinite(values)]
    counts = np.histogram(finite, bins=bin_edges)[0].astype(np.float64)
    if counts.sum() == 0:
        return counts
    return counts / (counts.sum() * np.diff(bin_edges))


def _stairs(ax: Axes, heights: np.ndarray, bin_edges: np.ndarray, color: str, label: str) -> None:
    ax.stairs(heights, bin_edges, fill=True, color=color, alpha=0.55, label=label)
    ax.stairs(heights, bin_edges, color=color, linewidth=1.2)  # the outline where two groups overlap


def score_histogram_figure(score: Tensor, correct: Tensor | None = None, score_name: str = "entropy",
                           task: str = "classification", bins: int = 30) -> Figure:
    """Histogram of the uncertainty score ``score_name``: with ``correct``, the correct and the
    incorrect inputs each as a density; without, the counts of all inputs."""
    s = array(score)
    name = score_label(score_name, task)
    bin_edges = edges(s, bins)
    fig = new_figure(4.5, 4.25)
    ax = fig.subplots()
    if correct is None:
        counts = np.histogram(s[np.isfinite(s)], bins=bin_edges)[0].astype(np.float64)
        _stairs(ax, counts, bin_edges, BLUE, f"validation inputs ({int(np.isfinite(s).sum())})")
        ax.set(title=f"Uncertainty: {name}", ylabel="inputs")
    else:
        ok = array(correct) > 0.5
        for want, color, label in ((True, GREEN, "correct"), (False, RED, "incorrect")):
            group = s[(ok == want) & np.isfinite(s)]
            if group.size:  # an empty group has no density
                _stairs(ax, density(group, bin_edges), bin_edges, color, f"{label} ({group.size})")
        ax.set(title="Uncertainty by outcome", ylabel="density")
    ax.set(xlabel=name, ylim=(0, None))
    legend_below(fig, [ax])
    return fig


def ood_histogram_figure(in_scores: dict[str, Tensor], out_scores: dict[str, Tensor], bins: int = 30) -> Figure:
    """One panel per OOD score held by both: densities of the in-distribution (validation) inputs
    against the out-of-distribution ones, the AUROC of telling them apart in the panel's title
    (every score is "higher = more likely OOD")."""
    names = [n for n in in_scores if n in out_scores]
    cols = min(max(len(names), 1), _OOD_COLUMNS)
    rows = max(1, math.ceil(len(names) / cols))
    fig = new_figure(max(3.5 * cols, 4.5), 3.25 * rows + 0.75)
    grid = fig.subplots(rows, cols, squeeze=False)
    panels = [ax for row in grid for ax in row]
    for ax in panels[max(len(names), 1):]:
        fig.delaxes(ax)  # the empty end of the last row
    panels = panels[:max(len(names), 1)]
    for ax, name in zip(panels, names, strict=False):
        a, b = array(in_scores[name]), array(out_scores[name])
        bin_edges = edges(np.concatenate([a, b]), bins)
        _stairs(ax, density(a, bin_edges), bin_edges, BLUE, f"in distribution ({a.size})")
        _stairs(ax, density(b, bin_edges), bin_edges, RED, f"out of distribution ({b.size})")
        positive = torch.cat([torch.zeros(a.size, dtype=torch.bool), torch.ones(b.size, dtype=torch.bool)])
        separation = auroc(torch.cat([in_scores[name].flatten(), out_scores[name].flatten()]), positive)
        ax.set(title=f"AUROC {separation:.3f}", xlabel=score_label(name), ylabel="density", ylim=(0, None))
        ax.title.set_fontsize("medium")
    if not names:
        panels[0].set(title="no OOD score", xlabel="score", ylabel="density")
    fig.suptitle("OOD detection: scores of the validation inputs against the OOD set")
    legend_below(fig, panels)
    return fig
