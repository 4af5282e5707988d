"""Out-of-distribution (OOD) detection: how well uncertainty scores tell unfamiliar inputs apart.

The in-distribution inputs are the validation set; the out-of-distribution ones come from a
separate loader (any data module, or the built-in held-out-classes protocol of
:func:`heldout_classes`). Every score is oriented so that **higher means more likely OOD**:

* ``msp`` -- ``1 -`` the maximum softmax probability of the MC predictive (Hendrycks & Gimpel
  2017, "A Baseline for Detecting Misclassified and Out-of-Distribution Examples");
* ``entropy`` -- predictive entropy (nats); ``mutual_information`` -- BALD, the epistemic part
  (Gal 2016; Smith & Gal 2018, "Understanding Measures of Uncertainty for Adversarial Example
  Detection"); ``variation_ratio`` -- ``1 -`` the modal vote share;
* ``energy`` -- ``-logsumexp(z)`` of the logits averaged over the T samples (Liu et al. 2020,
  "Energy-based Out-of-distribution Detection").

Metrics, with OOD as the positive class: AUROC (rank based, ties 1/2), AUPR (average precision
of detecting OOD, "AUPR-Out") and FPR@95TPR: the fraction of in-distribution inputs flagged at
the highest threshold that still flags at least 95% of the OOD inputs (lower is better).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor
from torchmetrics import Metric
from torchmetrics.utilities import dim_zero_cat

from regfw.uncertainty.metrics import auroc
from regfw.uncertainty.summaries import ClassificationSummary

__all__ = ["OOD_SCORES", "OODResult", "OODScoreStore", "ood_scores", "average_precision", "fpr_at_tpr", "ood_metrics",
           "heldout_classes"]

#: The OOD scores, all "higher = more likely out of distribution".
OOD_SCORES: tuple[str, ...] = ("msp", "entropy", "mutual_information", "variation_ratio", "energy")


def ood_scores(summary: ClassificationSummary, logits: Tensor | None = None) -> dict[str, Tensor]:
    """Each of :data:`OOD_SCORES` per input, ``[B]`` (``energy`` needs the ``[T, B, C]`` logits)."""
    out = {
        "msp": 1.0 - summary.confidence,
        "entropy": summary.predictive_entropy,
        "mutual_information": summary.mutual_information,
        "variation_ratio": summary.variation_ratio,
    }
    if logits is not None:
        out["energy"] = -torch.logsumexp(logits.double(), dim=-1).mean(0)
    return {k: v.detach().double().flatten().cpu() for k, v in out.items()}


class OODScoreStore(Metric):
    """The per-input OOD scores of many batches, concatenated across processes (exact under DDP)."""

    full_state_update = False
    higher_is_better = None
    is_differentiable = False

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        for name in OOD_SCORES:
            self.add_state(name, default=[], dist_reduce_fx="cat")

    def update(self, scores: dict[str, Tensor]) -> None:
        for name, value in scores.items():
            getattr(self, name).append(value.detach().double().flatten())

    def compute_scores(self) -> dict[str, Tensor]:
        """``{score: [N]}`` for every score seen (synchronised under DDP)."""
        result: dict[str, Tensor] = self.compute()
        return result

    def compute(self) -> dict[str, Tensor]:
        out = {}
        for name in OOD_SCORES:
            value = getattr(self, name)
            if isinstance(value, list) and not value:
                continue
            out[name] = dim_zero_cat(value).cpu()
        return out


def average_precision(score: Tensor, positive: Tensor) -> float:
    """Average precision of ``score`` for ``positive`` (area under the precision-recall curve,
    step-wise as in scikit-learn); NaN without positives."""
    s = score.detach().double().flatten().cpu()
    y = positive.detach().bool().flatten().cpu()
    n_pos = int(y.sum())
    if n_pos == 0 or s.numel() == 0:
        return float("nan")
    order = torch.sort(s, descending=True, stable=True).indices
    s, y = s[order], y[order].double()
    tp = y.cumsum(0)
    # thresholds at the last index of each group of tied scores
    last = torch.ones_like(s, dtype=torch.bool)
    last[:-1] = s[1:] != s[:-1]
    tp, k = tp[last], torch.arange(1, s.numel() + 1, dtype=torch.float64)[last]
    precision, recall = tp / k, tp / n_pos
    prev = torch.cat([torch.zeros(1, dtype=torch.float64), recall[:-1]])
    return float(((recall - prev) * precision).sum())


def fpr_at_tpr(score: Tensor, positive: Tensor, tpr: float = 0.95) -> float:
    """Fraction of negatives with ``score >= t`` at the largest ``t`` flagging ``>= tpr`` of the
    positives; NaN without positives or negatives."""
    s = score.detach().double().flatten().cpu()
    y = positive.detach().bool().flatten().cpu()
    pos, neg = s[y], s[~y]
    if pos.numel() == 0 or neg.numel() == 0:
        return float("nan")
    k = max(1, int(torch.ceil(torch.tensor(tpr * pos.numel())).item()))
    threshold = torch.sort(pos, descending=True).values[k - 1]
    return float((neg >= threshold).double().mean())


@dataclass
class OODResult:
    """Per-score AUROC, AUPR and FPR@95TPR of in- vs out-of-distribution scores."""

    auroc: dict[str, float]
    aupr: dict[str, float]
    fpr95: dict[str, float]
    n_in: int
    n_out: int

    def as_metrics(self, prefix: str = "ood/") -> dict[str, float]:
        """Flat ``{"ood/auroc_mutual_information": ..., ...}`` for logging."""
        out: dict[str, float] = {}
        for name, table in (("auroc", self.auroc), ("aupr", self.aupr), ("fpr95", self.fpr95)):
            out.update({f"{prefix}{name}_{score}": v for score, v in table.items()})
        return out


def ood_metrics(in_scores: dict[str, Tensor], out_scores: dict[str, Tensor]) -> OODResult:
    """AUROC, AUPR and FPR@95TPR of every score present in both ``in_scores`` and ``out_scores``.

    Raises:
        ValueError: either side is empty (an OOD evaluation needs both kinds of input).
    """
    names = [n for n in OOD_SCORES if n in in_scores and n in out_scores]
    n_in = int(next(iter(in_scores.values())).numel()) if in_scores else 0
    n_out = int(next(iter(out_scores.values())).numel()) if out_scores else 0
    if n_in == 0 or n_out == 0:
        raise ValueError(f"OOD evaluation needs in-distribution and out-of-distribution inputs, got {n_in} in "
                         f"and {n_out} out; check the OOD loader and uncertainty.max_batches")
    res = OODResult({}, {}, {}, n_in, n_out)
    for name in names:
        s = torch.cat([in_scores[name], out_scores[name]])
        y = torch.cat([torch.zeros(n_in, dtype=torch.bool), torch.ones(n_out, dtype=torch.bool)])
        res.auroc[name] = auroc(s, y)
        res.aupr[name] = average_precision(s, y)
        res.fpr95[name] = fpr_at_tpr(s, y)
    return res


def heldout_classes(datamodule: object, in_classes: list[int] | None = None, batch_size: int = 256) -> object:
    """The built-in OOD protocol: keep only ``in_classes`` for training and validation, and return
    a loader of the validation inputs of every other class as the OOD set.

    Works on data modules holding ``x_train``/``y_train``/``x_val``/``y_val`` tensors (the built-in
    ``digits``); the default keeps the first half of the classes (digits 0-4 against 5-9). Labels
    are renumbered ``0 .. len(in_classes) - 1`` and ``num_outputs`` set to match, so the model has
    exactly one output per in-distribution class.

    Raises:
        ValueError: a regression data module, one without those tensors, or classes that leave
            one side empty.
    """
    from torch.utils.data import DataLoader, TensorDataset

    tensors = [getattr(datamodule, n, None) for n in ("x_train", "y_train", "x_val", "y_val")]
    if getattr(datamodule, "task", "classification") != "classification" or not all(
            isinstance(t, Tensor) for t in tensors):
        raise ValueError(f"uncertainty.ood.protocol=heldout_classes needs a classification data module with "
                         f"x_train/y_train/x_val/y_val tensors (the built-in digits), got {type(datamodule).__name__}; "
                         "give the OOD data as uncertainty.ood.class_path instead")
    x_tr, y_tr, x_va, y_va = tensors
    assert isinstance(y_tr, Tensor) and isinstance(y_va, Tensor)
    assert isinstance(x_tr, Tensor) and isinstance(x_va, Tensor)
    assert isinstance(x_tr, Tensor) and isinstance(x_va, Tensor)
    n_classes = int(getattr(datamodule, "num_outputs", int(y_tr.max()) + 1))
    if in_classes is not None and not isinstance(in_classes, (list, tuple)):
        raise ValueError(f"uncertainty.ood.in_classes: got {in_classes!r}, expected a list of class numbers")
    keep = list(range(n_classes // 2)) if in_classes is None else [int(c) for c in in_classes]
    if not keep or len(set(keep)) == n_classes or any(c < 0 or c >= n_classes for c in keep):
        raise ValueError(f"uncertainty.ood.in_classes: got {in_classes!r}, expected some but not all of the "
                         f"classes 0..{n_classes - 1}")
    lookup = torch.full((n_classes,), -1, dtype=torch.long)
    lookup[torch.tensor(keep)] = torch.arange(len(keep))
    tr_in, va_in = lookup[y_tr.long()] >= 0, lookup[y_va.long()] >= 0
    x_out = x_va[~va_in]
    datamodule.x_train, datamodule.y_train = x_tr[tr_in], lookup[y_tr[tr_in].long()]  # type: ignore[attr-defined]
    datamodule.x_val, datamodule.y_val = x_va[va_in], lookup[y_va[va_in].long()]  # type: ignore[attr-defined]
    datamodule.num_outputs = len(keep)  # type: ignore[attr-defined]
    if hasattr(datamodule, "n_train"):
        datamodule.n_train = int(tr_in.sum())
    return DataLoader(TensorDataset(x_out, torch.full((x_out.shape[0],), -1, dtype=torch.long)),
                      batch_size=batch_size, shuffle=False)
