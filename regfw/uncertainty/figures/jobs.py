"""The MC callback's figures: drawn from CPU copies of its metric states, on a background thread.

Drawing the figures with matplotlib costs more CPU than sampling on small models (about 0.25 s a
figure; ``bench/plots.py``), so the callback collects their data on the training thread
(:func:`plot_data`, CPU tensors) and hands it to :class:`PlotQueue` (one worker thread, one
epoch's figures at a time, in order); the training loop does not wait. :func:`draw_plots` is what
the worker runs. The figure modules it draws with import matplotlib; importing them here costs
about 10 ms, as Lightning (its torchmetrics) has imported matplotlib and pyplot before this module.
"""
from __future__ import annotations

import os
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

from pytorch_lightning.utilities import rank_zero_warn

from regfw.uncertainty.accumulators import MCClassificationMetrics
from regfw.uncertainty.figures import calibration, histograms, selective
from regfw.uncertainty.figures.files import save_figure
from regfw.uncertainty.metrics import retained_curve
from regfw.uncertainty.selective import risk_coverage

if TYPE_CHECKING:  # pragma: no cover
    from regfw.uncertainty.accumulators import MCRegressionMetrics, ProbabilityCalibration
    from regfw.uncertainty.ood import OODScoreStore

__all__ = ["PlotQueue", "draw_plots", "plot_data"]


class PlotQueue:
    """One background thread drawing one set of figures at a time."""

    def __init__(self) -> None:
        self._executor: ThreadPoolExecutor | None = None
        self._pending: Future[dict[str, str]] | None = None

    def submit(self, data: dict[str, Any], directory: str, loggers: Sequence[Any], step: int, prefix: str,
               fmt: str = "svg") -> None:
        """Start drawing; the previous set must have been waited for (:meth:`wait`)."""
        if self._executor is None:
            self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="regfw-plots")
        self._pending = self._executor.submit(draw_plots, data, directory, loggers, step, prefix, fmt)

    def wait(self) -> dict[str, str] | None:
        """The files the pending set wrote, once drawn; None when nothing was pending or it failed
        (a plot failing must not fail the run: it is reported as a warning)."""
        pending, self._pending = self._pending, None
        if pending is None:
            return None
        try:
            return pending.result()
        except Exception as exc:
            rank_zero_warn(f"MCDropoutUncertainty: could not draw the plots: {type(exc).__name__}: {exc}")
            return None

    def shutdown(self) -> None:
        """Stop the thread (after :meth:`wait`); a later :meth:`submit` starts a new one."""
        if self._executor is not None:
            self._executor.shutdown(wait=True)
            self._executor = None


def plot_data(metric: MCClassificationMetrics | MCRegressionMetrics, score_name: str,
              calibrated: ProbabilityCalibration | None = None, temperature: float | None = None,
              referral_marker: float | None = None,
              ood: tuple[OODScoreStore, OODScoreStore] | None = None) -> dict[str, Any]:
    """What :func:`draw_plots` draws, from the callback's metric states, as CPU tensors (safe to
    hand to another thread): ``calibrated`` the metrics after temperature scaling, ``ood`` the
    in- and out-of-distribution score stores."""
    if not isinstance(metric, MCClassificationMetrics):
        score, sq = metric.score_and_error()
        return {"task": "regression", "score_name": score_name, "coverage": metric.coverage(),
                "referral": retained_curve(score.cpu(), sq.cpu()), "score": score.cpu()}
    score, correct = metric.score_and_correct()
    score, correct = score.cpu(), correct.cpu()
    data: dict[str, Any] = {"task": "classification", "score_name": score_name, "reliability": metric.reliability()}
    if calibrated is not None:
        data["reliability_after"] = calibrated.reliability()
        data["temperature"] = temperature
    data["referral"] = retained_curve(score, correct)
    data["referral_marker"] = referral_marker
    data["score"], data["correct"] = score, correct >= 1.0  # dense: every position right
    data["risk_coverage"] = risk_coverage(score, correct)
    if ood is not None:
        data["ood"] = (ood[0].compute_scores(), ood[1].compute_scores())
    return data


def draw_plots(data: dict[str, Any], directory: str, loggers: Sequence[Any], step: int,
               prefix: str, fmt: str = "svg") -> dict[str, str]:
    """Draw the figures of the callback's plot data (:func:`plot_data`), write them as ``fmt``
    (``svg`` or ``png``) and send them to loggers whose experiment takes matplotlib figures
    (``add_figure``, as TensorBoard's does); runs on the plot thread. Returns ``{name: path}``."""
    task = data["task"]
    figures = {}
    if task == "classification":
        figures["reliability"] = calibration.reliability_figure(
            data["reliability"], after=data.get("reliability_after"), temperature=data.get("temperature"))
        fr, acc = data["referral"]
        figures["referral"] = selective.referral_figure(fr, acc, marker=data["referral_marker"])
        figures["score_hist"] = histograms.score_histogram_figure(data["score"], data["correct"],
                                                                  score_name=data["score_name"], task=task)
        figures["risk_coverage"] = selective.risk_coverage_figure(data["risk_coverage"])
        if "ood" in data:
            figures["ood_hist"] = histograms.ood_histogram_figure(*data["ood"])
    else:
        cov = data["coverage"]
        figures["coverage"] = calibration.coverage_figure(list(cov), list(cov.values()))
        fr, mse = data["referral"]
        figures["referral"] = selective.referral_figure(fr, mse.clamp_min(0).sqrt(), ylabel="RMSE on retained")
        figures["score_hist"] = histograms.score_histogram_figure(data["score"], None, score_name=data["score_name"],
                                                                  task=task)
    takers = [add for add in (getattr(getattr(lg, "experiment", None), "add_figure", None) for lg in loggers)
              if callable(add)]
    written: dict[str, str] = {}
    for name, fig in figures.items():
        written[name] = save_figure(fig, os.path.join(directory, f"{name}.{fmt}"))
        for add_figure in takers:
            try:
                add_figure(f"{prefix}{name}", fig, global_step=step, close=False)
            except Exception as exc:  # a logger failing to take an image must not stop training
                rank_zero_warn(f"MCDropoutUncertainty: could not send plot {name!r} to the logger: {exc}")
    return written
