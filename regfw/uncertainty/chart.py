"""The uncertainty figures as data, written as SVG without a plotting library.

A :class:`Chart` is a grid of :class:`Panel` s; a panel holds a few kinds of marks (lines, bars,
step histograms, vertical rules, text) with its title, axis labels, limits, grid and legend.
:meth:`Chart.to_svg` writes it directly: no figure objects, no text layout engine, a few
milliseconds per figure, so the callback's plots cost next to nothing beside sampling (drawing
the same five figures with matplotlib took about a second of CPU). For a PNG, or a logger that
takes matplotlib figures (TensorBoard's ``add_figure``), :func:`regfw.uncertainty.chart_mpl.to_figure`
draws the same chart with matplotlib.
"""
from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Literal
from xml.sax.saxutils import escape

__all__ = ["Bars", "Chart", "Hist", "Line", "Panel", "Text", "VLine", "nice_ticks"]

Legend = Literal["best", "upper left", "upper right", "lower left", "lower right"]


@dataclass
class Line:
    """A polyline through ``(x, y)``; non-finite points break it."""

    x: Sequence[float]
    y: Sequence[float]
    color: str = "#4c72b0"
    width: float = 1.5
    dashed: bool = False
    dotted: bool = False
    markers: bool = False
    label: str | None = None


@dataclass
class Bars:
    """Bars from ``left`` to ``left + width``, from ``bottom`` (default 0) up by ``height``."""

    left: Sequence[float]
    height: Sequence[float]
    width: Sequence[float]
    bottom: Sequence[float] | None = None
    color: str | None = "#4c72b0"  # None: not filled
    edge: str = "black"
    hatch: bool = False
    label: str | None = None


@dataclass
class Hist:
    """A filled step histogram: ``heights[i]`` between ``edges[i]`` and ``edges[i + 1]``."""

    edges: Sequence[float]
    heights: Sequence[float]
    color: str = "#4c72b0"
    alpha: float = 0.6
    label: str | None = None


@dataclass
class VLine:
    """A vertical rule at ``x`` across the panel."""

    x: float
    color: str = "gray"
    dotted: bool = True
    label: str | None = None


@dataclass
class Text:
    """``text`` centred above the point ``(x, y)`` (data coordinates)."""

    x: float
    y: float
    text: str
    size: float = 8.0


Mark = Line | Bars | Hist | VLine | Text


@dataclass
class Panel:
    """One set of axes."""

    marks: list[Mark] = field(default_factory=list)
    title: str = ""
    xlabel: str = ""
    ylabel: str = ""
    xlim: tuple[float | None, float | None] = (None, None)
    ylim: tuple[float | None, float | None] = (None, None)
    grid: bool = False
    legend: Legend | None = None
    title_size: float = 12.0
    legend_size: float = 9.0

    def limits(self) -> tuple[tuple[float, float], tuple[float, float]]:
        """The x and y ranges drawn: the given limits, else the marks' extent plus 5% (bars and
        histograms include their baseline)."""
        xs: list[float] = []
        ys: list[float] = []
        for m in self.marks:
            if isinstance(m, Line):
                xs += list(m.x)
                ys += list(m.y)
            elif isinstance(m, Bars):
                bottom = list(m.bottom) if m.bottom is not None else [0.0] * len(m.height)
                xs += list(m.left) + [a + w for a, w in zip(m.left, m.width, strict=True)]
                ys += bottom + [b + h for b, h in zip(bottom, m.height, strict=True)]
            elif isinstance(m, Hist):
                xs += list(m.edges)
                ys += [0.0, *m.heights]
            elif isinstance(m, VLine):
                xs.append(m.x)
        return _range(xs, self.xlim), _range(ys, self.ylim)


@dataclass
class Chart:
    """Panels on a ``rows x cols`` grid (row-major), ``size`` in pixels, optional relative row heights."""

    panels: list[Panel]
    cols: int = 1
    size: tuple[int, int] = (360, 320)
    row_heights: Sequence[float] | None = None

    @property
    def rows(self) -> int:
        return max(1, math.ceil(len(self.panels) / self.cols))

    def cells(self) -> list[tuple[float, float, float, float]]:
        """Each panel's cell ``(x, y, width, height)`` in pixels."""
        width, height = self.size
        ratios = list(self.row_heights) if self.row_heights is not None else [1.0] * self.rows
        total = sum(ratios)
        tops = [sum(ratios[:r]) / total * height for r in range(self.rows)]
        out = []
        for i in range(len(self.panels)):
            r, c = divmod(i, self.cols)
            out.append((c * width / self.cols, tops[r], width / self.cols, ratios[r] / total * height))
        return out

    def to_svg(self) -> str:
        """The chart as a standalone SVG document."""
        width, height = self.size
        parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
                 f'viewBox="0 0 {width} {height}" font-family="DejaVu Sans, Arial, sans-serif">',
                 '<defs>', *_hatch_defs(self.panels), '</defs>',
                 f'<rect width="{width}" height="{height}" fill="white"/>']
        for i, (panel, cell) in enumerate(zip(self.panels, self.cells(), strict=True)):
            parts += _panel_svg(panel, cell, i)
        parts.append("</svg>")
        return "\n".join(parts) + "\n"


