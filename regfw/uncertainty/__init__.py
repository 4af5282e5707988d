"""Monte Carlo dropout uncertainty: sampling, summaries, metrics, plots, a callback, active learning.

Quick use::

    from regfw.uncertainty import mc_predict
    result = mc_predict(model, x, samples=30, seed=0)
    result.mean_probs, result.mutual_information, result.variation_ratio

Sampling and summaries need only torch and are imported eagerly; the metrics (torchmetrics),
the callback (Lightning), plots (matplotlib) and active learning load on first use.
"""
from __future__ import annotations

from importlib import import_module
from typing import Any

from regfw.uncertainty import fast as fast  # registers the "auto" strategy
from regfw.uncertainty.sampling import (
    DEFAULT_BUDGET_BYTES,
    DEFAULT_SAMPLES,
    STRATEGIES,
    TORCH_STOCHASTIC_TYPES,
    MCResult,
    batched_strategy,
    derive_seed,
    estimate_row_bytes,
    eval_mode,
    is_stochastic,
    isolated_rng,
    loop_strategy,
    mc_mode,
    mc_predict,
    register_strategy,
    resolve_strategy,
    split_mean_logvar,
    stochastic_modules,
    stochastic_types,
)
from regfw.uncertainty.summaries import (
    SCORES,
    ClassificationSummary,
    RegressionSummary,
    class_variance,
    classification_summary,
    entropy,
    expected_entropy,
    mixture_ll_elements,
    mixture_nll_elements,
    mutual_information,
    predictive_entropy,
    regression_summary,
    variation_ratio,
)

_LAZY = {
    # metrics
    "accuracy": "regfw.uncertainty.metrics",
    "nll": "regfw.uncertainty.metrics",
    "brier_score": "regfw.uncertainty.metrics",
    "ece": "regfw.uncertainty.metrics",
    "reliability_diagram": "regfw.uncertainty.metrics",
    "ReliabilityData": "regfw.uncertainty.metrics",
    "auroc": "regfw.uncertainty.metrics",
    "error_auroc": "regfw.uncertainty.metrics",
    "Referral": "regfw.uncertainty.metrics",
    "referral": "regfw.uncertainty.metrics",
    "referral_curve": "regfw.uncertainty.metrics",
    "retained_curve": "regfw.uncertainty.metrics",
    "rmse": "regfw.uncertainty.metrics",
    "gaussian_nll": "regfw.uncertainty.metrics",
    "interval_coverage": "regfw.uncertainty.metrics",
    "interval_calibration_error": "regfw.uncertainty.metrics",
    "MCClassificationMetrics": "regfw.uncertainty.accumulators",
    "MCRegressionMetrics": "regfw.uncertainty.accumulators",
    "ProbabilityCalibration": "regfw.uncertainty.accumulators",
    # post-hoc calibration, OOD detection, selective prediction
    "fit_temperature": "regfw.uncertainty.calibration",
    "Temperature": "regfw.uncertainty.calibration",
    "tempered_probs": "regfw.uncertainty.calibration",
    "OOD_SCORES": "regfw.uncertainty.ood",
    "ood_scores": "regfw.uncertainty.ood",
    "ood_metrics": "regfw.uncertainty.ood",
    "risk_coverage": "regfw.uncertainty.selective",
    "selective_metrics": "regfw.uncertainty.selective",
    # callback
    "MCDropoutUncertainty": "regfw.uncertainty.callback",
    # active learning
    "rank": "regfw.uncertainty.acquisition",
    "acquisition_scores": "regfw.uncertainty.acquisition",
    "Ranked": "regfw.uncertainty.acquisition",
    "ACQUISITIONS": "regfw.uncertainty.acquisition",
}

__all__ = [
    "DEFAULT_BUDGET_BYTES",
    "DEFAULT_SAMPLES",
    "STRATEGIES",
    "TORCH_STOCHASTIC_TYPES",
    "MCResult",
    "batched_strategy",
    "derive_seed",
    "estimate_row_bytes",
    "eval_mode",
    "is_stochastic",
    "isolated_rng",
    "loop_strategy",
    "mc_mode",
    "mc_predict",
    "register_strategy",
    "resolve_strategy",
    "split_mean_logvar",
    "stochastic_modules",
    "stochastic_types",
    "SCORES",
    "ClassificationSummary",
    "RegressionSummary",
    "class_variance",
    "classification_summary",
    "entropy",
    "expected_entropy",
    "mutual_information",
    "predictive_entropy",
    "regression_summary",
    "variation_ratio",
    "mixture_ll_elements",
    "mixture_nll_elements",
    *_LAZY,
]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'regfw.uncertainty' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
