"""The ``coadaptation`` monitor: logs how correlated the hidden units are at each validation.

Dropout was introduced to stop units from co-adapting (Hinton et al. 2012); the measure logged
here is the mean absolute correlation between the hidden units of chosen layers on the
validation data (:mod:`regfw_plugins.coadaptation.monitor`), ``coadaptation/<layer>`` and
``coadaptation/mean``.
It changes nothing in the model and adds no loss: it is a regularizer entry only so that it is
selected by name like everything else::

    regularizers:
      dropout: {}
      coadaptation: {}            # or {layers: [body.1], every_n_epochs: 5}

One feature, one plugin package: the settings (validated once, here) and the regularizer in this
module, the layers it measures in :mod:`regfw_plugins.coadaptation.layers` (what a plan prints),
the measure and its Lightning callback in :mod:`regfw_plugins.coadaptation.monitor` (imported when
a fit asks for the callback, never at plugin discovery or for a plan).
"""
from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from regfw.extend import Regularizer, hookimpl, positive

from .layers import unit_layers


@dataclass
class CoadaptationConfig:
    """Which layers to measure, and how often (also the settings of
    :class:`~regfw_plugins.coadaptation.monitor.CoadaptationMonitor`)."""

    #: Module paths whose outputs are the units (null: every hidden and conv layer but the output one).
    layers: list[str] | None = None
    every_n_epochs: int = positive(1, doc="measure after every N-th epoch")
    #: Measure at most this many validation batches (null: all).
    max_batches: int | None = positive(None, doc="validation batches measured")
    #: Units per layer measured at most (evenly spaced), to bound the units x units statistics.
    max_units: int | None = positive(512, doc="units per layer measured at most (null: all)")


class Coadaptation(Regularizer):
    """Log the mean absolute correlation between hidden units at each validation."""

    name = "coadaptation"
    description = "logs the mean absolute correlation between hidden units (co-adaptation) at validation"
    Config = CoadaptationConfig

    def callbacks(self) -> list:
        from .monitor import CoadaptationMonitor

        return [CoadaptationMonitor(self.config)]

    def describe(self, model: nn.Module) -> list[str]:
        try:
            layers = unit_layers(model, None, self.config.layers)
        except ValueError as exc:
            return [f"cannot measure: {exc}"]
        return [f"logs coadaptation/<layer> for {', '.join(layers) or '(no layer)'}"]


@hookimpl
def regfw_register_regularizers(register):
    register(Coadaptation)