def _range(values: Iterable[float], given: tuple[float | None, float | None]) -> tuple[float, float]:
    finite = [float(v) for v in values if math.isfinite(float(v))]
    lo_d, hi_d = (min(finite), max(finite)) if finite else (0.0, 1.0)
    pad = 0.05 * (hi_d - lo_d)
    lo = given[0] if given[0] is not None else lo_d - pad
    hi = given[1] if given[1] is not None else hi_d + pad
    if not hi > lo:
        lo, hi = lo - 0.5, lo + 0.5
    return float(lo), float(hi)


def nice_ticks(lo: float, hi: float, target: int = 5) -> list[float]:
    """Tick positions in ``[lo, hi]`` on a 1-2-2.5-5 x 10^k step, about ``target`` of them."""
    span = hi - lo
    if not (span > 0 and math.isfinite(span)):
        return [lo]
    raw = span / target
    base = 10.0 ** math.floor(math.log10(raw))
    step = next(m * base for m in (1.0, 2.0, 2.5, 5.0, 10.0) if m * base >= raw)
    first = math.ceil(lo / step - 1e-9)
    ticks = []
    k = first
    while k * step <= hi + 1e-9 * step:
        ticks.append(round(k * step, 12))
        k += 1
    return ticks


def _tick_label(v: float, ticks: Sequence[float]) -> str:
    step = abs(ticks[1] - ticks[0]) if len(ticks) > 1 else abs(v) or 1.0
    decimals = max(0, -math.floor(math.log10(step) + 1e-9) + (1 if _digits(step) > 1 else 0))
    return f"{v:.{decimals}f}" if abs(v) < 1e5 else f"{v:.3g}"


def _digits(step: float) -> int:
    """Significant digits of a tick step (2.5 -> 2)."""
    mantissa = step / 10.0 ** math.floor(math.log10(step))
    return 2 if abs(mantissa - round(mantissa)) > 1e-6 else 1


def _f(v: float) -> str:
    return f"{v:.1f}"


def _hatch_id(color: str) -> str:
    return "hatch-" + "".join(ch for ch in color if ch.isalnum())


def _hatch_defs(panels: Sequence[Panel]) -> list[str]:
    colors = sorted({m.edge for p in panels for m in p.marks if isinstance(m, Bars) and m.hatch})
    return [f'<pattern id="{_hatch_id(c)}" width="6" height="6" patternUnits="userSpaceOnUse" '
            f'patternTransform="rotate(45)"><line x1="0" y1="0" x2="0" y2="6" stroke="{escape(c)}" '
            f'stroke-width="1"/></pattern>' for c in colors]


@dataclass
class _Frame:
    """Data-to-pixel transform of one panel's plotting area."""

    x0: float
    y0: float
    w: float
    h: float
    xr: tuple[float, float]
    yr: tuple[float, float]

    def px(self, x: float) -> float:
        return self.x0 + (x - self.xr[0]) / (self.xr[1] - self.xr[0]) * self.w

    def py(self, y: float) -> float:
        return self.y0 + self.h - (y - self.yr[0]) / (self.yr[1] - self.yr[0]) * self.h


