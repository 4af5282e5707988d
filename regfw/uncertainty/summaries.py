"""Summaries of Monte Carlo dropout samples: what T stochastic forward passes say about one input.

All logarithms are natural, so every entropy and information quantity here is in **nats**
(divide by ``ln 2`` for bits). Probabilities are handled with ``torch.special.xlogy`` (which
defines ``0 log 0 = 0``) or clamped before a log, so certain predictions give exactly 0 and
never NaN.

Classification (Gal & Ghahramani 2016, "Dropout as a Bayesian Approximation"; Houlsby et al.
2011, "Bayesian Active Learning for Classification and Preference Learning" for BALD; Gal,
Islam & Ghahramani 2017, "Deep Bayesian Active Learning with Image Data" for the variation
ratio), with ``probs`` of shape ``[T, B, C]`` (T samples, B inputs, C classes):

* predictive entropy ``H[E_t p_t]`` -- total uncertainty;
* expected entropy ``E_t H[p_t]`` -- aleatoric part (what each sampled model is unsure of);
* mutual information (BALD) ``H[E_t p_t] - E_t H[p_t]`` -- epistemic part (disagreement
  between the sampled models), always >= 0;
* variation ratio ``1 - (number of samples voting for the modal class) / T``;
* per-class variance of the probabilities over the T samples (population variance).

Regression (Kendall & Gal 2017, "What Uncertainties Do We Need in Bayesian Deep Learning?"),
with sample means ``[T, B, D]``: the predictive distribution is the equally weighted mixture of
the T Gaussians ``N(mu_t, sigma_t^2)``. Its mean is ``E_t mu_t`` and its variance is

    ``Var = aleatoric + epistemic = E_t sigma_t^2 + Var_t mu_t``

where ``sigma_t^2`` is the predicted variance (heteroscedastic models) or ``1 / tau`` for a
fixed noise precision ``tau``, and ``Var_t`` is the population variance over the T samples.
The epistemic term is never dropped: with a deterministic network it is the only term.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = [
    "ClassificationSummary",
    "RegressionSummary",
    "classification_summary",
    "regression_summary",
    "entropy",
    "predictive_entropy",
    "expected_entropy",
    "mutual_information",
    "variation_ratio",
    "class_variance",
    "mixture_nll_elements",
    "mixture_ll_elements",
    "accumulation_dtype",
    "dense_classification_summary",
    "classes_last",
    "per_input",
    "class_softmax",
    "SCORES",
]

#: The uncertainty scores a summary can produce (see :meth:`ClassificationSummary.score`).
SCORES: tuple[str, ...] = ("entropy", "mutual_information", "variation_ratio", "variance")

#: Smallest variance used inside a log or a division (regression), to keep NLL finite.
MIN_VARIANCE = 1e-12


#: Up to this many classes :func:`class_softmax` reduces over a leading class dimension.
_FEW_CLASSES = 32


def class_softmax(logits: Tensor) -> Tensor:
    """``torch.softmax(logits, dim=-1)`` (classes last), to float round-off, fast for few classes.

    torch's kernel walks the rows one at a time, which for a handful of classes costs far more
    than the arithmetic: measured on one CPU thread, ``[30, 218, 5]`` float32 logits (the demo's
    30 samples of a validation batch) took 0.68 ms with ``torch.softmax`` and 0.2 ms here. With up
    to 32 classes the maximum, the exponentials and their sum are taken with the classes as the
    leading dimension, vectorised over all rows; otherwise, and for tiny inputs, torch's kernel.
    """
    c = logits.shape[-1] if logits.dim() else 0
    if logits.dim() < 2 or c > _FEW_CLASSES or logits.numel() < 4096:
        return torch.softmax(logits, dim=-1)
    x = logits.movedim(-1, 0).contiguous()
    e = (x - x.amax(0)).exp_()
    e /= e.sum(0)
    return e.movedim(0, -1).contiguous()


def _check_probs(probs: Tensor) -> None:
    if probs.dim() < 3:
        raise ValueError(
            f"probs must have shape [T, B, C] (samples, batch, classes) or [T, B, ..., C] (dense outputs, "
            f"classes last), got shape {tuple(probs.shape)}"
        )


def entropy(p: Tensor, dim: int = -1) -> Tensor:
    """Shannon entropy ``-sum p log p`` along ``dim``, in nats; ``0 log 0`` is 0."""
    return -torch.special.xlogy(p, p).sum(dim)


def predictive_entropy(probs: Tensor) -> Tensor:
    """Entropy of the mean prediction ``H[E_t p_t]``, shape ``[B]``, in nats."""
    _check_probs(probs)
    return entropy(probs.mean(0))


def expected_entropy(probs: Tensor) -> Tensor:
    """Mean entropy of the individual samples ``E_t H[p_t]``, shape ``[B]``, in nats."""
    _check_probs(probs)
    return entropy(probs).mean(0)


def mutual_information(probs: Tensor) -> Tensor:
    """BALD: mutual information between the prediction and the weights, shape ``[B]``, nats.

    ``H[E_t p_t] - E_t H[p_t]``; exactly 0 when all samples agree. Mathematically >= 0 (Jensen),
    so the tiny negative values of floating-point cancellation are clamped to 0.
    """
    return (predictive_entropy(probs) - expected_entropy(probs)).clamp_min(0.0)


def variation_ratio(probs: Tensor) -> Tensor:
    """``1 - (votes for the modal class) / T``, shape ``[B]``, in ``[0, 1 - 1/C]``.

    Each sample votes for its argmax class; ties for the mode do not matter because only the
    modal vote count is used.
    """
    _check_probs(probs)
    t, c = probs.shape[0], probs.shape[-1]
    votes = torch.nn.functional.one_hot(probs.argmax(-1), c).sum(0)  # [B, ..., C]
    return 1.0 - votes.max(-1).values.to(probs.dtype) / t


def class_variance(probs: Tensor) -> Tensor:
    """Per-class population variance of the probabilities over the T samples, ``[B, C]``."""
    _check_probs(probs)
    return probs.var(0, unbiased=False)


@dataclass
class ClassificationSummary:
    """Per-input summaries of ``[T, B, C]`` sampled class probabilities (entropies in nats)."""

    mean_probs: Tensor  #: ``[B, C]`` mean of the T softmax outputs (the MC prediction)
    prediction: Tensor  #: ``[B]`` argmax of ``mean_probs``
    predictive_entropy: Tensor  #: ``[B]`` total uncertainty, nats
    expected_entropy: Tensor  #: ``[B]`` aleatoric part, nats
    mutual_information: Tensor  #: ``[B]`` epistemic part (BALD), nats
    variation_ratio: Tensor  #: ``[B]``
    class_variance: Tensor  #: ``[B, C]`` population variance over T
    deterministic_probs: Tensor | None = None  #: ``[B, C]`` eval-mode (weight-scaling) softmax

    @property
    def confidence(self) -> Tensor:
        """``[B]`` top-label confidence: the largest mean probability."""
        return self.mean_probs.max(-1).values

    @property
    def deterministic_prediction(self) -> Tensor | None:
        """``[B]`` argmax of the deterministic (eval-mode) prediction, if computed."""
        return None if self.deterministic_probs is None else self.deterministic_probs.argmax(-1)

    @property
    def variance(self) -> Tensor:
        """``[B]`` total variance: the sum of the per-class variances (trace of the covariance)."""
        return self.class_variance.sum(-1)

    def score(self, name: str) -> Tensor:
        """The uncertainty score ``name`` (one of :data:`SCORES`), shape ``[B]``; higher = less sure.

        ``entropy`` is the predictive entropy, ``variance`` the summed per-class variance.
        """
        if name == "entropy":
            return self.predictive_entropy
        if name in ("mutual_information", "bald"):
            return self.mutual_information
        if name == "variation_ratio":
            return self.variation_ratio
        if name == "variance":
            return self.variance
        raise ValueError(f"score must be one of {list(SCORES)}, got {name!r}")


def classification_summary(
    probs: Tensor, deterministic_probs: Tensor | None = None
) -> ClassificationSummary:
    """Summarise sampled class probabilities ``probs`` of shape ``[T, B, C]``.

    ``deterministic_probs`` (``[B, C]``), the eval-mode prediction, is carried along for
    comparison (weight scaling, Srivastava et al. 2014).
    """
    _check_probs(probs)
    mean = probs.mean(0)
    pe = entropy(mean)
    ee = entropy(probs).mean(0)
    deviation = probs - mean  # the population variance in two passes: torch.var(0) ran 10x slower here
    return ClassificationSummary(
        mean_probs=mean,
        prediction=mean.argmax(-1),
        predictive_entropy=pe,
        expected_entropy=ee,
        mutual_information=(pe - ee).clamp_min(0.0),
        variation_ratio=variation_ratio(probs),
        class_variance=(deviation * deviation).mean(0),
        deterministic_probs=deterministic_probs,
    )


@dataclass
class RegressionSummary:
    """The predictive mixture of ``[T, B, D]`` sampled means (and variances)."""

    mean: Tensor  #: ``[B, D]`` predictive mean ``E_t mu_t``
    variance: Tensor  #: ``[B, D]`` total predictive variance = aleatoric + epistemic
    aleatoric: Tensor  #: ``[B, D]`` ``E_t sigma_t^2`` or ``1 / tau`` (zeros if neither given)
    epistemic: Tensor  #: ``[B, D]`` population variance of the sample means over T
    deterministic_mean: Tensor | None = None  #: ``[B, D]`` eval-mode output
    sample_means: Tensor | None = None  #: ``[T, B, D]`` the sampled means (for the mixture likelihood)
    sample_variances: Tensor | None = None  #: ``[T, B, D]`` the predicted variances (heteroscedastic)
    tau: float | None = None  #: the fixed noise precision the summary was made with

    @property
    def has_mixture(self) -> bool:
        """Whether :meth:`ll_mixture` can be computed: the sampled means and either the predicted
        variances or a noise precision ``tau`` (a mixture of point masses has no density)."""
        return self.sample_means is not None and (self.sample_variances is not None or self.tau is not None)

    def ll_mixture(self, target: Tensor) -> Tensor:
        """``[B]`` test log-likelihood of ``target`` under the mixture of the T Gaussians, nats per
        output element (:func:`mixture_ll_elements`; higher is better).

        Raises:
            ValueError: the summary has no sampled means, or neither variances nor ``tau``.
        """
        if self.sample_means is None:
            raise ValueError("the mixture log-likelihood needs the sampled means; this summary was made without them")
        if self.sample_variances is None and self.tau is None:
            raise ValueError(
                "the mixture log-likelihood needs a noise precision: pass tau= (uncertainty.tau in a config) "
                "or predicted variances (model.loss: gaussian_nll)")
        return mixture_ll_elements(self.sample_means, target, self.sample_variances,
                                   None if self.sample_variances is not None else self.tau)

    @property
    def std(self) -> Tensor:
        """``[B, D]`` predictive standard deviation."""
        return self.variance.clamp_min(0.0).sqrt()

    def score(self, name: str = "variance") -> Tensor:
        """Per-input uncertainty ``[B]``: the total predictive variance summed over outputs.

        ``variance`` (the default) and ``entropy`` (the differential entropy of the
        moment-matched Gaussian, nats) are defined for regression.
        """
        var = self.variance.reshape(self.variance.shape[0], -1)
        if name == "variance":
            return var.sum(-1)
        if name == "entropy":
            v = var.clamp_min(MIN_VARIANCE)
            return (0.5 * torch.log(2 * math.pi * math.e * v)).sum(-1)
        raise ValueError(
            f"score for regression must be 'variance' or 'entropy', got {name!r}"
        )


def regression_summary(
    means: Tensor,
    variances: Tensor | None = None,
    tau: float | None = None,
    deterministic_mean: Tensor | None = None,
) -> RegressionSummary:
    """Summarise ``[T, B, ...]`` sampled means as the predictive Gaussian mixture.

    Give at most one of ``variances`` (predicted per sample, same shape as ``means``) or
    ``tau`` (fixed noise precision, aleatoric variance ``1 / tau``). With neither the aleatoric
    term is 0 and the predictive variance is purely epistemic.
    """
    if means.dim() < 2:
        raise ValueError(f"means must have shape [T, B, ...], got shape {tuple(means.shape)}")
    if variances is not None and tau is not None:
        raise ValueError("give either variances or tau (noise precision), not both")
    mean = means.mean(0)
    epistemic = means.var(0, unbiased=False)
    if variances is not None:
        if variances.shape != means.shape:
            raise ValueError(
                f"variances must have the shape of means {tuple(means.shape)}, got {tuple(variances.shape)}"
            )
        aleatoric = variances.mean(0)
    elif tau is not None:
        if not tau > 0:
            raise ValueError(f"tau (noise precision) must be > 0, got {tau!r}")
        aleatoric = torch.full_like(mean, 1.0 / float(tau))
    else:
        aleatoric = torch.zeros_like(mean)
    return RegressionSummary(
        mean=mean,
        variance=aleatoric + epistemic,
        aleatoric=aleatoric,
        epistemic=epistemic,
        deterministic_mean=deterministic_mean,
        sample_means=means,
        sample_variances=variances,
        tau=None if tau is None else float(tau),
    )


def accumulation_dtype(x: Tensor) -> Tensor:
    """``x`` in the floating dtype its summaries are computed in: float64 and float32 as they
    are (a float64 model keeps every digit of a target with a large offset), float16, bfloat16
    and integers in float32 (their own precision is too coarse for sums over T samples)."""
    return x if x.dtype in (torch.float32, torch.float64) else x.float()


def mixture_ll_elements(
    means: Tensor, target: Tensor, variances: Tensor | None = None, tau: float | None = None
) -> Tensor:
    """Test log-likelihood of ``target`` under the equal-weight mixture of the T Gaussians.

    Gal & Ghahramani 2016 (eq. 8, and their UCI tables) score MC dropout by the log of the
    mixture density, not of a moment-matched Gaussian; with a fixed precision ``tau``, per point::

        log p(y) = logsumexp_t(-tau/2 (y - mu_t)^2) - log T - log(2 pi)/2 + log(tau)/2

    and in general ``logsumexp_t log N(y; mu_t, sigma_t^2) - log T``. ``means`` is ``[T, B, ...]``;
    ``sigma_t^2`` is ``variances`` (same shape, predicted per sample by a heteroscedastic model)
    or ``1 / tau``. ``tau`` is a precision in the units of the model's output: with standardised
    targets pass ``tau * target_variance`` (or report in the original units through an
    ``output_transform``). The output elements of one input are independent given a sample, so
    their log-densities add inside the logsumexp; the result, ``[B]``, is divided by the number of
    elements per input to be *nats per output element* like ``mc/nll``. Computed in float64.
    Higher is better; :func:`mixture_nll_elements` is its negative.

    Raises:
        ValueError: neither or both of ``variances`` and ``tau`` (a mixture of point masses has
            no density).
    """
    if (variances is None) == (tau is None):
        raise ValueError("the mixture likelihood needs exactly one of variances (predicted) or tau (noise precision)")
    if means.dim() < 2:
        raise ValueError(f"means must have shape [T, B, ...], got shape {tuple(means.shape)}")
    mu = means.double()
    y = target.to(mu.device).double().reshape(mu.shape[1:]).unsqueeze(0)
    if variances is not None:
        v = variances.to(mu.device).double().clamp_min(MIN_VARIANCE)
    else:
        if not tau > 0:  # type: ignore[operator]
            raise ValueError(f"tau (noise precision) must be > 0, got {tau!r}")
        v = torch.full_like(mu, 1.0 / float(tau))  # type: ignore[arg-type]
    log_n = -0.5 * (torch.log(2 * math.pi * v) + (y - mu) ** 2 / v)  # [T, B, ...]
    per_sample = log_n.reshape(mu.shape[0], mu.shape[1], -1)
    d = per_sample.shape[-1]
    log_mix = torch.logsumexp(per_sample.sum(-1), dim=0) - math.log(mu.shape[0])  # [B]
    return log_mix / d


def mixture_nll_elements(
    means: Tensor, target: Tensor, variances: Tensor | None = None, tau: float | None = None
) -> Tensor:
    """The negative of :func:`mixture_ll_elements` (``[B]``, nats per output element; lower is
    better), kept for code written against the NLL."""
    return -mixture_ll_elements(means, target, variances, tau)


def classes_last(logits: Tensor) -> Tensor:
    """Stacked dense logits with the classes last: ``[T, B, L, V]`` (sequence models) as they
    are, ``[T, B, C, H, W, ...]`` (segmentation, torch's class-second convention) moved to
    ``[T, B, H, W, ..., C]``. ``[T, B, C]`` is returned unchanged."""
    return logits if logits.dim() <= 4 else logits.movedim(2, -1)


def dense_classification_summary(
    logits: Tensor, deterministic_logits: Tensor | None = None, budget_bytes: int | None = None
) -> ClassificationSummary:
    """The summary of dense logits ``[T, B, ..., C]`` (classes last), position by position.

    Every field keeps the positions: ``mean_probs`` is ``[B, ..., C]``, the scores ``[B, ...]``.
    The softmax and the per-sample entropies, which need ``T`` times the memory of the output,
    are computed over chunks of the batch that fit ``budget_bytes`` (about 6 float32 copies of
    a chunk's samples are alive at once), so a segmentation batch does not have to fit ``T``
    times over.
    """
    b = logits.shape[1]
    per_row = max(1, logits[:, :1].numel() * 4 * 6)
    rows = b if budget_bytes is None else max(1, min(b, int(budget_bytes) // per_row))
    parts = []
    for start in range(0, b, rows):
        chunk = class_softmax(logits[:, start:start + rows].float())
        det = None
        if deterministic_logits is not None:
            det = torch.softmax(deterministic_logits[start:start + rows].float(), dim=-1)
        parts.append(classification_summary(chunk, det))
    if len(parts) == 1:
        return parts[0]
    fields = {}
    for name in ("mean_probs", "prediction", "predictive_entropy", "expected_entropy", "mutual_information",
                 "variation_ratio", "class_variance"):
        fields[name] = torch.cat([getattr(p, name) for p in parts])
    dets = [p.deterministic_probs for p in parts if p.deterministic_probs is not None]
    det_all = torch.cat(dets) if len(dets) == len(parts) else None
    return ClassificationSummary(**fields, deterministic_probs=det_all)


def per_input(values: Tensor, valid: Tensor | None = None) -> Tensor:
    """Per-input means ``[B]`` of per-position values ``[B, ...]`` (an image's or a sequence's
    score for referral and acquisition), over the ``valid`` positions only when given (positions
    whose target is the ignore index do not count); an input with no valid position gets 0."""
    v = values.reshape(values.shape[0], -1).double()
    if valid is None:
        return v.mean(-1)
    m = valid.reshape(valid.shape[0], -1).double()
    return (v * m).sum(-1) / m.sum(-1).clamp_min(1.0)
