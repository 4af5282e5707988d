"""Uncertainty plots: reliability diagram, referral and risk-coverage curves, score histograms.

Each function returns a :class:`~regfw.uncertainty.chart.Chart` (the figure as data);
:func:`save_chart` writes it as SVG (the default: written directly, a few milliseconds) or PNG
(drawn with matplotlib, :mod:`regfw.uncertainty.chart_mpl`). Files are written atomically: to a
temporary file in the target directory, then ``os.replace``, so a reader never sees half a file.
"""
from __future__ import annotations

import math
import os
from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from regfw.run.atomic import atomic_open
from regfw.uncertainty.chart import Bars, Chart, Hist, Line, Panel, Text, VLine

if TYPE_CHECKING:  # pragma: no cover
    from regfw.uncertainty.metrics import ReliabilityData
    from regfw.uncertainty.selective import RiskCoverage

__all__ = [
    "FORMATS",
    "save_chart",
    "reliability_figure",
    "referral_figure",
    "score_histogram_figure",
    "coverage_figure",
    "risk_coverage_figure",
    "ood_histogram_figure",
]

#: File formats :func:`save_chart` writes.
FORMATS = ("svg", "png")


def save_chart(chart: Chart, path: str | os.PathLike) -> str:
    """Write ``chart`` to ``path`` atomically (temporary file + ``os.replace``), as SVG or PNG by
    the suffix; only a regular file is ever replaced (a link, FIFO, device or directory at
    ``path`` is an :class:`~regfw.errors.OutputError`, see :func:`regfw.run.atomic.check_target`)."""
    path = os.fspath(path)
    suffix = os.path.splitext(path)[1].lower().lstrip(".")
    if suffix not in FORMATS:
        raise ValueError(f"save_chart: {path!r} should end in .svg or .png")
    if suffix == "svg":
        with atomic_open(path, "w") as fh:
            fh.write(chart.to_svg())
        return path
    from regfw.uncertainty.chart_mpl import to_figure

    fig = to_figure(chart)
    with atomic_open(path, "wb") as fh:
        fig.savefig(fh, format="png")
    return path


def _list(x: Tensor | Sequence[float]) -> list[float]:
    if isinstance(x, Tensor):
        return [float(v) for v in x.detach().double().cpu().flatten().tolist()]
    return [float(v) for v in x]


def _edges(values: Sequence[float], bins: int) -> list[float]:
    """``bins + 1`` equal-width edges over the finite values (a unit-free span when all are equal)."""
    finite = [v for v in values if math.isfinite(v)]
    lo, hi = (min(finite), max(finite)) if finite else (0.0, 1.0)
    if not hi > lo:
        hi = lo + 1e-6
    return [lo + (hi - lo) * i / bins for i in range(bins + 1)]


def _counts(values: Sequence[float], edges: Sequence[float]) -> Tensor:
    """How many of the finite ``values`` fall in each bin of ``edges`` (the last bin is closed)."""
    t = torch.tensor([v for v in values if math.isfinite(v)], dtype=torch.float64)
    if t.numel() == 0:
        return torch.zeros(len(edges) - 1, dtype=torch.float64)
    return torch.histogram(t, bins=torch.tensor(list(edges), dtype=torch.float64)).hist


def _density(values: Sequence[float], edges: Sequence[float]) -> list[float]:
    """:func:`_counts` normalised to unit area (zeros when no value is finite)."""
    counts = _counts(values, edges)
    if counts.sum() == 0:
        return _list(counts)
    widths = torch.tensor([b - a for a, b in zip(edges, edges[1:], strict=False)], dtype=torch.float64)
    return _list(counts / (counts.sum() * widths))


def _reliability_panels(data: ReliabilityData, title: str) -> tuple[Panel, Panel]:
    edges = _list(data.edges)
    count = _list(data.count)
    filled = [i for i, n in enumerate(count) if n > 0]  # bars (accuracy and gap) only where samples fell
    left = [edges[i] for i in filled]
    width = [edges[i + 1] - edges[i] for i in filled]
    acc = [_list(data.accuracy)[i] for i in filled]
    conf = [_list(data.confidence)[i] for i in filled]
    top = Panel(title=f"{title} (ECE {data.ece:.3f})", ylabel="accuracy", xlim=(0, 1), ylim=(0, 1),
                legend="upper left", title_size=11, legend_size=8, marks=[
                    Bars(left, acc, width, label="accuracy"),
                    Bars(left, [c - a for c, a in zip(conf, acc, strict=True)], width, bottom=acc, color=None,
                         edge="#c44e52", hatch=True, label="gap to mean confidence"),
                    Line([0, 1], [0, 1], color="black", width=1, dashed=True, label="perfect calibration")])
    n = [count[i] for i in filled]
    peak = max(n) if n else 1.0
    bottom = Panel(xlabel="confidence", ylabel="count", xlim=(0, 1), ylim=(0, peak * 1.25),
                   marks=[Bars(left, n, width, color="gray"),
                          *(Text(a + w / 2, c + 0.02 * peak, f"{int(c)}", size=7)
                            for a, w, c in zip(left, width, n, strict=True))])
    return top, bottom