def _panel_svg(panel: Panel, cell: tuple[float, float, float, float], index: int) -> list[str]:
    cx, cy, cw, ch = cell
    title_lines = panel.title.split("\n") if panel.title else []
    top = 8 + len(title_lines) * (panel.title_size + 3)
    xr, yr = panel.limits()
    xt = [t for t in nice_ticks(*xr) if xr[0] - 1e-12 <= t <= xr[1] + 1e-12]
    yt = [t for t in nice_ticks(*yr) if yr[0] - 1e-12 <= t <= yr[1] + 1e-12]
    widest = max((len(_tick_label(t, yt)) for t in yt), default=1)  # tick labels: about 6 px a character
    left = (20 if panel.ylabel else 4) + 6 * widest + 8
    bottom = 38 if panel.xlabel else 22
    fr = _Frame(cx + left, cy + top, max(cw - left - 12, 10), max(ch - top - bottom, 10), xr, yr)
    out = []
    for k, line in enumerate(title_lines):
        out.append(f'<text x="{_f(fr.x0 + fr.w / 2)}" y="{_f(cy + 6 + (k + 1) * panel.title_size)}" '
                   f'font-size="{panel.title_size}" text-anchor="middle">{escape(line)}</text>')
    for t in xt:
        x = fr.px(t)
        if panel.grid:
            out.append(f'<line x1="{_f(x)}" y1="{_f(fr.y0)}" x2="{_f(x)}" y2="{_f(fr.y0 + fr.h)}" '
                       'stroke="#b0b0b0" stroke-opacity="0.3"/>')
        out.append(f'<line x1="{_f(x)}" y1="{_f(fr.y0 + fr.h)}" x2="{_f(x)}" y2="{_f(fr.y0 + fr.h + 4)}" '
                   'stroke="black"/>')
        out.append(f'<text x="{_f(x)}" y="{_f(fr.y0 + fr.h + 15)}" font-size="10" '
                   f'text-anchor="middle">{_tick_label(t, xt)}</text>')
    for t in yt:
        y = fr.py(t)
        if panel.grid:
            out.append(f'<line x1="{_f(fr.x0)}" y1="{_f(y)}" x2="{_f(fr.x0 + fr.w)}" y2="{_f(y)}" '
                       'stroke="#b0b0b0" stroke-opacity="0.3"/>')
        out.append(f'<line x1="{_f(fr.x0 - 4)}" y1="{_f(y)}" x2="{_f(fr.x0)}" y2="{_f(y)}" stroke="black"/>')
        out.append(f'<text x="{_f(fr.x0 - 6)}" y="{_f(y + 3.5)}" font-size="10" '
                   f'text-anchor="end">{_tick_label(t, yt)}</text>')
    clip = f"clip{index}"
    out.append(f'<clipPath id="{clip}"><rect x="{_f(fr.x0)}" y="{_f(fr.y0)}" width="{_f(fr.w)}" '
               f'height="{_f(fr.h)}"/></clipPath>')
    out.append(f'<g clip-path="url(#{clip})">')
    for m in panel.marks:
        out += _mark_svg(m, fr)
    out.append("</g>")
    out.append(f'<rect x="{_f(fr.x0)}" y="{_f(fr.y0)}" width="{_f(fr.w)}" height="{_f(fr.h)}" '
               'fill="none" stroke="black"/>')
    if panel.xlabel:
        out.append(f'<text x="{_f(fr.x0 + fr.w / 2)}" y="{_f(fr.y0 + fr.h + 31)}" font-size="11" '
                   f'text-anchor="middle">{escape(panel.xlabel)}</text>')
    if panel.ylabel:
        x, y = cx + 13, fr.y0 + fr.h / 2
        out.append(f'<text x="{_f(x)}" y="{_f(y)}" font-size="11" text-anchor="middle" '
                   f'transform="rotate(-90 {_f(x)} {_f(y)})">{escape(panel.ylabel)}</text>')
    if panel.legend is not None:
        out += _legend_svg(panel, fr)
    return out


def _dash(dashed: bool, dotted: bool) -> str:
    return ' stroke-dasharray="5 3"' if dashed else (' stroke-dasharray="1.5 2.5"' if dotted else "")


