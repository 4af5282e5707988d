"""The `regfw test` command: the test split through a checkpoint, with the MC dropout metrics.

Command glue only (load the config, its data and the checkpoint, run ``Trainer.test`` with
:class:`~regfw.uncertainty.MCDropoutUncertainty`, write the metrics; `regfw.cli.main` prints). The
metrics are those the callback logs at validation, under ``test/`` (``test/mc/rmse``,
``test/mc/nll_mixture``, ``test/mc/acc`` ...), in the data's original units for regression with a
declared target scaling (``uncertainty.units``), plus the module's own test metrics.
"""
from __future__ import annotations

import json
import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from regfw.errors import ConfigError, RegfwError, RunError

__all__ = ["TestResult", "metrics_path", "test_checkpoint"]

#: The file ``regfw test`` writes in the checkpoint's run directory.
METRICS_FILE = "test_metrics.json"


@dataclass
class TestResult:
    """What ``regfw test`` reports: the metrics by name and the file they were written to."""

    __test__ = False  # not a pytest test class

    metrics: dict[str, float]
    path: Path


def metrics_path(checkpoint: str | Path, out: str | Path | None = None) -> Path:
    """Where the metrics go: ``out``, else ``test_metrics.json`` in the checkpoint's run directory
    (the parent of ``checkpoints/``, or the checkpoint's own directory)."""
    if out is not None:
        if not str(out).strip():
            raise ConfigError("--out: got an empty path; give the file to write, e.g. --out test_metrics.json.")
        return Path(out)
    ckpt = Path(checkpoint)
    run_dir = ckpt.parent.parent if ckpt.parent.name == "checkpoints" else ckpt.parent
    return run_dir / METRICS_FILE


def _test_loader(datamodule: Any, data_name: str) -> None:
    """Refuse data without a test split before the checkpoint is loaded: a built-in's own
    message, or one for a data module without ``test_dataloader``."""
    import pytorch_lightning as pl

    inner = getattr(datamodule, "inner", datamodule)
    method = getattr(type(inner), "test_dataloader", None)
    if method is None or method is getattr(pl.LightningDataModule, "test_dataloader", None):
        raise ConfigError(f"data {data_name!r} has no test split (no test_dataloader()); give the data module a "
                          f"test_dataloader() method (built-in data: set data.init_args.test_fraction, e.g. 0.2, "
                          f"when training).", key="data")
    datamodule.setup("test")
    try:
        datamodule.test_dataloader()  # a built-in without a test split says so here
    except RegfwError:
        raise
    except Exception as exc:  # noqa: BLE001 - e.g. the base class's "not implemented" of another package
        raise ConfigError(f"data {data_name!r}: test_dataloader() failed: {type(exc).__name__}: "
                          f"{' '.join(str(exc).split())[:200]}; give the data module a working test_dataloader() "
                          f"to test on.", key="data") from None


def test_checkpoint(config: str, checkpoint: str, overrides: Sequence[str] = (), *, out: str | None = None,
                    samples: int | None = None, force: bool = False) -> TestResult:
    """``regfw test``: run the config's test split through ``checkpoint`` with MC dropout and write
    the metrics as JSON to :func:`metrics_path` (an existing file only with ``force``)."""
    import pytorch_lightning as pl

    from regfw.build.factory import build_datamodule
    from regfw.cli.predict import _lightning_quiet, check_out
    from regfw.cli.rank import check_samples, load_module
    from regfw.config.schema import load_config
    from regfw.run import stopping
    from regfw.run.atomic import write_output
    from regfw.uncertainty.heldout import prepare_heldout

    check_samples(samples)
    path = metrics_path(checkpoint, out)
    check_out(path, force=force, inputs=(config, checkpoint))  # before any work
    cfg = load_config(config, overrides)
    if samples is not None:
        cfg.uncertainty.samples = samples
    data_name = str(cfg.data.name or cfg.data.class_path)
    datamodule = build_datamodule(cfg.data, seed=cfg.seed)
    heldout = prepare_heldout(datamodule, cfg.uncertainty, cfg.seed)  # the same splits as the fit
    _test_loader(datamodule, data_name)
    module = load_module(checkpoint)
    callbacks = [] if not cfg.uncertainty.enabled else _mc_callback(cfg, module, datamodule, heldout, checkpoint)
    try:
        with _lightning_quiet():
            trainer = pl.Trainer(accelerator=cfg.trainer.get("accelerator", "cpu"), devices=1, logger=False,
                                 enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
                                 callbacks=callbacks)
            with stopping.lightning_interrupts(trainer):
                results = trainer.test(module, datamodule=datamodule, verbose=False)
    except RegfwError:
        raise
    except (RuntimeError, ValueError, TypeError, IndexError) as exc:
        text = " ".join(str(exc).split())[:200]
        raise RunError(f"the model of checkpoint {checkpoint!r} could not be tested on the test split of data "
                       f"{data_name!r}: {type(exc).__name__}: {text}. Test with the config the checkpoint was "
                       f"trained with (its run's config.yaml).") from None
    metrics = {k: float(v) for k, v in sorted((results[0] if results else {}).items())}
    document = {"checkpoint": str(checkpoint), "config": str(config), "units": cfg.uncertainty.units,
                "metrics": {k: v if math.isfinite(v) else None for k, v in metrics.items()}}  # NaN: null
    write_output(path, json.dumps(document, indent=2) + "\n", force=force)
    return TestResult(metrics, path)


def _mc_callback(cfg: Any, module: Any, datamodule: Any, heldout: Any, checkpoint: str) -> list[Any]:
    """The MC dropout callback for the test (in a list; empty, with a warning, when the model has
    no active dropout), with the temperatures the fit kept in the checkpoint."""
    from regfw.train.losses import mc_output_transform
    from regfw.uncertainty import MCDropoutUncertainty, stochastic_modules

    if not stochastic_modules(module):
        warnings.warn(f"regfw test: the model of checkpoint {checkpoint!r} has no active dropout: only its own test "
                      f"metrics are reported, without MC dropout", stacklevel=2)
        return []
    task = getattr(module, "task", None) or ("regression" if getattr(datamodule, "task", "") == "regression"
                                             else "classification")
    hparams = getattr(module, "hparams", {})
    callback = MCDropoutUncertainty.from_config(
        cfg.uncertainty, task=task, output_transform=mc_output_transform(hparams.get("loss") if hasattr(hparams, "get")
                                                                         else None),
        calibrate=heldout.calibration is not None, calibration_loader=heldout.calibration, ood_loader=heldout.ood)
    callback.plots = False  # the test phase draws none
    temperatures = _temperatures(checkpoint)
    callback.temperature = temperatures.get("temperature")
    callback.det_temperature = temperatures.get("det_temperature")
    return [callback]


def _temperatures(checkpoint: str) -> dict[str, Any]:
    """The temperatures ``regfw fit`` kept in the checkpoint (``regfw_calibration``), if any."""
    from regfw.run.checkpoints import read_checkpoint

    return dict(read_checkpoint(Path(checkpoint)).get("regfw_calibration") or {})