def reliability_figure(data: ReliabilityData, title: str = "Reliability diagram", *,
                       after: ReliabilityData | None = None, temperature: float | None = None) -> Chart:
    """Accuracy per confidence bin against the diagonal, the gap to the bin's mean confidence
    hatched, and the number of inputs per bin (written on each bar) below. Only bins that hold
    inputs get bars. With ``after`` (the same data after temperature scaling) a second column
    shows it."""
    if after is None:
        top, bottom = _reliability_panels(data, title)
        return Chart([top, bottom], cols=1, size=(360, 400), row_heights=(3, 1.3))
    label = "after calibration" + (f", T = {temperature:.2f}" if temperature is not None else "")
    t0, b0 = _reliability_panels(data, "before calibration")
    t1, b1 = _reliability_panels(after, label)
    return Chart([t0, t1, b0, b1], cols=2, size=(720, 400), row_heights=(3, 1.3))


def referral_figure(
    fractions: Tensor, values: Tensor, ylabel: str = "accuracy on retained",
    title: str = "Referral curve", marker: float | None = None,
) -> Chart:
    """The metric on the retained inputs against the fraction referred to review."""
    marks: list = [Line(_list(fractions), _list(values))]
    if marker is not None:
        marks.append(VLine(float(marker), label=f"referred {marker:.2f}"))
    return Chart([Panel(marks, title=title, xlabel="fraction referred", ylabel=ylabel, xlim=(0, 1), grid=True,
                        legend="best" if marker is not None else None)])


def score_histogram_figure(
    score: Tensor, correct: Tensor | None = None, score_name: str = "uncertainty",
    bins: int = 30,
) -> Chart:
    """Histogram of the uncertainty score, split into correct and incorrect (each as a density)
    when given."""
    s = _list(score)
    edges = _edges(s, bins)
    if correct is None:
        panel = Panel([Hist(edges, _list(_counts(s, edges)), alpha=0.8)], title=score_name, xlabel=score_name,
                      ylabel="count")
        return Chart([panel])
    ok = [bool(v) for v in _list(correct)]
    marks: list = []
    for want, color, label in ((True, "#55a868", "correct"), (False, "#c44e52", "incorrect")):
        group = [v for v, c in zip(s, ok, strict=True) if c == want and math.isfinite(v)]
        if group:  # an empty group has no density
            marks.append(Hist(edges, _density(group, edges), color=color, label=f"{label} ({len(group)})"))
    return Chart([Panel(marks, title=f"{score_name} by outcome", xlabel=score_name, ylabel="density",
                        legend="best")])


def coverage_figure(levels: Sequence[float], coverage: Sequence[float]) -> Chart:
    """Observed coverage of the central predictive intervals against their nominal level."""
    return Chart([Panel([Line([0, 1], [0, 1], color="black", width=1, dashed=True, label="calibrated"),
                         Line(_list(list(levels)), _list(list(coverage)), markers=True, label="observed")],
                        title="Interval calibration", xlabel="nominal interval level", ylabel="observed coverage",
                        xlim=(0, 1), ylim=(0, 1), legend="upper left")])


def risk_coverage_figure(rc: RiskCoverage, title: str = "Risk-coverage curve") -> Chart:
    """Selective risk (error rate on the accepted inputs) against coverage, with AURC and AUGRC."""
    return Chart([Panel([Line(_list(rc.coverage), _list(rc.risk), label="selective risk"),
                         VLine(0.8), VLine(0.95)],
                        title=f"{title}\nAURC {rc.aurc:.4f}, AUGRC {rc.augrc:.4f}", title_size=11,
                        xlabel="coverage (fraction answered)", ylabel="risk (error rate on answered)",
                        xlim=(0, 1), ylim=(0, None), grid=True)])


def ood_histogram_figure(in_scores: dict[str, Tensor], out_scores: dict[str, Tensor], bins: int = 30) -> Chart:
    """One panel per OOD score: densities of in-distribution against out-of-distribution."""
    panels = []
    for name in [n for n in in_scores if n in out_scores]:
        a, b = _list(in_scores[name]), _list(out_scores[name])
        edges = _edges(a + b, bins)
        panels.append(Panel([Hist(edges, _density(a, edges), label=f"in ({len(a)})"),
                             Hist(edges, _density(b, edges), color="#c44e52", label=f"out ({len(b)})")],
                            title=name, title_size=10, legend="best", legend_size=8))
    if not panels:
        panels = [Panel(title="no OOD score")]
    return Chart(panels, cols=len(panels), size=(256 * len(panels), 240))