def _mark_svg(m: Mark, fr: _Frame) -> list[str]:
    out = []
    if isinstance(m, Line):
        runs: list[list[tuple[str, str]]] = [[]]  # pixel coordinates, split at non-finite points
        for x, y in zip(m.x, m.y, strict=True):
            if math.isfinite(float(x)) and math.isfinite(float(y)):
                runs[-1].append((_f(fr.px(float(x))), _f(fr.py(float(y)))))
            elif runs[-1]:
                runs.append([])
        for run in runs:
            if run:
                path = " ".join(f"{px},{py}" for px, py in run)
                out.append(f'<polyline points="{path}" fill="none" stroke="{m.color}" '
                           f'stroke-width="{m.width}"{_dash(m.dashed, m.dotted)}/>')
            if m.markers:
                out += [f'<circle cx="{px}" cy="{py}" r="3" fill="{m.color}"/>' for px, py in run]
    elif isinstance(m, Bars):
        bottom = list(m.bottom) if m.bottom is not None else [0.0] * len(m.height)
        fill = (f"url(#{_hatch_id(m.edge)})" if m.hatch else "none") if m.color is None else m.color
        for a, w, b, h in zip(m.left, m.width, bottom, m.height, strict=True):
            x1, x2 = fr.px(float(a)), fr.px(float(a) + float(w))
            y1, y2 = fr.py(float(b)), fr.py(float(b) + float(h))
            out.append(f'<rect x="{_f(min(x1, x2))}" y="{_f(min(y1, y2))}" width="{_f(abs(x2 - x1))}" '
                       f'height="{_f(abs(y2 - y1))}" fill="{fill}" stroke="{m.edge}" stroke-width="0.8"/>')
    elif isinstance(m, Hist):
        base = fr.py(0.0)
        points = [f"{_f(fr.px(float(m.edges[0])))},{_f(base)}"]
        for i, h in enumerate(m.heights):
            y = fr.py(float(h))
            points += [f"{_f(fr.px(float(m.edges[i])))},{_f(y)}", f"{_f(fr.px(float(m.edges[i + 1])))},{_f(y)}"]
        points.append(f"{_f(fr.px(float(m.edges[-1])))},{_f(base)}")
        out.append(f'<polygon points="{" ".join(points)}" fill="{m.color}" fill-opacity="{m.alpha}" stroke="none"/>')
    elif isinstance(m, VLine):
        x = fr.px(m.x)
        out.append(f'<line x1="{_f(x)}" y1="{_f(fr.y0)}" x2="{_f(x)}" y2="{_f(fr.y0 + fr.h)}" '
                   f'stroke="{m.color}"{_dash(False, m.dotted)}/>')
    else:
        out.append(f'<text x="{_f(fr.px(m.x))}" y="{_f(fr.py(m.y) - 2)}" font-size="{m.size}" '
                   f'text-anchor="middle">{escape(m.text)}</text>')
    return out


def _legend_corner(panel: Panel, fr: _Frame) -> str:
    """``best``: the corner quadrant holding the fewest points of the panel's lines and bars."""
    if panel.legend != "best":
        return panel.legend or "upper left"
    counts = dict.fromkeys(("upper right", "upper left", "lower left", "lower right"), 0)
    mx, my = sum(fr.xr) / 2, sum(fr.yr) / 2
    for m in panel.marks:
        pts: list[tuple[float, float]] = []
        if isinstance(m, Line):
            pts = list(zip(m.x, m.y, strict=True))
        elif isinstance(m, Hist):
            pts = [((m.edges[i] + m.edges[i + 1]) / 2, h) for i, h in enumerate(m.heights)]
        for x, y in pts:
            if math.isfinite(float(x)) and math.isfinite(float(y)):
                counts[("upper" if y >= my else "lower") + (" right" if x >= mx else " left")] += 1
    return min(counts, key=lambda k: counts[k])


def _legend_svg(panel: Panel, fr: _Frame) -> list[str]:
    entries = [m for m in panel.marks if not isinstance(m, Text) and m.label]
    if not entries:
        return []
    size = panel.legend_size
    row = size + 5
    width = 30 + max(len(m.label or "") for m in entries) * size * 0.56
    height = row * len(entries) + 6
    corner = _legend_corner(panel, fr)
    x = fr.x0 + 6 if corner.endswith("left") else fr.x0 + fr.w - width - 6
    y = fr.y0 + 6 if corner.startswith("upper") else fr.y0 + fr.h - height - 6
    out = [f'<rect x="{_f(x)}" y="{_f(y)}" width="{_f(width)}" height="{_f(height)}" fill="white" '
           'fill-opacity="0.8" stroke="#cccccc" rx="3"/>']
    for i, m in enumerate(entries):
        ly = y + 3 + row * i + row / 2
        if isinstance(m, (Line, VLine)):
            dash = _dash(getattr(m, "dashed", False), m.dotted)
            out.append(f'<line x1="{_f(x + 5)}" y1="{_f(ly)}" x2="{_f(x + 23)}" y2="{_f(ly)}" stroke="{m.color}" '
                       f'stroke-width="{getattr(m, "width", 1.0)}"{dash}/>')
        else:
            fill = m.color if m.color is not None else (f"url(#{_hatch_id(m.edge)})" if m.hatch else "none")
            opacity = f' fill-opacity="{m.alpha}"' if isinstance(m, Hist) else ""
            stroke = f' stroke="{m.edge}"' if isinstance(m, Bars) else ""
            out.append(f'<rect x="{_f(x + 5)}" y="{_f(ly - size / 2)}" width="18" height="{_f(size)}" '
                       f'fill="{fill}"{opacity}{stroke}/>')
        out.append(f'<text x="{_f(x + 27)}" y="{_f(ly + size / 2 - 1)}" '
                   f'font-size="{size}">{escape(m.label or "")}</text>')
    return out
