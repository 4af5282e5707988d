"""``regfw demo``: the same config trained with and without its regularizers, side by side."""
from __future__ import annotations

from collections.abc import Sequence
from importlib import resources
from pathlib import Path

from regfw.config.schema import load_raw, validate

DEFAULT_CONFIG = "templates/demo.yaml"

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


def format_calibration(metrics: dict[str, float]) -> str:
    """Before/after temperature scaling (fitted on the held-out calibration split, scored on
    validation), and the OOD detection AUROC per score; empty when neither ran."""
    lines = []
    if "cal_temperature" in metrics:
        lines.append("Temperature scaling (fitted on the calibration split, scored on validation):")
        lines.append(f"  {'prediction':<14}{'T':>7}  {'NLL before':>10}  {'NLL after':>9}  {'ECE before':>10}  "
                     f"{'ECE after':>9}")
        for label, key in (("MC predictive", "cal_"), ("deterministic", "cal_det_")):
            if f"{key}temperature" not in metrics:
                continue
            m = {k: metrics[f"{key}{k}"] for k in ("temperature", "nll_before", "nll_after", "ece_before", "ece_after")}
            lines.append(f"  {label:<14}{m['temperature']:>7.3f}  {m['nll_before']:>10.4f}  {m['nll_after']:>9.4f}  "
                         f"{m['ece_before']:>10.4f}  {m['ece_after']:>9.4f}")
    ood = {k[len("ood_auroc_"):]: v for k, v in metrics.items() if k.startswith("ood_auroc_")}
    if ood:
        lines.append("Out-of-distribution detection (validation vs the OOD set; AUROC, AUPR, FPR at 95% TPR):")
        for name, value in ood.items():
            lines.append(f"  {name:<20} AUROC {value:.4f}  AUPR {metrics.get('ood_aupr_' + name, float('nan')):.4f}  "
                         f"FPR95 {metrics.get('ood_fpr95_' + name, float('nan')):.4f}")
    return "\n".join(lines)


def _load_demo_raw(path: str | None, overrides: Sequence[str]) -> tuple[dict, str]:
    """The demo config (the packaged one when ``path`` is the default and not on disk), unvalidated."""
    if path and Path(path).exists():
        return load_raw(path, overrides), path
    if path in (None, DEFAULT_CONFIG):
        with resources.as_file(resources.files("regfw_templates").joinpath("demo.yaml")) as packaged:
            return load_raw(packaged, overrides), DEFAULT_CONFIG  # read while the file surely exists
    return load_raw(path, overrides), str(path)  # load_raw reports the missing file


def format_table(rows: dict[str, dict[str, float]]) -> str:
    """Rows of final metrics as an aligned text table with the train-validation gap."""
    cols = [("train_loss", "train loss"), ("val_loss", "val loss"), ("train_acc", "train acc"),
            ("val_acc", "val acc")]
    cols = [(key, title) for key, title in cols if any(key in r for r in rows.values())]
    header = ["run"] + [title for _, title in cols] + ["gap (val-train loss)"]
    if any("train_acc" in r for r in rows.values()):
        header.append("gap (train-val acc)")
    lines = []
    table = [header]
    for name, r in rows.items():
        cells = [name] + [f"{r[key]:.4f}" if key in r else "-" for key, _ in cols]
        cells.append(f"{r['val_loss'] - r['train_loss']:+.4f}")
        if "train_acc" in r:
            cells.append(f"{r['train_acc'] - r['val_acc']:+.4f}")
        table.append(cells)
    widths = [max(len(row[i]) for row in table) for i in range(len(header))]
    for row in table:
        lines.append("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())
    return "\n".join(lines)


def run_demo(config: str | None, overrides: Sequence[str] = ()) -> int:
    from regfw.run.job import fit

    raw, path = _load_demo_raw(config, overrides)
    cfg = validate(raw, source=path)
    results = {}
    regs = ", ".join(cfg.regularizers) or "none"
    print(f"== 1/2: {cfg.model.name or cfg.model.class_path} on {cfg.data.name or cfg.data.class_path} "
          f"with regularizers: {regs}")
    results[f"with ({regs})"] = fit(cfg)
    off = {**(raw.get("uncertainty") or {}), "enabled": False}
    baseline = validate({**raw, "regularizers": {}, "uncertainty": off}, source=path)
    print("== 2/2: the same without regularizers")
    results["without"] = fit(baseline)
    print()
    print(format_table({name: r.metrics for name, r in results.items()}))
    main = next(iter(results.values()))
    mc = {name[3:]: value for name, value in main.metrics.items() if name.startswith("mc_")}
    if mc:
        print(f"\nMonte Carlo dropout on the validation set (T = {cfg.uncertainty.samples}, last run):")
        width = max(len(name) for name in mc)
        for name, value in mc.items():
            meaning = MC_MEANINGS.get(name, "")
            print(f"  mc/{name.ljust(width)}  {value:8.4f}  {meaning}".rstrip())
    extra = format_calibration(main.metrics)
    if extra:
        print("\n" + extra)
    for name, plot in main.plots.items():
        print(f"plot {name}: {plot}")
    print(f"\nrun directory: {main.run_dir}\nconfig:        {main.config_path}\ncheckpoint:    {main.checkpoint}")
    print(f"baseline run:  {results['without'].run_dir}")
    return 0
