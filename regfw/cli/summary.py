"""The one summary ``regfw fit`` and ``regfw demo`` print at the end.

Every metric appears once, under the name it has in the run's ``metrics.csv`` (``val_acc``,
``mc/acc``, ``cal/temperature``, ``ood/auroc_msp``), which is also its key in
:attr:`regfw.run.job.FitResult.metrics`: the final evaluation first, then the Monte Carlo
dropout metrics with what each means, then temperature scaling and out-of-distribution
detection as small tables (their rows and columns spell out the names), then the files.
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

#: What each ``mc/`` metric means, printed beside its value.
MC_MEANINGS = {
    "acc": "accuracy of the MC-averaged prediction",
    "det_acc": "accuracy of the deterministic (weight-scaled) prediction",
    "nll": "negative log-likelihood (lower is better)",
    "brier": "Brier score (lower is better)",
    "ece": "expected calibration error, 15 bins",
    "auroc_error": "AUROC of the uncertainty score for spotting the model's own errors",
    "referred_fraction": "share referred to human review",
    "retained_acc": "accuracy on the samples not referred",
    "mean_mi": "mean mutual information (epistemic, nats)",
    "mean_entropy": "mean predictive entropy (nats)",
    "mean_expected_entropy": "mean expected entropy (aleatoric, nats)",
    "mean_variation_ratio": "mean variation ratio",
    "mean_score": "mean of the referral score",
    "rmse": "root mean squared error of the MC mean",
    "det_rmse": "root mean squared error of the deterministic prediction",
    "mean_variance": "mean predictive variance = aleatoric + epistemic",
    "mean_aleatoric": "mean aleatoric variance (uncertainty.tau or the predicted variance)",
    "mean_epistemic": "mean epistemic variance (spread of the sampled means)",
    "coverage_90": "share of targets inside the central 90% predictive interval",
    "interval_error": "mean |coverage - level| over the interval levels",
    "retained_rmse": "RMSE on the samples not referred",
    "ll_mixture": "test log-likelihood of the mixture of the T Gaussians (Gal & Ghahramani's figure, higher is "
                  "better)",
    "nll_mixture": "minus ll_mixture (lower is better)",
    "aurc": "area under the risk-coverage curve (selective prediction, lower is better)",
    "augrc": "area under the generalized risk-coverage curve (lower is better)",
    "risk_80": "error rate on the 80% most certain samples",
    "risk_95": "error rate on the 95% most certain samples",
}

#: The groups of :func:`format_metrics` that print as tables, by name prefix.
TABLES = ("cal/", "ood/")


def _lines(rows: Mapping[str, float], meanings: Mapping[str, str] | None = None, prefix: str = "") -> list[str]:
    width = max(len(name) for name in rows)
    return [f"  {name.ljust(width)}  {value:8.4f}  {(meanings or {}).get(name[len(prefix):], '')}".rstrip()
            for name, value in rows.items()]


def format_calibration(metrics: Mapping[str, float]) -> list[str]:
    """Temperature scaling before/after (``cal/...``), fitted on the held-out calibration split and
    scored on validation; empty when it did not run."""
    if "cal/temperature" not in metrics:
        return []
    lines = ["Temperature scaling (cal/; fitted on the calibration split, scored on validation):",
             f"  {'prediction':<14}{'temperature':>12}  {'nll_before':>10}  {'nll_after':>9}  {'ece_before':>10}  "
             f"{'ece_after':>9}"]
    for label, key in (("MC predictive", "cal/"), ("deterministic", "cal/det_")):
        if f"{key}temperature" not in metrics:
            continue
        m = {k: metrics[f"{key}{k}"] for k in ("temperature", "nll_before", "nll_after", "ece_before", "ece_after")}
        lines.append(f"  {label:<14}{m['temperature']:>12.4f}  {m['nll_before']:>10.4f}  {m['nll_after']:>9.4f}  "
                     f"{m['ece_before']:>10.4f}  {m['ece_after']:>9.4f}")
    return lines


def format_ood(metrics: Mapping[str, float]) -> list[str]:
    """Out-of-distribution detection per score (``ood/auroc_SCORE``, ``ood/aupr_SCORE``,
    ``ood/fpr95_SCORE``); empty when no OOD set was scored."""
    scores = [k[len("ood/auroc_"):] for k in metrics if k.startswith("ood/auroc_")]
    lines = ["Out-of-distribution detection (ood/; validation vs the OOD set; AUROC, AUPR, FPR at 95% TPR):"]
    for s in scores:
        auroc, aupr, fpr95 = (metrics.get(f"ood/{m}_{s}", float("nan")) for m in ("auroc", "aupr", "fpr95"))
        lines.append(f"  {s:<20} AUROC {auroc:.4f}  AUPR {aupr:.4f}  FPR95 {fpr95:.4f}")
    return lines if scores else []


def format_uncertainty(metrics: Mapping[str, float], samples: int | None) -> list[str]:
    """The ``mc/`` metrics with their meanings, then :func:`format_calibration` and :func:`format_ood`."""
    lines: list[str] = []
    mc = {k: v for k, v in metrics.items() if k.startswith("mc/")}
    if mc:
        lines.append(f"Monte Carlo dropout on the validation set (T = {samples}, the last MC evaluation):")
        lines += _lines(mc, MC_MEANINGS, "mc/")
    for block in (format_calibration(metrics), format_ood(metrics)):
        if block:
            lines += ["", *block] if lines else block
    return lines


def format_metrics(metrics: Mapping[str, float], samples: int | None = None) -> str:
    """Every metric of a fit once: the final evaluation (``train_*``, ``val_*`` and anything else),
    then :func:`format_uncertainty`."""
    plain = {k: v for k, v in metrics.items() if not k.startswith(("mc/", *TABLES))}
    lines = ["Final evaluation (names as in metrics.csv):", *_lines(plain)] if plain else []
    rest = format_uncertainty(metrics, samples)
    if rest:
        lines += ["", *rest] if lines else rest
    return "\n".join(lines)


def format_files(result: Any, extra: Mapping[str, Any] | None = None) -> str:
    """Where a fit wrote: its plots, run directory, config and checkpoint (and ``extra`` lines)."""
    lines = [f"plot {name}: {plot}" for name, plot in result.plots.items()]
    if lines:
        lines.append("")
    if result.resumed_from is not None:
        lines.append(f"resumed from:  {result.resumed_from}")
    lines += [f"run directory: {result.run_dir}", f"config:        {result.config_path}",
              f"checkpoint:    {result.checkpoint}"]
    lines += [f"{label + ':':<14} {value}" for label, value in (extra or {}).items()]
    return "\n".join(lines)
