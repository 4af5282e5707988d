"""Metrics for predictive uncertainty: calibration, error detection, referral, regression.

Functions take tensors of a whole evaluation set; the :class:`torchmetrics.Metric` classes at
the end accumulate the same quantities batch by batch in states with ``dist_reduce_fx``
(sums of bin counts, concatenated scores), so values are exact under DDP.

Conventions:

* log-likelihoods use natural logs (nats); probabilities are clamped at :data:`EPS` first;
* ECE (Naeini et al. 2015; Guo et al. 2017, "On Calibration of Modern Neural Networks") is
  top-label with ``n_bins`` (default 15) equal-width bins over [0, 1]: bin ``i`` is
  ``[i/n, (i+1)/n)`` except the last, which is closed, so a confidence of exactly 1.0 lands in
  the last bin and exactly 0.0 in the first;
* Brier score (Brier 1950) is the multi-class form, the squared distance between the
  probability vector and the one-hot label summed over classes (range [0, 2]), averaged;
* AUROC is rank based (Mann-Whitney U with average ranks for ties): the probability that a
  random positive scores higher than a random negative, ties counting one half;
* referral (human review; Leibig et al. 2017, "Leveraging uncertainty information from deep
  neural networks for disease detection"): the most uncertain inputs are sent to a person,
  the model is scored on the rest.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor
from torchmetrics import Metric
from torchmetrics.utilities import dim_zero_cat

from regfw.uncertainty.summaries import MIN_VARIANCE, ClassificationSummary, RegressionSummary

__all__ = [
    "EPS",
    "DEFAULT_BINS",
    "DEFAULT_LEVELS",
    "accuracy",
    "nll",
    "brier_score",
    "bin_index",
    "calibration_bins",
    "ece",
    "ece_from_bins",
    "ReliabilityData",
    "reliability_diagram",
    "auroc",
    "error_auroc",
    "Referral",
    "referral",
    "referral_curve",
    "retained_curve",
    "rmse",
    "gaussian_nll",
    "interval_coverage",
    "interval_calibration_error",
    "MCClassificationMetrics",
    "MCRegressionMetrics",
    "ProbabilityCalibration",
]

#: Probabilities are clamped to at least this before a log.
EPS = 1e-12
DEFAULT_BINS = 15
DEFAULT_LEVELS: tuple[float, ...] = (0.5, 0.8, 0.9, 0.95)


# --------------------------------------------------------------------------- classification


def accuracy(probs: Tensor, target: Tensor) -> float:
    """Fraction of ``argmax(probs) == target``; ``probs`` is ``[B, C]``."""
    return float((probs.argmax(-1) == target).float().mean())


def _nll_per_sample(probs: Tensor, target: Tensor) -> Tensor:
    p = probs.gather(-1, target.long().unsqueeze(-1)).squeeze(-1)
    return -torch.log(p.clamp_min(EPS))


def nll(probs: Tensor, target: Tensor) -> float:
    """Mean negative log-likelihood of the targets, nats; ``probs`` is ``[B, C]``."""
    return float(_nll_per_sample(probs.double(), target).mean())


def _brier_per_sample(probs: Tensor, target: Tensor) -> Tensor:
    onehot = torch.nn.functional.one_hot(target.long(), probs.shape[-1]).to(probs.dtype)
    return ((probs - onehot) ** 2).sum(-1)


def brier_score(probs: Tensor, target: Tensor) -> float:
    """Multi-class Brier score: mean over inputs of ``sum_c (p_c - 1[c = y])^2``, in [0, 2]."""
    return float(_brier_per_sample(probs.double(), target).mean())


def bin_index(confidence: Tensor, n_bins: int = DEFAULT_BINS) -> Tensor:
    """Bin of each confidence: ``floor(conf * n_bins)`` clipped to ``[0, n_bins - 1]``.

    Bins are ``[i/n, (i+1)/n)``, the last one closed: 1.0 goes to bin ``n - 1``, 0.0 to bin 0.
    """
    if n_bins < 1:
        raise ValueError(f"n_bins must be >= 1, got {n_bins!r}")
    return torch.floor(confidence.double() * n_bins).long().clamp(0, n_bins - 1)


def calibration_bins(
    confidence: Tensor, correct: Tensor, n_bins: int = DEFAULT_BINS
) -> tuple[Tensor, Tensor, Tensor]:
    """Per-bin ``(count, sum of confidence, number correct)``, each of shape ``[n_bins]``."""
    idx = bin_index(confidence, n_bins)
    count = torch.zeros(n_bins, dtype=torch.float64, device=confidence.device)
    conf_sum = torch.zeros_like(count)
    corr_sum = torch.zeros_like(count)
    count.index_add_(0, idx, torch.ones_like(idx, dtype=torch.float64))
    conf_sum.index_add_(0, idx, confidence.double())
    corr_sum.index_add_(0, idx, correct.double())
    return count, conf_sum, corr_sum


def ece_from_bins(count: Tensor, conf_sum: Tensor, corr_sum: Tensor) -> float:
    """ECE from per-bin sums: ``sum_i |acc_i - conf_i| * n_i / N``."""
    n = float(count.sum())
    if n == 0:
        return float("nan")
    return float((conf_sum - corr_sum).abs().sum() / n)


def _top_label(probs: Tensor, target: Tensor) -> tuple[Tensor, Tensor]:
    conf, pred = probs.max(-1)
    return conf, (pred == target).to(conf.dtype)


def ece(probs: Tensor, target: Tensor, n_bins: int = DEFAULT_BINS) -> float:
    """Top-label expected calibration error with ``n_bins`` equal-width bins; ``probs`` ``[B, C]``."""
    return ece_from_bins(*calibration_bins(*_top_label(probs, target), n_bins))


@dataclass
class ReliabilityData:
    """Data of a reliability diagram; empty bins have NaN confidence and accuracy."""

    edges: Tensor  #: ``[n_bins + 1]`` bin edges over [0, 1]
    confidence: Tensor  #: ``[n_bins]`` mean confidence per bin
    accuracy: Tensor  #: ``[n_bins]`` accuracy per bin
    count: Tensor  #: ``[n_bins]`` number of inputs per bin

    @classmethod
    def from_bins(cls, count: Tensor, conf_sum: Tensor, corr_sum: Tensor) -> ReliabilityData:
        count = count.double().cpu()
        safe = count.clamp_min(1)
        empty = count == 0
        conf = torch.where(empty, torch.nan, conf_sum.double().cpu() / safe)
        acc = torch.where(empty, torch.nan, corr_sum.double().cpu() / safe)
        edges = torch.linspace(0, 1, len(count) + 1, dtype=torch.float64)
        return cls(edges=edges, confidence=conf, accuracy=acc, count=count)

    @property
    def ece(self) -> float:
        n = float(self.count.sum())
        if n == 0:
            return float("nan")
        gap = (self.confidence - self.accuracy).abs().nan_to_num(0.0)
        return float((gap * self.count).sum() / n)


def reliability_diagram(probs: Tensor, target: Tensor, n_bins: int = DEFAULT_BINS) -> ReliabilityData:
    """Per-bin mean confidence, accuracy and count of the top-label prediction."""
    return ReliabilityData.from_bins(*calibration_bins(*_top_label(probs, target), n_bins))


def auroc(score: Tensor, positive: Tensor) -> float:
    """Area under the ROC curve of ``score`` for detecting ``positive`` (rank based).

    Equals the probability that a random positive has a higher score than a random negative,
    ties counting 1/2 (average ranks). NaN when there is no positive or no negative.
    """
    s = score.detach().double().flatten().cpu()
    y = positive.detach().bool().flatten().cpu()
    if s.shape != y.shape:
        raise ValueError(f"score and positive must have the same number of elements, got {s.numel()} and {y.numel()}")
    n_pos = int(y.sum())
    n_neg = y.numel() - n_pos
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    sorted_s, order = torch.sort(s)
    _, inverse, counts = torch.unique_consecutive(sorted_s, return_inverse=True, return_counts=True)
    ends = counts.cumsum(0).double()
    avg_rank = ends - (counts.double() - 1) / 2  # 1-based average rank of each tie group
    ranks = torch.empty_like(s)
    ranks[order] = avg_rank[inverse]
    u = ranks[y].sum() - n_pos * (n_pos + 1) / 2
    return float(u / (n_pos * n_neg))


def error_auroc(score: Tensor, correct: Tensor) -> float:
    """AUROC of an uncertainty ``score`` for detecting the model's own errors (``~correct``)."""
    return auroc(score, ~correct.bool())


