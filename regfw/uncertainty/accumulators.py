"""torchmetrics states that accumulate the uncertainty metrics of :mod:`regfw.uncertainty.metrics`
batch by batch, with ``dist_reduce_fx`` (sums of bin counts, concatenated scores), so values are
exact under DDP: the Monte Carlo callback's classification and regression metrics, and the
calibration of plain probabilities (a deterministic pass before/after temperature scaling).
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor
from torchmetrics import Metric
from torchmetrics.utilities import dim_zero_cat, rank_zero_warn

from regfw.uncertainty.metrics import (
    DEFAULT_BINS,
    DEFAULT_LEVELS,
    ReliabilityData,
    brier_per_sample,
    calibration_bins,
    covered,
    ece_from_bins,
    error_auroc,
    gaussian_nll_elements,
    nll_per_sample,
    referral,
    top_label,
    z_scores,
)
from regfw.uncertainty.selective import COVERAGES, selective_metrics
from regfw.uncertainty.summaries import ClassificationSummary, RegressionSummary, per_input

__all__ = ["MCClassificationMetrics", "MCRegressionMetrics", "ProbabilityCalibration", "explained"]


def explained(values: dict[str, float], reasons: dict[str, str], warned: set[str], owner: str) -> dict[str, Tensor]:
    """``values`` as 0-d float64 tensors, without the ones that are NaN: a metric that cannot be
    computed is left out of the results, never reported as a silent NaN. Each one left out is
    named once (per metric object) in a warning with its reason from ``reasons`` (metric name ->
    what is missing and which setting supplies it); metrics sharing a reason share one line."""
    missing: dict[str, list[str]] = {}
    out: dict[str, Tensor] = {}
    for key, value in values.items():
        if math.isnan(value):
            missing.setdefault(reasons.get(key, "it is undefined on the data seen"), []).append(key)
        else:
            out[key] = torch.tensor(value, dtype=torch.float64)
    for reason, keys in missing.items():
        fresh = [k for k in keys if k not in warned]
        if fresh:
            warned.update(fresh)
            rank_zero_warn(f"{owner}: {', '.join(fresh)} left out of the results: {reason}")
    return out


class MCClassificationMetrics(Metric):
    """Accumulates MC-dropout classification metrics over batches, exact under DDP.

    ``update(summary, target)`` takes a :class:`ClassificationSummary` (``mc_predict(...).summary``)
    and integer targets. Sums (counts, NLL, Brier, ECE bins, entropy, MI) reduce with
    ``"sum"``; the per-input uncertainty score and correctness are concatenated (``"cat"``)
    because AUROC and fraction-based referral need a global ranking. ``compute()`` returns a
    dict of 0-d tensors with the keys ``acc, det_acc, nll, brier, ece, auroc_error,
    referred_fraction, retained_acc, mean_mi, mean_entropy, mean_expected_entropy,
    mean_variation_ratio, mean_score`` and the selective-prediction ``aurc, augrc, risk_80,
    risk_95`` (:mod:`regfw.uncertainty.selective`, on the same score). Dense outputs (segmentation, sequences) and
    ``ignore_index``: see :meth:`update`; ``auroc_error`` then detects the inputs with at least
    one wrong position.

    Referral uses ``threshold`` on ``score`` when given, otherwise refers the
    ``refer_fraction`` most uncertain inputs.
    """

    full_state_update = False
    higher_is_better = None
    is_differentiable = False

    n: Tensor
    correct: Tensor
    det_n: Tensor
    det_correct: Tensor
    nll_sum: Tensor
    brier_sum: Tensor
    mi_sum: Tensor
    entropy_sum: Tensor
    exp_entropy_sum: Tensor
    vr_sum: Tensor
    bin_count: Tensor
    bin_conf: Tensor
    bin_correct: Tensor
    scores: list[Tensor]
    corrects: list[Tensor]

    def __init__(
        self,
        n_bins: int = DEFAULT_BINS,
        score: str = "mutual_information",
        threshold: float | None = None,
        refer_fraction: float = 0.1,
        ignore_index: int | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.n_bins = n_bins
        self.ignore_index = ignore_index
        self.score_name = score
        self.threshold = threshold
        self.refer_fraction = refer_fraction
        zero = lambda: torch.tensor(0.0, dtype=torch.float64)  # noqa: E731
        for name in ("n", "correct", "det_n", "det_correct", "nll_sum", "brier_sum",
                     "mi_sum", "entropy_sum", "exp_entropy_sum", "vr_sum"):
            self.add_state(name, default=zero(), dist_reduce_fx="sum")
        for name in ("bin_count", "bin_conf", "bin_correct"):
            self.add_state(name, default=torch.zeros(n_bins, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("scores", default=[], dist_reduce_fx="cat")
        self.add_state("corrects", default=[], dist_reduce_fx="cat")
        self._warned: set[str] = set()

    def update(self, summary: ClassificationSummary, target: Tensor) -> None:
        """Add a batch. Dense summaries (``mean_probs`` ``[B, ..., C]``, targets ``[B, ...]``) add
        every position whose target is not ``ignore_index`` to the sums (pixel-level accuracy,
        NLL, ECE bins, ...) and one score per input -- the mean over its valid positions -- with
        its fraction of correct positions to the referral and ranking states, so memory grows
        with the number of inputs, never with the number of positions."""
        probs = summary.mean_probs.double()
        target = target.to(probs.device).long()
        if tuple(target.shape) != tuple(probs.shape[:-1]):
            target = target.reshape(probs.shape[:-1])  # [B] targets given as [B, 1] and the like
        if self.ignore_index is not None:
            valid = target != self.ignore_index
        else:
            valid = torch.ones_like(target, dtype=torch.bool)
        flat_valid = valid.flatten()
        c = probs.shape[-1]
        p = probs.reshape(-1, c)[flat_valid]
        tgt = target.flatten()[flat_valid]
        conf, pred = p.max(-1)
        correct = (pred == tgt).double()
        self.n += tgt.numel()
        self.correct += correct.sum()
        if summary.deterministic_probs is not None:
            self.det_n += tgt.numel()
            det_pred = summary.deterministic_probs.reshape(-1, c)[flat_valid].argmax(-1)
            self.det_correct += (det_pred == tgt).double().sum()
        self.nll_sum += nll_per_sample(p, tgt).sum()
        self.brier_sum += brier_per_sample(p, tgt).sum()
        for state, values in (("mi_sum", summary.mutual_information), ("entropy_sum", summary.predictive_entropy),
                              ("exp_entropy_sum", summary.expected_entropy), ("vr_sum", summary.variation_ratio)):
            setattr(self, state, getattr(self, state) + values.double().flatten()[flat_valid].sum())
        count, conf_sum, corr_sum = calibration_bins(conf, correct, self.n_bins)
        self.bin_count += count
        self.bin_conf += conf_sum
        self.bin_correct += corr_sum
        score = summary.score(self.score_name).detach().double()
        if probs.dim() > 2:  # one score and one accuracy per image / sequence
            position_correct = torch.zeros(valid.numel(), dtype=torch.float64, device=probs.device)
            position_correct[flat_valid] = correct
            self.scores.append(per_input(score, valid))
            self.corrects.append(per_input(position_correct.reshape(valid.shape), valid))
        else:
            self.scores.append(score.flatten())
            self.corrects.append(correct)

    def score_and_correct(self) -> tuple[Tensor, Tensor]:
        """The concatenated per-input scores and correctness (synced states after ``compute``)."""
        if isinstance(self.scores, list) and not self.scores:
            empty = torch.zeros(0, dtype=torch.float64)
            return empty, empty
        return dim_zero_cat(self.scores), dim_zero_cat(self.corrects)

    def reliability(self) -> ReliabilityData:
        """Reliability-diagram data from the accumulated bins."""
        return ReliabilityData.from_bins(self.bin_count, self.bin_conf, self.bin_correct)

    def compute(self) -> dict[str, Tensor]:
        n = float(self.n)
        nan = float("nan")

        def mean(x: Tensor) -> float:
            return float(x) / n if n else nan

        score, correct = self.score_and_correct()
        if self.threshold is not None:
            ref = referral(score, correct, threshold=self.threshold) if n else None
        else:
            ref = referral(score, correct, fraction=self.refer_fraction) if n else None
        out = {
            "acc": mean(self.correct),
            "det_acc": float(self.det_correct) / float(self.det_n) if float(self.det_n) else nan,
            "nll": mean(self.nll_sum),
            "brier": mean(self.brier_sum),
            "ece": ece_from_bins(self.bin_count, self.bin_conf, self.bin_correct),
            "auroc_error": error_auroc(score, correct >= 1.0) if n else nan,
            "referred_fraction": ref.referred_fraction if ref else nan,
            "retained_acc": ref.retained_accuracy if ref else nan,
            "mean_mi": mean(self.mi_sum),
            "mean_entropy": mean(self.entropy_sum),
            "mean_expected_entropy": mean(self.exp_entropy_sum),
            "mean_variation_ratio": mean(self.vr_sum),
            "mean_score": float(score.mean()) if n else nan,
        }

        if n:
            out.update(selective_metrics(score, correct))
        else:
            out.update({"aurc": nan, "augrc": nan, **{f"risk_{round(c * 100):d}": nan for c in COVERAGES}})
        return explained(out, self._nan_reasons(n, dense=score.numel() != n), self._warned, type(self).__name__)

    def _nan_reasons(self, n: float, dense: bool) -> dict[str, str]:
        """Why each metric that can be NaN is NaN (see :func:`explained`)."""
        if not n:
            reason = ("no target was scored (update() was not called, or every target equals "
                      f"ignore_index={self.ignore_index!r})")
            return dict.fromkeys(("acc", "det_acc", "nll", "brier", "ece", "auroc_error", "referred_fraction",
                                  "retained_acc", "mean_mi", "mean_entropy", "mean_expected_entropy",
                                  "mean_variation_ratio", "mean_score", "aurc", "augrc", "risk_80", "risk_95"),
                                 reason)
        referral_setting = (f"threshold={self.threshold!r}" if self.threshold is not None
                            else f"refer_fraction={self.refer_fraction!r}")
        return {
            "det_acc": "no deterministic pass was made (mc_predict(..., deterministic=True) adds it)",
            "auroc_error": "the error AUROC needs both right and wrong predictions, and every scored input was "
                           + ("right" if float(self.correct) == n else "wrong")
                           + (" (an input with positions is right only when all of them are)" if dense else ""),
            "retained_acc": f"every input was referred ({referral_setting}); lower it to keep some",
        }


class MCRegressionMetrics(Metric):
    """Accumulates MC-dropout regression metrics over batches, exact under DDP.

    ``update(summary, target)`` takes a :class:`RegressionSummary`. ``compute()`` returns
    ``rmse, det_rmse, nll`` (moment-matched Gaussian, total variance, nats per element),
    ``ll_mixture`` (the test log-likelihood of the mixture of the T Gaussians, Gal & Ghahramani
    2016, nats per element, higher is better) and its negative ``nll_mixture``, ``coverage_50``,
    ``coverage_80``, ... (one per level, the percentage in the name), ``interval_error``
    (mean |coverage - level|), ``mean_variance``, ``mean_aleatoric``, ``mean_epistemic``,
    ``referred_fraction`` and ``retained_rmse`` (the ``refer_fraction`` inputs with the largest
    ``score`` -- or those above ``threshold`` -- removed).

    The mixture terms are computed here from the summary's sampled means and its predicted
    variances or ``tau`` (:meth:`RegressionSummary.ll_mixture`), in float64. A metric that cannot
    be computed is left out of ``compute()``'s results with a one-line warning naming what enables
    it (:func:`explained`): the mixture metrics without ``tau`` (``uncertainty.tau``) and without
    predicted variances, ``det_rmse`` without a deterministic pass, ``retained_rmse`` when every
    input was referred.
    """

    full_state_update = False
    higher_is_better = None
    is_differentiable = False

    n: Tensor
    inputs: Tensor
    det_n: Tensor
    se_sum: Tensor
    det_se_sum: Tensor
    nll_sum: Tensor
    mix_n: Tensor
    mix_nll_sum: Tensor
    var_sum: Tensor
    alea_sum: Tensor
    epi_sum: Tensor
    covered: Tensor
    scores: list[Tensor]
    sq_errors: list[Tensor]

    def __init__(
        self,
        levels: Sequence[float] = DEFAULT_LEVELS,
        score: str = "variance",
        threshold: float | None = None,
        refer_fraction: float = 0.1,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        z_scores(levels)  # validate
        self.levels = tuple(float(x) for x in levels)
        self.score_name = score
        self.threshold = threshold
        self.refer_fraction = refer_fraction
        zero = lambda: torch.tensor(0.0, dtype=torch.float64)  # noqa: E731
        for name in ("n", "inputs", "det_n", "se_sum", "det_se_sum", "nll_sum", "mix_n", "mix_nll_sum", "var_sum",
                     "alea_sum", "epi_sum"):
            self.add_state(name, default=zero(), dist_reduce_fx="sum")
        self.add_state("covered", default=torch.zeros(len(self.levels), dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("scores", default=[], dist_reduce_fx="cat")
        self.add_state("sq_errors", default=[], dist_reduce_fx="cat")
        self._warned: set[str] = set()

    def update(self, summary: RegressionSummary, target: Tensor, mixture_nll: Tensor | None = None) -> None:
        """Add a batch. The mixture terms come from the summary when it has its sampled means and
        variances or ``tau`` (:attr:`RegressionSummary.has_mixture`); ``mixture_nll`` (``[B]``, e.g.
        :meth:`MCResult.nll_mixture`) replaces them when given."""
        if mixture_nll is None and summary.has_mixture:
            mixture_nll = -summary.ll_mixture(target)
        mean = summary.mean.double()
        target = target.to(mean.device).double().reshape(mean.shape)
        se = (mean - target) ** 2
        self.n += se.numel()
        self.inputs += se.shape[0]
        self.se_sum += se.sum()
        if summary.deterministic_mean is not None:
            self.det_n += se.numel()
            self.det_se_sum += ((summary.deterministic_mean.double().reshape(mean.shape) - target) ** 2).sum()
        self.nll_sum += gaussian_nll_elements(mean, summary.variance, target).sum()
        if mixture_nll is not None:
            self.mix_n += mixture_nll.numel()
            self.mix_nll_sum += mixture_nll.detach().double().sum()
        self.var_sum += summary.variance.double().sum()
        self.alea_sum += summary.aleatoric.double().sum()
        self.epi_sum += summary.epistemic.double().sum()
        self.covered += covered(mean, summary.variance, target, self.levels).flatten(1).double().sum(1)
        self.scores.append(summary.score(self.score_name).detach().double().flatten())
        self.sq_errors.append(se.reshape(se.shape[0], -1).mean(-1))

    def score_and_error(self) -> tuple[Tensor, Tensor]:
        """Per-input scores and mean squared errors (synced states after ``compute``)."""
        if isinstance(self.scores, list) and not self.scores:
            empty = torch.zeros(0, dtype=torch.float64)
            return empty, empty
        return dim_zero_cat(self.scores), dim_zero_cat(self.sq_errors)

    def coverage(self) -> dict[float, float]:
        n = float(self.n)
        return {lv: (float(c) / n if n else float("nan")) for lv, c in zip(self.levels, self.covered, strict=True)}

    def compute(self) -> dict[str, Tensor]:
        n = float(self.n)
        nan = float("nan")

        def mean(x: Tensor) -> float:
            return float(x) / n if n else nan

        mix_n = float(self.mix_n)
        mixture = float(self.mix_nll_sum) / mix_n if mix_n and n and mix_n == float(self.inputs) else nan
        out = {
            "rmse": math.sqrt(mean(self.se_sum)) if n else nan,
            "det_rmse": math.sqrt(float(self.det_se_sum) / float(self.det_n)) if float(self.det_n) else nan,
            "nll": mean(self.nll_sum),
            "ll_mixture": -mixture,
            "nll_mixture": mixture,
            "mean_variance": mean(self.var_sum),
            "mean_aleatoric": mean(self.alea_sum),
            "mean_epistemic": mean(self.epi_sum),
        }
        cov = self.coverage()
        for level, c in cov.items():
            out[f"coverage_{round(level * 100):d}"] = c
        out["interval_error"] = sum(abs(c - lv) for lv, c in cov.items()) / len(cov) if n else nan
        score, sq = self.score_and_error()
        if n:
            if self.threshold is not None:
                ref = referral(score, sq, threshold=self.threshold)
            else:
                ref = referral(score, sq, fraction=self.refer_fraction)
            out["referred_fraction"] = ref.referred_fraction
            out["retained_rmse"] = math.sqrt(ref.retained_accuracy) if ref.n_retained else nan
        else:
            out["referred_fraction"] = nan
            out["retained_rmse"] = nan
        return explained(out, self._nan_reasons(n, mix_n), self._warned, type(self).__name__)

    def _nan_reasons(self, n: float, mix_n: float) -> dict[str, str]:
        """Why each metric that can be NaN is NaN (see :func:`explained`)."""
        if not n:
            return dict.fromkeys(("rmse", "det_rmse", "nll", "ll_mixture", "nll_mixture", "mean_variance",
                                  "mean_aleatoric", "mean_epistemic", "interval_error", "referred_fraction",
                                  "retained_rmse", *(f"coverage_{round(lv * 100):d}" for lv in self.levels)),
                                 "no target was scored (update() was not called)")
        if mix_n:
            mixture = (f"only {mix_n:.0f} of the {float(self.inputs):.0f} inputs had the sampled means with variances "
                       f"or tau, so the mixture average would cover part of the data")
        else:
            mixture = ("the mixture of the T Gaussians needs a noise precision: set uncertainty.tau "
                       "(mc_predict(..., tau=...)) or predict variances (model.loss: gaussian_nll)")
        referral_setting = (f"threshold={self.threshold!r}" if self.threshold is not None
                            else f"refer_fraction={self.refer_fraction!r}")
        return {
            "det_rmse": "no deterministic pass was made (mc_predict(..., deterministic=True) adds it)",
            "ll_mixture": mixture,
            "nll_mixture": mixture,
            "retained_rmse": f"every input was referred ({referral_setting}); lower it to keep some",
        }


class ProbabilityCalibration(Metric):
    """NLL, ECE and the reliability bins of ``[B, C]`` probabilities, accumulated over batches.

    Used to compare one prediction before and after temperature scaling; ``compute()`` returns
    ``{"nll": ..., "ece": ...}`` (0-d float64 tensors, NaN before any update).
    """

    full_state_update = False
    higher_is_better = None
    is_differentiable = False

    n: Tensor
    nll_sum: Tensor
    bin_count: Tensor
    bin_conf: Tensor
    bin_correct: Tensor

    def __init__(self, n_bins: int = DEFAULT_BINS, ignore_index: int | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.n_bins = n_bins
        self.ignore_index = ignore_index
        self.add_state("n", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("nll_sum", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        for name in ("bin_count", "bin_conf", "bin_correct"):
            self.add_state(name, default=torch.zeros(n_bins, dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, probs: Tensor, target: Tensor) -> None:
        """Add ``[B, C]`` (or dense ``[B, ..., C]``) probabilities and their targets."""
        probs = probs.double().reshape(-1, probs.shape[-1])
        target = target.to(probs.device).long().flatten()
        if self.ignore_index is not None:
            keep = target != self.ignore_index
            probs, target = probs[keep], target[keep]
        self.n += target.numel()
        self.nll_sum += nll_per_sample(probs, target).sum()
        count, conf_sum, corr_sum = calibration_bins(*top_label(probs, target), self.n_bins)
        self.bin_count += count
        self.bin_conf += conf_sum
        self.bin_correct += corr_sum

    def reliability(self) -> ReliabilityData:
        """Reliability-diagram data from the accumulated bins."""
        return ReliabilityData.from_bins(self.bin_count, self.bin_conf, self.bin_correct)

    def compute(self) -> dict[str, Tensor]:
        n = float(self.n)
        out = {"nll": float(self.nll_sum) / n if n else float("nan"),
               "ece": ece_from_bins(self.bin_count, self.bin_conf, self.bin_correct)}
        return {k: torch.tensor(v, dtype=torch.float64) for k, v in out.items()}
