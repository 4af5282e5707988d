"""Writing a figure to a file: SVG or PNG by the suffix, atomically.

No matplotlib import here: the callback checks its ``plot_format`` against :data:`FORMATS`
without loading it.
"""
from __future__ import annotations

import os
from typing import TYPE_CHECKING

from regfw.run.atomic import atomic_open

if TYPE_CHECKING:  # pragma: no cover
    from matplotlib.figure import Figure

__all__ = ["FORMATS", "save_figure"]

#: File formats :func:`save_figure` writes, by the file's suffix.
FORMATS = ("svg", "png")


def save_figure(fig: Figure, path: str | os.PathLike) -> str:
    """Write ``fig`` to ``path`` as SVG or PNG by the suffix, atomically (a temporary file in the
    target directory, then ``os.replace``: a reader never sees half a file); only a regular file
    is ever replaced (a link, FIFO, device or directory at ``path`` is an
    :class:`~regfw.errors.OutputError`, see :func:`regfw.run.atomic.check_target`).

    The file is the figure as built, whatever the user's matplotlib settings say about saving:
    its own size and resolution (a PNG is ``figsize * dpi`` pixels), a white background, no
    cropping, no date in an SVG (the same figure gives the same text).
    """
    path = os.fspath(path)
    suffix = os.path.splitext(path)[1].lower().lstrip(".")
    if suffix not in FORMATS:
        raise ValueError(f"save_figure: {path!r} should end in .svg or .png")
    with atomic_open(path, "wb") as fh:
        fig.savefig(fh, format=suffix, dpi=fig.dpi, facecolor="white", edgecolor="white",
                    bbox_inches=fig.bbox_inches.frozen(),  # the whole figure, even under savefig.bbox: tight
                    metadata={"Date": None} if suffix == "svg" else {})
    return path
