"""Selective-prediction figures: what refusing the least sure inputs buys.

The referral curve shows the metric on the inputs kept against the fraction referred to review;
the risk-coverage curve the error rate on the inputs answered against the fraction answered, with
its reference lines labelled (the coverages the ``mc/risk_80`` and ``mc/risk_95`` metrics read,
and the error rate when every input is answered).
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
from matplotlib.figure import Figure
from torch import Tensor

from regfw.uncertainty.figures.canvas import BLUE, GRAY, array, legend_below, new_figure
from regfw.uncertainty.selective import COVERAGES

if TYPE_CHECKING:  # pragma: no cover
    from regfw.uncertainty.selective import RiskCoverage

__all__ = ["referral_figure", "risk_coverage_figure"]


def referral_figure(fractions: Tensor, values: Tensor, ylabel: str = "accuracy on retained",
                    title: str = "Referral curve", marker: float | None = None) -> Figure:
    """The metric on the retained inputs (``ylabel``) against the fraction referred to review,
    the referred fraction of the run (``marker``) as a labelled vertical line."""
    fig = new_figure(4.5, 4.25)
    ax = fig.subplots()
    ax.plot(array(fractions), array(values), color=BLUE, label=ylabel)
    if marker is not None:
        ax.axvline(float(marker), color=GRAY, linestyle=":", label=f"referred at the threshold ({marker:.0%})")
    ax.set(xlim=(0, 1), title=title, xlabel="fraction referred to review", ylabel=ylabel)
    ax.grid(alpha=0.3)
    legend_below(fig, [ax])
    return fig


def risk_coverage_figure(rc: RiskCoverage, title: str = "Risk-coverage curve") -> Figure:
    """Selective risk (error rate on the accepted inputs) against coverage, AURC and AUGRC in the
    title; the coverages of the ``risk_NN`` metrics (:data:`regfw.uncertainty.selective.COVERAGES`)
    and the error rate at full coverage drawn and labelled with their values."""
    fig = new_figure(4.5, 4.5)
    ax = fig.subplots()
    coverage, risk = array(rc.coverage), array(rc.risk)
    ax.plot(coverage, risk, color=BLUE, label="selective risk")
    for level, style in zip(COVERAGES, (":", "-.", (0, (3, 1, 1, 1, 1, 1))), strict=False):
        ax.axvline(level, color=GRAY, linestyle=style, label=f"coverage {level:.0%}: risk {rc.risk_at(level):.3f}")
    if risk.size:
        ax.axhline(float(risk[-1]), color="black", linestyle="--", linewidth=1,
                   label=f"error rate, all answered: {risk[-1]:.3f}")
    top = float(np.nanmax(risk)) if risk.size and np.isfinite(risk).any() else 1.0
    ax.set(xlim=(0, 1), ylim=(0, 1.05 * top if top > 0 else 1.0),
           title=f"{title}\nAURC {rc.aurc:.4f}, AUGRC {rc.augrc:.4f}",
           xlabel="coverage (fraction answered)", ylabel="risk (error rate on answered)")
    ax.grid(alpha=0.3)
    legend_below(fig, [ax])
    return fig
