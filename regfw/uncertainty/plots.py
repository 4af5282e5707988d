"""Uncertainty plots: reliability diagram, referral curve, score histograms.

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

__all__ = [
    "new_figure",
    "save_figure",
    "reliability_figure",
    "referral_figure",
    "score_histogram_figure",
    "coverage_figure",
]


def new_figure(figsize: tuple[float, float] = (4.5, 4.0)) -> Figure:
    """A matplotlib Figure on the Agg canvas, independent of pyplot."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=figsize, dpi=100)
    FigureCanvasAgg(fig)
    return fig


def save_figure(fig: Figure, path: str | os.PathLike) -> str:
    """Write ``fig`` as PNG to ``path`` atomically (temporary file + ``os.replace``)."""
    path = os.fspath(path)
    with atomic_open(path, "wb") as fh:
        fig.savefig(fh, format="png", bbox_inches="tight")
    return path


def _np(x: Tensor | Sequence[float]):
    import numpy as np

    if isinstance(x, Tensor):
        return x.detach().double().cpu().numpy()
    return np.asarray(x, dtype=float)


def reliability_figure(data: ReliabilityData, title: str = "Reliability diagram") -> Figure:
    """Bars of accuracy per confidence bin against the diagonal, with the gap shaded and the
    number of inputs per bin below."""
    import numpy as np

    fig = new_figure((4.5, 5.0))
    ax, ax_n = fig.subplots(2, 1, sharex=True, gridspec_kw={"height_ratios": [3, 1]})
    edges = _np(data.edges)
    width = np.diff(edges)
    left = edges[:-1]
    acc = np.nan_to_num(_np(data.accuracy))
    conf = _np(data.confidence)
    centers = left + width / 2
    conf_f = np.where(np.isnan(conf), centers, conf)
    ax.bar(left, acc, width=width, align="edge", edgecolor="black", color="#4c72b0", label="accuracy")
    ax.bar(left, conf_f - acc, bottom=acc, width=width, align="edge", color="#dd8452", alpha=0.4,
           edgecolor="#dd8452", label="gap")
    ax.plot([0, 1], [0, 1], "k--", lw=1, label="perfect calibration")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_ylabel("accuracy")
    ax.set_title(f"{title} (ECE {data.ece:.3f})")
    ax.legend(loc="upper left", fontsize=8)
    ax_n.bar(left, _np(data.count), width=width, align="edge", color="gray", edgecolor="black")
    ax_n.set_xlabel("confidence")
    ax_n.set_ylabel("count")
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
    if correct is None:
        ax.hist(s, bins=edges, color="#4c72b0", alpha=0.8)
    else:
        raw = _np(score)
        c = _np(correct).astype(bool)
        ok = np.isfinite(raw)
        ax.hist(raw[ok & c], bins=edges, alpha=0.6, color="#55a868", label=f"correct ({int((ok & c).sum())})",
                density=True)
        ax.hist(raw[ok & ~c], bins=edges, alpha=0.6, color="#c44e52", label=f"incorrect ({int((ok & ~c).sum())})",
                density=True)
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