@dataclass
class Referral:
    """Outcome of referring the most uncertain inputs to human review."""

    threshold: float  #: inputs with a score above it were referred
    referred_fraction: float
    retained_accuracy: float  #: NaN when every input was referred
    n_referred: int
    n_retained: int


def referral(
    score: Tensor,
    correct: Tensor,
    threshold: float | None = None,
    fraction: float | None = None,
) -> Referral:
    """Refer inputs to a person and score the model on the ones it keeps.

    Give exactly one of ``threshold`` (refer every input with ``score > threshold``) or
    ``fraction`` (refer the ``round(fraction * N)`` inputs with the highest scores; among equal
    scores, the earlier input is referred first). ``correct`` marks the model's right answers
    (bool, or values in [0, 1] whose mean is reported).
    """
    if (threshold is None) == (fraction is None):
        raise ValueError(
            f"referral needs exactly one of threshold or fraction, got threshold={threshold!r}, fraction={fraction!r}"
        )
    s = score.detach().double().flatten().cpu()
    c = correct.detach().double().flatten().cpu()
    n = s.numel()
    if threshold is not None:
        referred = s > float(threshold)
        thr = float(threshold)
    else:
        if not 0.0 <= float(fraction) <= 1.0:  # type: ignore[arg-type]
            raise ValueError(f"fraction must be in [0, 1], got {fraction!r}")
        k = int(round(float(fraction) * n))  # type: ignore[arg-type]
        order = torch.sort(s, descending=True, stable=True).indices
        referred = torch.zeros(n, dtype=torch.bool)
        referred[order[:k]] = True
        thr = float(s[order[k - 1]]) if k > 0 else math.inf
    kept = ~referred
    n_ret = int(kept.sum())
    acc = float(c[kept].mean()) if n_ret else float("nan")
    return Referral(
        threshold=thr,
        referred_fraction=(n - n_ret) / n if n else float("nan"),
        retained_accuracy=acc,
        n_referred=n - n_ret,
        n_retained=n_ret,
    )


