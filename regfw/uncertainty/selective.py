"""Selective prediction: the model answers only where it is sure enough, and abstains elsewhere.

Inputs are accepted in order of increasing uncertainty score; at *coverage* ``c`` the ``c * N``
least uncertain are answered. This is the referral curve read the other way round (coverage =
1 - fraction referred):

* **risk** at coverage ``c``: the error rate on the accepted inputs (selective risk; Geifman &
  El-Yaniv 2017, "Selective Classification for Deep Neural Networks");
* **AURC**: the mean selective risk over the coverages ``1/N, 2/N, ..., 1`` (area under the
  risk-coverage curve; Geifman et al. 2019, "Bias-Reduced Uncertainty Estimation for Deep
  Neural Classifiers"); lower is better;
* **AUGRC**: the mean *generalized* risk, the fraction of all inputs that are both accepted and
  wrong (``risk(c) * c``), over the same coverages (Traub et al. 2024, "Overcoming Common Flaws
  in the Evaluation of Selective Classification Systems"); lower is better, and unlike AURC it
  does not over-weight the few most confident inputs;
* risk at 80% and 95% coverage.

Tied scores share their errors evenly (see :func:`risk_coverage`), so the curve does not
depend on the order of the inputs.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["RiskCoverage", "risk_coverage", "selective_metrics", "COVERAGES"]

#: Coverages at which the risk is reported (``risk_80``, ``risk_95``).
COVERAGES: tuple[float, ...] = (0.8, 0.95)


@dataclass
class RiskCoverage:
    """The risk-coverage curve, ascending in coverage, and its summaries."""

    coverage: Tensor  #: ``[N]`` coverages ``1/N .. 1``
    risk: Tensor  #: ``[N]`` error rate on the accepted inputs at each coverage
    aurc: float
    augrc: float

    def risk_at(self, coverage: float) -> float:
        """Selective risk at the smallest coverage >= ``coverage`` (NaN on an empty curve)."""
        if self.coverage.numel() == 0:
            return float("nan")
        i = int(torch.searchsorted(self.coverage, torch.tensor(float(coverage) - 1e-12, dtype=torch.float64)))
        return float(self.risk[min(i, self.risk.numel() - 1)])


def risk_coverage(score: Tensor, correct: Tensor) -> RiskCoverage:
    """The risk-coverage curve of an uncertainty ``score`` (higher = less sure) and ``correct``
    (bool, or per-input values in [0, 1] such as pixel accuracies).

    Inputs with equal scores cannot be told apart, so within a group of ties the errors are
    spread evenly (the expected curve when ties are accepted in random order): the result does
    not depend on the order of the inputs, which DDP's gathering does not preserve.
    """
    s = score.detach().double().flatten().cpu()
    err = 1.0 - correct.detach().double().flatten().cpu()
    n = s.numel()
    if n == 0:
        empty = torch.zeros(0, dtype=torch.float64)
        return RiskCoverage(empty, empty, float("nan"), float("nan"))
    order = torch.sort(s, stable=True).indices  # most certain first
    s, err = s[order], err[order]
    _, counts = torch.unique_consecutive(s, return_counts=True)
    group = torch.repeat_interleave(torch.arange(counts.numel()), counts)
    group_err = torch.zeros(counts.numel(), dtype=torch.float64).index_add_(0, group, err)
    size = counts.double()
    before = group_err.cumsum(0) - group_err  # errors accepted before each group
    start = counts.cumsum(0) - counts
    within = (torch.arange(n) - start[group] + 1).double()
    errors = before[group] + within * group_err[group] / size[group]  # accepted errors at coverage k / n
    k = torch.arange(1, n + 1, dtype=torch.float64)
    coverage, risk = k / n, errors / k
    return RiskCoverage(coverage=coverage, risk=risk, aurc=float(risk.mean()), augrc=float((errors / n).mean()))


def selective_metrics(score: Tensor, correct: Tensor) -> dict[str, float]:
    """``aurc``, ``augrc``, ``risk_80`` and ``risk_95`` of ``score`` and ``correct``."""
    rc = risk_coverage(score, correct)
    out = {"aurc": rc.aurc, "augrc": rc.augrc}
    for c in COVERAGES:
        out[f"risk_{round(c * 100):d}"] = rc.risk_at(c)
    return out
