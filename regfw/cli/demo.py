"""``regfw demo``: the same config trained with and without its regularizers, side by side."""
from __future__ import annotations

from collections.abc import Sequence
from importlib import resources
from pathlib import Path

from regfw.cli.summary import format_files, format_uncertainty
from regfw.config.schema import load_raw, validate

DEFAULT_CONFIG = "templates/demo.yaml"


def _load_demo_raw(path: str | None, overrides: Sequence[str]) -> tuple[dict, str]:
    """The demo config (the packaged one when ``path`` is the default and not on disk), unvalidated."""
    if path and Path(path).exists():
        return load_raw(path, overrides), path
    if path in (None, DEFAULT_CONFIG):
        with resources.as_file(resources.files("regfw_templates").joinpath("demo.yaml")) as packaged:
            return load_raw(packaged, overrides), DEFAULT_CONFIG  # read while the file surely exists
    return load_raw(path, overrides), str(path)  # load_raw reports the missing file


def format_table(rows: dict[str, dict[str, float]]) -> str:
    """Rows of final metrics as an aligned text table (columns named as in metrics.csv) with the
    train-validation gap."""
    cols = [key for key in ("train_loss", "val_loss", "train_acc", "val_acc") if any(key in r for r in rows.values())]
    header = ["run", *cols, "gap (val-train loss)"]
    if any("train_acc" in r for r in rows.values()):
        header.append("gap (train-val acc)")
    lines = []
    table = [header]
    for name, r in rows.items():
        cells = [name] + [f"{r[key]:.4f}" if key in r else "-" for key in cols]
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
    uncertainty = format_uncertainty(main.metrics, cfg.uncertainty.samples)
    if uncertainty:
        print(f"\nWith ({regs}):")
        print("\n".join(uncertainty))
    print()
    print(format_files(main, {"baseline run": results["without"].run_dir}))
    return 0
