"""Uncertainty plots: reliability diagram, referral and risk-coverage curves, score histograms.

matplotlib is imported lazily, only here, and figures are built with the object API on the
Agg canvas (no pyplot state, no display needed). Files are written atomically: to a temporary
file in the target directory, then ``os.replace``, so a reader never sees half a PNG.
"""
from __future__ import annotations

import os
from collections.abc import Sequence
from typing import TYPE_CHECKING

from torch import Tensor

from regfw.atomic import atomic_open

if TYPE_CHECKING:  # pragma: no cover
    from matplotlib.figure import Figure

    from regfw.uncertainty.metrics import ReliabilityData
    from regfw.uncertainty.selective import RiskCoverage

__all__ = [
    "new_figure",
    "save_figure",
    "reliability_figure",
    "referral_figure",
    "score_histogram_figure",
    "coverage_figure",
    "risk_coverage_figure",
    "ood_histogram_figure",
]


def new_figure(figsize: tuple[float, float] = (4.5, 4.0)) -> Figure:
    """A matplotlib Figure on the Agg canvas, independent of pyplot."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=figsize, dpi=80)
    FigureCanvasAgg(fig)
    return fig


def save_figure(fig: Figure, path: str | os.PathLike) -> str:
    """Write ``fig`` as PNG to ``path`` atomically (temporary file + ``os.replace``)."""
    path = os.fspath(path)
    with atomic_open(path, "wb") as fh:
        fig.savefig(fh, format="png")
    return path


def _np(x: Tensor | Sequence[float]):
    import numpy as np

    if isinstance(x, Tensor):
        return x.detach().double().cpu().numpy()
    return np.asarray(x, dtype=float)


def _reliability_panel(ax, ax_n, data: ReliabilityData, title: str) -> None:
    import numpy as np

    edges = _np(data.edges)
    width = np.diff(edges)
    left = edges[:-1]
    count = _np(data.count)
    filled = count > 0  # bars (accuracy and gap) only where samples fell
    acc = _np(data.accuracy)[filled]
    conf = _np(data.confidence)[filled]
    ax.bar(left[filled], acc, width=width[filled], align="edge", edgecolor="black", color="#4c72b0",
           label="accuracy")
    ax.bar(left[filled], conf - acc, bottom=acc, width=width[filled], align="edge", fill=False, hatch="///",
           edgecolor="#c44e52", lw=0.8, label="gap to mean confidence")
    ax.plot([0, 1], [0, 1], "k--", lw=1, label="perfect calibration")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_ylabel("accuracy")
    ax.set_title(f"{title} (ECE {data.ece:.3f})", fontsize=10)
    ax.legend(loc="upper left", fontsize=7)
    ax_n.bar(left[filled], count[filled], width=width[filled], align="edge", color="gray", edgecolor="black")
    top = float(count.max()) if count.size else 1.0
    for x, w, n in zip(left[filled], width[filled], count[filled], strict=True):
        ax_n.text(x + w / 2, n + 0.02 * top, f"{int(n)}", ha="center", va="bottom", fontsize=6)
    ax_n.set_ylim(0, top * 1.25 if top > 0 else 1)
    ax_n.set_xlabel("confidence")
    ax_n.set_ylabel("count")


def reliability_figure(data: ReliabilityData, title: str = "Reliability diagram", *,
                       after: ReliabilityData | None = None, temperature: float | None = None) -> Figure:
    """Accuracy per confidence bin against the diagonal, the gap to the bin's mean confidence
    shaded, and the number of inputs per bin (written on each bar) below. Only bins that hold
    inputs get bars. With ``after`` (the same data after temperature scaling) a second column
    shows it."""
    cols = 1 if after is None else 2
    fig = new_figure((4.5 * cols, 5.0))
    axes = fig.subplots(2, cols, sharex=True, gridspec_kw={"height_ratios": [3, 1]}, squeeze=False)
    _reliability_panel(axes[0][0], axes[1][0], data, title if after is None else "before calibration")
    if after is not None:
        label = "after calibration" + (f", T = {temperature:.2f}" if temperature is not None else "")
        _reliability_panel(axes[0][1], axes[1][1], after, label)
    return fig


def referral_figure(
    fractions: Tensor, values: Tensor, ylabel: str = "accuracy on retained",
    title: str = "Referral curve", marker: float | None = None,
) -> Figure:
    """The metric on the retained inputs against the fraction referred to review."""
    fig = new_figure()
    ax = fig.subplots()
    ax.plot(_np(fractions), _np(values), lw=1.5)
    if marker is not None:
        ax.axvline(marker, color="gray", ls=":", lw=1, label=f"referred {marker:.2f}")
        ax.legend(loc="best", fontsize=8)
    ax.set_xlim(0, 1)
    ax.set_xlabel("fraction referred")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    return fig


def score_histogram_figure(
    score: Tensor, correct: Tensor | None = None, score_name: str = "uncertainty",
    bins: int = 30,
) -> Figure:
    """Histogram of the uncertainty score, split into correct and incorrect when given."""
    import numpy as np

    fig = new_figure()
    ax = fig.subplots()
    s = _np(score)
    s = s[np.isfinite(s)]
    if s.size == 0:
        edges = np.linspace(0, 1, bins + 1)
    else:
        lo, hi = float(s.min()), float(s.max())
        edges = np.linspace(lo, hi if hi > lo else lo + 1e-6, bins + 1)
    # histtype="stepfilled": one polygon per histogram, drawn like the edgeless bars of the default
    # "bar" type, instead of a Rectangle per bin (building those patches was most of the plot time)
    if correct is None:
        ax.hist(s, bins=edges.tolist(), color="#4c72b0", alpha=0.8, histtype="stepfilled")
    else:
        raw = _np(score)
        c = _np(correct).astype(bool)
        ok = np.isfinite(raw)
        for mask, color, label in ((ok & c, "#55a868", "correct"), (ok & ~c, "#c44e52", "incorrect")):
            if mask.any():  # an empty group has no density
                ax.hist(raw[mask], bins=edges.tolist(), alpha=0.6, color=color, label=f"{label} ({int(mask.sum())})",
                        density=True, histtype="stepfilled")
        ax.legend(loc="best", fontsize=8)
        ax.set_ylabel("density")
    ax.set_xlabel(score_name)
    ax.set_title(f"{score_name} by outcome" if correct is not None else score_name)
    return fig


def coverage_figure(levels: Sequence[float], coverage: Sequence[float]) -> Figure:
    """Observed coverage of the central predictive intervals against their nominal level."""
    fig = new_figure()
    ax = fig.subplots()
    ax.plot([0, 1], [0, 1], "k--", lw=1, label="calibrated")
    ax.plot(_np(list(levels)), _np(list(coverage)), "o-", label="observed")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_xlabel("nominal interval level")
    ax.set_ylabel("observed coverage")
    ax.set_title("Interval calibration")
    ax.legend(loc="upper left", fontsize=8)
    return fig


def risk_coverage_figure(rc: RiskCoverage, title: str = "Risk-coverage curve") -> Figure:
    """Selective risk (error rate on the accepted inputs) against coverage, with AURC and AUGRC."""
    fig = new_figure()
    ax = fig.subplots()
    ax.plot(_np(rc.coverage), _np(rc.risk), lw=1.5, label="selective risk")
    for c in (0.8, 0.95):
        ax.axvline(c, color="gray", ls=":", lw=1)
    ax.set_xlim(0, 1)
    ax.set_ylim(bottom=0)
    ax.set_xlabel("coverage (fraction answered)")
    ax.set_ylabel("risk (error rate on answered)")
    ax.set_title(f"{title}\nAURC {rc.aurc:.4f}, AUGRC {rc.augrc:.4f}", fontsize=10)
    ax.grid(alpha=0.3)
    return fig


def ood_histogram_figure(in_scores: dict[str, Tensor], out_scores: dict[str, Tensor], bins: int = 30) -> Figure:
    """One panel per OOD score: histograms of in-distribution against out-of-distribution."""
    import numpy as np

    names = [n for n in in_scores if n in out_scores]
    fig = new_figure((3.2 * max(len(names), 1), 3.0))
    axes = fig.subplots(1, max(len(names), 1), squeeze=False)[0]
    for ax, name in zip(axes, names, strict=False):
        a, b = _np(in_scores[name]), _np(out_scores[name])
        both = np.concatenate([a, b])
        both = both[np.isfinite(both)]
        lo, hi = (float(both.min()), float(both.max())) if both.size else (0.0, 1.0)
        edges = np.linspace(lo, hi if hi > lo else lo + 1e-6, bins + 1)
        ax.hist(a[np.isfinite(a)], bins=edges.tolist(), alpha=0.6, density=True, color="#4c72b0",
                label=f"in ({a.size})", histtype="stepfilled")  # one polygon each, see score_histogram_figure
        ax.hist(b[np.isfinite(b)], bins=edges.tolist(), alpha=0.6, density=True, color="#c44e52",
                label=f"out ({b.size})", histtype="stepfilled")
        ax.set_title(name, fontsize=9)
        ax.legend(fontsize=7)
    return fig
