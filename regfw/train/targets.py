"""Target scaling: the one place where regression outputs and targets return to original units.

A regression model trained on standardised targets, ``z = (y - mean) / std``, predicts in units of
``std``. Papers report RMSE and log-likelihood in the original units of ``y`` (Gal & Ghahramani
2016, the UCI tables), so a data module declares how it scaled its targets, and the MC dropout
metrics map predictions and targets back before computing anything:

- means and targets: ``y = z * std + mean``;
- variances (predicted, epistemic): ``v_y = v_z * std^2``. A fixed noise precision ``tau``
  (``uncertainty.tau``) is stated in the units the metrics are reported in: in original units it is
  the paper's tau as published; the same noise in the model's units is ``tau * std^2``.

Every metric is then computed directly in original units, so no metric needs its own rule. The
consequence for the log-likelihood (derived here once, and checked by
``tests/uncertainty/test_unc_units.py``): a Gaussian density in ``y`` is the density in ``z``
divided by the Jacobian ``std``, so for each output element

    log p(y) = log p(z) - log std,  i.e.  NLL_original = NLL_standardised + log std,

for the moment-matched NLL and the mixture NLL alike (the mixture's components all share the
Jacobian); RMSE scales by ``std``, variances by ``std^2``, interval coverage is unchanged.

A data module declares its scaling with the attribute ``target_scaling``: a
:class:`TargetScaling`, a ``(mean, std)`` pair or a mapping ``{"mean": ..., "std": ...}`` (scalars,
or one value per output), or None when its targets are in original units.
"""
from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from regfw.errors import ConfigError

__all__ = ["TargetScaling", "UNITS", "declared_scaling", "original_units_transform"]

#: The values of ``uncertainty.units``: report the MC metrics in the data's original units (the
#: default; the same as ``standardized`` when the data declares no scaling) or in the units the
#: model predicts.
UNITS: tuple[str, ...] = ("original", "standardized")


def _values(value: Any, name: str, where: str) -> tuple[float, ...]:
    if isinstance(value, Tensor):
        value = value.detach().cpu().double().flatten().tolist()
    elif hasattr(value, "tolist") and not isinstance(value, (str, bytes)):  # numpy arrays and scalars
        value = value.tolist()
    items = list(value) if isinstance(value, Sequence) and not isinstance(value, (str, bytes)) else [value]
    try:
        out = tuple(float(v) for v in items)
    except (TypeError, ValueError):
        raise ConfigError(f"{where}: {name} must be a number or one number per output, got {value!r}") from None
    if not out:
        raise ConfigError(f"{where}: {name} is empty; give a number or one number per output")
    return out


@dataclass(frozen=True)
class TargetScaling:
    """How a data module standardised its regression targets: ``z = (y - mean) / std``.

    ``mean`` and ``std`` are floats, or tuples with one value per output (broadcast over the last
    dimension of the outputs). ``std`` must be finite and positive.
    """

    mean: float | tuple[float, ...]
    std: float | tuple[float, ...]

    def __post_init__(self) -> None:
        mean = _values(self.mean, "mean", "target_scaling")
        std = _values(self.std, "std", "target_scaling")
        if not all(math.isfinite(m) for m in mean):
            raise ConfigError(f"target_scaling: mean must be finite, got {self.mean!r}")
        if not all(math.isfinite(s) and s > 0 for s in std):
            raise ConfigError(f"target_scaling: std must be finite and > 0 (targets are divided by it), got "
                              f"{self.std!r}")
        object.__setattr__(self, "mean", mean[0] if len(mean) == 1 else mean)
        object.__setattr__(self, "std", std[0] if len(std) == 1 else std)

    def _tensor(self, value: float | tuple[float, ...], like: Tensor) -> Tensor:
        return torch.as_tensor(value, dtype=torch.float64, device=like.device)

    def to_original(self, z: Tensor) -> Tensor:
        """Means or targets in original units (float64): ``z * std + mean``."""
        z = z.double()
        return z * self._tensor(self.std, z) + self._tensor(self.mean, z)

    def variance_to_original(self, v: Tensor) -> Tensor:
        """Variances in original units (float64): ``v * std^2``."""
        v = v.double()
        return v * self._tensor(self.std, v) ** 2

    @classmethod
    def of(cls, value: Any, where: str = "target_scaling") -> TargetScaling | None:
        """``value`` (a :class:`TargetScaling`, a ``(mean, std)`` pair, a ``{"mean", "std"}``
        mapping or None) as a :class:`TargetScaling`; a :class:`~regfw.errors.ConfigError` naming
        ``where`` for anything else."""
        if value is None or isinstance(value, TargetScaling):
            return value
        if isinstance(value, Mapping):
            if set(value) != {"mean", "std"}:
                raise ConfigError(f"{where}: expected a mapping with the keys mean and std, got keys {sorted(value)}")
            return cls(value["mean"], value["std"])
        if isinstance(value, Sequence) and not isinstance(value, (str, bytes)) and len(value) == 2:
            return cls(value[0], value[1])
        raise ConfigError(f"{where}: expected a TargetScaling, a (mean, std) pair or {{'mean': ..., 'std': ...}}, "
                          f"got {type(value).__name__} {value!r}; it says how the targets were standardised, "
                          f"z = (y - mean) / std")


def declared_scaling(datamodule: Any) -> TargetScaling | None:
    """The target scaling a data module declares in its ``target_scaling`` attribute (None when it
    has none); a :class:`~regfw.errors.ConfigError` naming the class for a malformed one."""
    if datamodule is None:
        return None
    value = getattr(datamodule, "target_scaling", None)
    inner = getattr(datamodule, "inner", datamodule)  # a wrapped lightning.pytorch data module
    return TargetScaling.of(value, f"{type(inner).__name__}.target_scaling")


def original_units_transform(scaling: TargetScaling, inner: Any = None) -> Any:
    """An ``output_transform`` for :func:`regfw.uncertainty.mc_predict` that returns the model's
    regression outputs in original units: means ``[T, B, ...]`` (after ``inner``, which may split
    ``(means, variances)``) mapped by :meth:`TargetScaling.to_original`, variances by
    :meth:`TargetScaling.variance_to_original`. A fixed precision given to ``mc_predict`` with
    this transform is then a precision of the original targets."""

    def transform(raw: Tensor) -> Any:
        out = raw if inner is None else inner(raw)
        means, variances = (out[0], out[1]) if isinstance(out, (tuple, list)) else (out, None)
        mean = scaling.to_original(means)
        return mean if variances is None else (mean, scaling.variance_to_original(variances))

    return transform