def retained_curve(score: Tensor, values: Tensor) -> tuple[Tensor, Tensor]:
    """Mean of ``values`` over the retained inputs when the ``k`` highest scores are referred.

    Returns ``(fractions, means)``, both ``[N]`` (float64, CPU), for ``k = 0 .. N - 1``
    (``fractions = k / N``); ties are broken as in :func:`referral`.
    """
    s = score.detach().double().flatten().cpu()
    v = values.detach().double().flatten().cpu()
    n = s.numel()
    if n == 0:
        return torch.zeros(0, dtype=torch.float64), torch.zeros(0, dtype=torch.float64)
    order = torch.sort(s, descending=True, stable=True).indices
    tail = v[order].flip(0).cumsum(0).flip(0)  # tail[k] = sum of values not referred
    remaining = torch.arange(n, 0, -1, dtype=torch.float64)
    return torch.arange(n, dtype=torch.float64) / n, tail / remaining


def referral_curve(score: Tensor, correct: Tensor) -> tuple[Tensor, Tensor]:
    """``(fraction referred, accuracy on the retained)`` for every number referred ``0..N-1``.

    With an informative score the accuracy rises as more inputs are referred; at fraction 0
    it is the plain accuracy.
    """
    return retained_curve(score, correct.double())


# --------------------------------------------------------------------------- regression


def rmse(mean: Tensor, target: Tensor) -> float:
    """Root mean squared error over all elements."""
    return float(((mean.double() - target.double()) ** 2).mean().sqrt())


def _gaussian_nll_elements(mean: Tensor, variance: Tensor, target: Tensor) -> Tensor:
    v = variance.double().clamp_min(MIN_VARIANCE)
    return 0.5 * (torch.log(2 * math.pi * v) + (target.double() - mean.double()) ** 2 / v)


def gaussian_nll(mean: Tensor, variance: Tensor, target: Tensor) -> float:
    """Mean Gaussian negative log-likelihood (nats per output element) of the targets under
    ``N(mean, variance)``; pass the *total* predictive variance (aleatoric + epistemic)."""
    return float(_gaussian_nll_elements(mean, variance, target).mean())


def _z(levels: Sequence[float]) -> Tensor:
    lv = torch.tensor([float(x) for x in levels], dtype=torch.float64)
    if torch.any((lv <= 0) | (lv >= 1)):
        raise ValueError(f"interval levels must be in (0, 1), got {list(levels)}")
    return torch.special.ndtri((1 + lv) / 2)


def _covered(mean: Tensor, variance: Tensor, target: Tensor, levels: Sequence[float]) -> Tensor:
    """``[len(levels), *shape]`` bool: target inside the central interval at each level."""
    z = _z(levels).to(mean.device)
    std = variance.double().clamp_min(0).sqrt()
    err = (target.double() - mean.double()).abs()
    return err.unsqueeze(0) <= z.view(-1, *([1] * err.dim())) * std.unsqueeze(0)


def interval_coverage(
    mean: Tensor, variance: Tensor, target: Tensor, levels: Sequence[float] = DEFAULT_LEVELS
) -> dict[float, float]:
    """Observed coverage of the central Gaussian intervals ``mean +- z_l * std`` per level ``l``.

    A calibrated model covers a fraction ``l`` of the targets at level ``l``.
    """
    cov = _covered(mean, variance, target, levels).flatten(1).double().mean(1)
    return {float(lv): float(c) for lv, c in zip(levels, cov, strict=True)}


def interval_calibration_error(
    mean: Tensor, variance: Tensor, target: Tensor, levels: Sequence[float] = DEFAULT_LEVELS
) -> float:
    """Mean absolute gap between observed coverage and nominal level over ``levels``."""
    cov = interval_coverage(mean, variance, target, levels)
    return sum(abs(c - lv) for lv, c in cov.items()) / len(cov)


