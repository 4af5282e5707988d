"""A :class:`~regfw.uncertainty.chart.Chart` drawn with matplotlib: for PNG files
(``uncertainty.plot_format: png``) and for loggers that take matplotlib figures (TensorBoard's
``add_figure``).

matplotlib is imported here only, lazily; the figure is built with the object API on the Agg
canvas (no pyplot state, no display needed).
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

from regfw.uncertainty.chart import Bars, Chart, Hist, Line, Panel, Text, VLine

if TYPE_CHECKING:  # pragma: no cover
    from matplotlib.figure import Figure

__all__ = ["to_figure"]

_DPI = 80
#: Chart sizes are pixels; matplotlib's font sizes are points (1/72 inch).
_PT = 72 / _DPI


def to_figure(chart: Chart) -> Figure:
    """The chart as a matplotlib Figure of the same pixel size."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    width, height = chart.size
    fig = Figure(figsize=(width / _DPI, height / _DPI), dpi=_DPI)
    FigureCanvasAgg(fig)
    grid: dict[str, Any] = {}
    if chart.row_heights is not None:
        grid["height_ratios"] = list(chart.row_heights)
    axes = fig.subplots(chart.rows, chart.cols, squeeze=False, gridspec_kw=grid)
    for i, panel in enumerate(chart.panels):
        _draw(axes[i // chart.cols][i % chart.cols], panel)
    for j in range(len(chart.panels), chart.rows * chart.cols):
        axes[j // chart.cols][j % chart.cols].set_visible(False)
    fig.tight_layout()
    return fig


def _style(dashed: bool, dotted: bool) -> str:
    return "--" if dashed else (":" if dotted else "-")


def _draw(ax: Any, panel: Panel) -> None:
    for m in panel.marks:
        if isinstance(m, Line):
            ax.plot(list(m.x), list(m.y), color=m.color, lw=m.width, ls=_style(m.dashed, m.dotted),
                    marker="o" if m.markers else None, label=m.label)
        elif isinstance(m, Bars):
            bottom = None if m.bottom is None else list(m.bottom)
            ax.bar(list(m.left), list(m.height), width=list(m.width), bottom=bottom, align="edge",
                   color=m.color if m.color is not None else "none", fill=m.color is not None,
                   hatch="///" if m.hatch else None, edgecolor=m.edge, lw=0.8, label=m.label)
        elif isinstance(m, Hist):
            ax.stairs(list(m.heights), list(m.edges), fill=True, color=m.color, alpha=m.alpha, label=m.label)
        elif isinstance(m, VLine):
            ax.axvline(m.x, color=m.color, ls=_style(False, m.dotted), lw=1, label=m.label)
        elif isinstance(m, Text):
            ax.text(m.x, m.y, m.text, ha="center", va="bottom", fontsize=m.size * _PT)
    (x0, x1), (y0, y1) = panel.limits()
    ax.set_xlim(x0, x1)
    ax.set_ylim(y0, y1)
    ax.set_title(panel.title, fontsize=panel.title_size * _PT)
    ax.set_xlabel(panel.xlabel)
    ax.set_ylabel(panel.ylabel)
    if panel.grid:
        ax.grid(alpha=0.3)
    if panel.legend is not None and any(getattr(m, "label", None) for m in panel.marks):
        ax.legend(loc=panel.legend, fontsize=panel.legend_size * _PT)
