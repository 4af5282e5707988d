"""What every uncertainty figure shares: a matplotlib ``Figure`` on the Agg canvas, the colours,
and a legend outside the axes.

Figures are built with the object API (:class:`matplotlib.figure.Figure` and
:class:`~matplotlib.backends.backend_agg.FigureCanvasAgg`), never pyplot: nothing is registered
with pyplot's figure manager, no display is needed, the drawing thread can be any thread, and the
user's own matplotlib state (the current figure, the backend, rcParams) is left as it was.

The legend of every figure sits under the axes, in the space the constrained layout keeps for it
(``loc="outside lower center"``): it can never cover a bar, a curve or a label, whatever the
data (a legend inside the axes covered the tallest bar of a short run).
"""
from __future__ import annotations

from collections.abc import Iterable

import numpy as np
from matplotlib.artist import Artist
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.legend import Legend
from torch import Tensor

__all__ = ["BLUE", "GRAY", "GREEN", "RED", "DPI", "array", "legend_below", "new_figure"]

#: Resolution of every figure: a PNG is ``width * DPI`` by ``height * DPI`` pixels.
DPI = 100
BLUE = "#4c72b0"
RED = "#c44e52"
GREEN = "#55a868"
GRAY = "#8c8c8c"


def new_figure(width: float, height: float) -> Figure:
    """An empty figure of ``width x height`` inches with the constrained layout (titles, labels
    and the outside legend get their room), attached to its own Agg canvas.

    Sizes are whole quarter inches, exact in binary, so a PNG is exactly ``size * DPI`` pixels
    (4.6 inches at 100 dpi is 459.99... pixels, which matplotlib truncates to 459)."""
    if (4 * width) % 1 or (4 * height) % 1:
        raise ValueError(f"new_figure: sizes are whole quarter inches, got {width} x {height}")
    fig = Figure(figsize=(width, height), dpi=DPI, layout="constrained", facecolor="white")
    FigureCanvasAgg(fig)
    return fig


def array(x: Tensor | Iterable[float]) -> np.ndarray:
    """``x`` as a float64 NumPy vector (tensors are copied off their device)."""
    if isinstance(x, Tensor):
        return x.detach().double().cpu().flatten().numpy()
    return np.asarray(list(x), dtype=np.float64)


def legend_below(fig: Figure, axes: Iterable[Axes]) -> Legend:
    """One legend for the figure under its axes, with every labelled artist of ``axes`` once (by
    label, first seen), in as many columns as fit the figure's width."""
    handles: list[Artist] = []
    labels: list[str] = []
    for ax in axes:
        for handle, label in zip(*ax.get_legend_handles_labels(), strict=True):
            if label not in labels:
                handles.append(handle)
                labels.append(label)
    renderer = fig.canvas.get_renderer()  # type: ignore[attr-defined]
    for ncols in range(len(handles), 1, -1):
        legend = _legend(fig, handles, labels, ncols)
        if legend.get_window_extent(renderer).width <= 0.96 * fig.bbox.width:
            return legend
        legend.remove()
    return _legend(fig, handles, labels, 1)


def _legend(fig: Figure, handles: list[Artist], labels: list[str], ncols: int) -> Legend:
    return fig.legend(handles, labels, loc="outside lower center", ncols=ncols, fontsize="small", frameon=False)