# --------------------------------------------------------------------------- torchmetrics


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
        self.nll_sum += _nll_per_sample(p, tgt).sum()
        self.brier_sum += _brier_per_sample(p, tgt).sum()
        for state, values in (("mi_sum", summary.mutual_information), ("entropy_sum", summary.predictive_entropy),
                              ("exp_entropy_sum", summary.expected_entropy), ("vr_sum", summary.variation_ratio)):
            setattr(self, state, getattr(self, state) + values.double().flatten()[flat_valid].sum())
        count, conf_sum, corr_sum = calibration_bins(conf, correct, self.n_bins)
        self.bin_count += count
        self.bin_conf += conf_sum
        self.bin_correct += corr_sum
        score = summary.score(self.score_name).detach().double()
        if probs.dim() > 2:  # one score and one accuracy per image / sequence
            from regfw.uncertainty.summaries import per_input

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
        from regfw.uncertainty.selective import COVERAGES, selective_metrics  # it builds on retained_curve

        if n:
            out.update(selective_metrics(score, correct))
        else:
            out.update({"aurc": nan, "augrc": nan, **{f"risk_{round(c * 100):d}": nan for c in COVERAGES}})
        return {k: torch.tensor(v, dtype=torch.float64) for k, v in out.items()}


class MCRegressionMetrics(Metric):
    """Accumulates MC-dropout regression metrics over batches, exact under DDP.

    ``update(summary, target)`` takes a :class:`RegressionSummary`. ``compute()`` returns
    ``rmse, det_rmse, nll`` (moment-matched Gaussian, total variance, nats per element),
    ``nll_mixture`` (the mixture of the T Gaussians, Gal & Ghahramani 2016; NaN unless
    ``update`` got ``mixture_nll``), ``coverage_50``,
    ``coverage_80``, ... (one per level, the percentage in the name), ``interval_error``
    (mean |coverage - level|), ``mean_variance``, ``mean_aleatoric``, ``mean_epistemic``,
    ``referred_fraction`` and ``retained_rmse`` (the ``refer_fraction`` inputs with the largest
    ``score`` -- or those above ``threshold`` -- removed).
    """

    full_state_update = False
    higher_is_better = None
    is_differentiable = False

    n: Tensor
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
        _z(levels)  # validate
        self.levels = tuple(float(x) for x in levels)
        self.score_name = score
        self.threshold = threshold
        self.refer_fraction = refer_fraction
        zero = lambda: torch.tensor(0.0, dtype=torch.float64)  # noqa: E731
        for name in ("n", "det_n", "se_sum", "det_se_sum", "nll_sum", "mix_n", "mix_nll_sum", "var_sum", "alea_sum",
                     "epi_sum"):
            self.add_state(name, default=zero(), dist_reduce_fx="sum")
        self.add_state("covered", default=torch.zeros(len(self.levels), dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("scores", default=[], dist_reduce_fx="cat")
        self.add_state("sq_errors", default=[], dist_reduce_fx="cat")

    def update(self, summary: RegressionSummary, target: Tensor, mixture_nll: Tensor | None = None) -> None:
        """Add a batch; ``mixture_nll`` (``[B]``, from :meth:`MCResult.nll_mixture`) feeds ``nll_mixture``."""
        mean = summary.mean.double()
        target = target.to(mean.device).double().reshape(mean.shape)
        se = (mean - target) ** 2
        self.n += se.numel()
        self.se_sum += se.sum()
        if summary.deterministic_mean is not None:
            self.det_n += se.numel()
            self.det_se_sum += ((summary.deterministic_mean.double().reshape(mean.shape) - target) ** 2).sum()
        self.nll_sum += _gaussian_nll_elements(mean, summary.variance, target).sum()
        if mixture_nll is not None:
            self.mix_n += mixture_nll.numel()
            self.mix_nll_sum += mixture_nll.detach().double().sum()
        self.var_sum += summary.variance.double().sum()
        self.alea_sum += summary.aleatoric.double().sum()
        self.epi_sum += summary.epistemic.double().sum()
        self.covered += _covered(mean, summary.variance, target, self.levels).flatten(1).double().sum(1)
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

        out = {
            "rmse": math.sqrt(mean(self.se_sum)) if n else nan,
            "det_rmse": math.sqrt(float(self.det_se_sum) / float(self.det_n)) if float(self.det_n) else nan,
            "nll": mean(self.nll_sum),
            "nll_mixture": float(self.mix_nll_sum) / float(self.mix_n) if float(self.mix_n) else nan,
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
        return {k: torch.tensor(v, dtype=torch.float64) for k, v in out.items()}


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
        self.nll_sum += _nll_per_sample(probs, target).sum()
        count, conf_sum, corr_sum = calibration_bins(*_top_label(probs, target), self.n_bins)
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
