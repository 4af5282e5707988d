"""The extra data of the uncertainty reports: the calibration split and the OOD set of a run.

:func:`prepare_heldout` is called once per run, on the data module, before the model is built:
it applies the OOD protocol (which may drop classes and renumber the labels), then carves the
calibration split out of what is left of the training data. The baseline of ``regfw demo`` goes
through the same steps, so both runs train on the same inputs.
"""
from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from regfw.config.imports import import_class
from regfw.errors import ConfigError
from regfw.uncertainty.calibration import carve_calibration_split
from regfw.uncertainty.ood import heldout_classes

__all__ = ["Heldout", "prepare_heldout"]


@dataclass
class Heldout:
    """The loaders :func:`prepare_heldout` made (None where the config asks for none)."""

    calibration: Iterable[Any] | None = None
    ood: Iterable[Any] | None = None


def _ood_from_class_path(ood: Any, seed: int) -> Iterable[Any]:
    cls = import_class(ood.class_path, "uncertainty.ood.class_path")
    try:
        dm = cls(**dict(ood.init_args))
    except TypeError as exc:
        raise ConfigError(f"uncertainty.ood.init_args: {ood.class_path} could not be built with "
                          f"{dict(ood.init_args)}: {exc}") from None
    for hook in ("prepare_data", "setup"):
        fn = getattr(dm, hook, None)
        if callable(fn):
            fn(*(("validate",) if hook == "setup" else ()))
    loader = getattr(dm, "val_dataloader", None)
    if not callable(loader):
        raise ConfigError(f"uncertainty.ood.class_path: {ood.class_path} has no val_dataloader(); the OOD set is "
                          "read from it")
    result: Iterable[Any] = loader()
    return result


def prepare_heldout(datamodule: Any, unc: Any, seed: int) -> Heldout:
    """Apply ``unc.ood`` and ``unc.calibration`` (an :class:`~regfw.config.schema.UncertaintyConfig`) to
    ``datamodule``; errors are :class:`~regfw.errors.ConfigError` naming the key."""
    out = Heldout()
    ood = getattr(unc, "ood", None)
    if ood is not None and ood.enabled:
        if ood.protocol == "heldout_classes":
            try:
                out.ood = heldout_classes(datamodule, ood.in_classes)  # type: ignore[assignment]
            except ValueError as exc:
                raise ConfigError(str(exc)) from None
        else:
            out.ood = _ood_from_class_path(ood, seed)
    cal = getattr(unc, "calibration", None)
    if cal is not None and cal.enabled:
        if getattr(datamodule, "task", "classification") != "classification":
            raise ConfigError("uncertainty.calibration.enabled: temperature scaling calibrates classifiers; "
                              "this data is for regression. Set uncertainty.calibration.enabled=false.")
        try:
            out.calibration = carve_calibration_split(datamodule, cal.fraction, seed)
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
    return out
