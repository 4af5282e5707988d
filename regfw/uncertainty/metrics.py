"""Metrics for predictive uncertainty: calibration, error detection, referral, regression.

Functions take tensors of a whole evaluation set; the :class:`torchmetrics.Metric` classes of
:mod:`regfw.uncertainty.accumulators` accumulate the same quantities batch by batch.

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

import torch
from torch import Tensor

from regfw.uncertainty.summaries import MIN_VARIANCE

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
]

#: Probabilities are clamped to at least this before a log.
EPS = 1e-12
DEFAULT_BINS = 15
DEFAULT_LEVELS: tuple[float, ...] = (0.5, 0.8, 0.9, 0.95)


# --------------------------------------------------------------------------- classification


def accuracy(probs: Tensor, target: Tensor) -> float:
    """Fraction of ``argmax(probs) == target``; ``probs`` is ``[B, C]``."""
    return float((probs.argmax(-1) == target).float().mean())


def nll_per_sample(probs: Tensor, target: Tensor) -> Tensor:
    p = probs.gather(-1, target.long().unsqueeze(-1)).squeeze(-1)
    return -torch.log(p.clamp_min(EPS))


def nll(probs: Tensor, target: Tensor) -> float:
    """Mean negative log-likelihood of the targets, nats; ``probs`` is ``[B, C]``."""
    return float(nll_per_sample(probs.double(), target).mean())


def brier_per_sample(probs: Tensor, target: Tensor) -> Tensor:
    onehot = torch.nn.functional.one_hot(target.long(), probs.shape[-1]).to(probs.dtype)
    return ((probs - onehot) ** 2).sum(-1)


def brier_score(probs: Tensor, target: Tensor) -> float:
    """Multi-class Brier score: mean over inputs of ``sum_c (p_c - 1[c = y])^2``, in [0, 2]."""
    return float(brier_per_sample(probs.double(), target).mean())


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


def top_label(probs: Tensor, target: Tensor) -> tuple[Tensor, Tensor]:
    conf, pred = probs.max(-1)
    return conf, (pred == target).to(conf.dtype)


def ece(probs: Tensor, target: Tensor, n_bins: int = DEFAULT_BINS) -> float:
    """Top-label expected calibration error with ``n_bins`` equal-width bins; ``probs`` ``[B, C]``."""
    return ece_from_bins(*calibration_bins(*top_label(probs, target), n_bins))


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
    return ReliabilityData.from_bins(*calibration_bins(*top_label(probs, target), n_bins))


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


def gaussian_nll_elements(mean: Tensor, variance: Tensor, target: Tensor) -> Tensor:
    v = variance.double().clamp_min(MIN_VARIANCE)
    return 0.5 * (torch.log(2 * math.pi * v) + (target.double() - mean.double()) ** 2 / v)


def gaussian_nll(mean: Tensor, variance: Tensor, target: Tensor) -> float:
    """Mean Gaussian negative log-likelihood (nats per output element) of the targets under
    ``N(mean, variance)``; pass the *total* predictive variance (aleatoric + epistemic)."""
    return float(gaussian_nll_elements(mean, variance, target).mean())


def z_scores(levels: Sequence[float]) -> Tensor:
    lv = torch.tensor([float(x) for x in levels], dtype=torch.float64)
    if torch.any((lv <= 0) | (lv >= 1)):
        raise ValueError(f"interval levels must be in (0, 1), got {list(levels)}")
    return torch.special.ndtri((1 + lv) / 2)


def covered(mean: Tensor, variance: Tensor, target: Tensor, levels: Sequence[float]) -> Tensor:
    """``[len(levels), *shape]`` bool: target inside the central interval at each level."""
    z = z_scores(levels).to(mean.device)
    std = variance.double().clamp_min(0).sqrt()
    err = (target.double() - mean.double()).abs()
    return err.unsqueeze(0) <= z.view(-1, *([1] * err.dim())) * std.unsqueeze(0)


def interval_coverage(
    mean: Tensor, variance: Tensor, target: Tensor, levels: Sequence[float] = DEFAULT_LEVELS
) -> dict[float, float]:
    """Observed coverage of the central Gaussian intervals ``mean +- z_l * std`` per level ``l``.

    A calibrated model covers a fraction ``l`` of the targets at level ``l``.
    """
    cov = covered(mean, variance, target, levels).flatten(1).double().mean(1)
    return {float(lv): float(c) for lv, c in zip(levels, cov, strict=True)}


def interval_calibration_error(
    mean: Tensor, variance: Tensor, target: Tensor, levels: Sequence[float] = DEFAULT_LEVELS
) -> float:
    """Mean absolute gap between observed coverage and nominal level over ``levels``."""
    cov = interval_coverage(mean, variance, target, levels)
    return sum(abs(c - lv) for lv, c in cov.items()) / len(cov)
