"""Dropout for recurrent layers: ``locked_dropout`` and ``dropconnect``.

Per-element dropout on a recurrent layer's output draws a new mask at every time step, which
injects noise the network cannot average out over the sequence. These variants respect time:

* ``locked_dropout``: one mask per sequence, shared by all time steps, on the output of each
  recurrent layer (Gal and Ghahramani, "A Theoretically Grounded Application of Dropout in
  Recurrent Neural Networks", NeurIPS 2016; AWD-LSTM's ``LockedDropout``). ``batch_first`` is
  read from each layer. Family ``dropout``, kind ``recurrent`` (table: 0.2-0.3).
* ``dropconnect``: DropConnect on the hidden-to-hidden weight matrices ``weight_hh_l*`` (Wan et
  al., ICML 2013; AWD-LSTM's weight drop, Merity et al., ICLR 2018), through
  :func:`regfw.layers.apply_weight_drop`, which keeps the parameter names, the parameter count
  and ``.to()`` working. It acts on the weights, not on activations, so it combines with
  ``locked_dropout`` (as in AWD-LSTM) and forms a family of its own. Rates: 0.2-0.5.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import cast

from torch import nn

from regfw.extend import (
    RECURRENT,
    InjectingRegularizer,
    InjectionConfig,
    PlanContext,
    PlanItem,
    RateRange,
    hookimpl,
    model_map,
    rate,
)
from regfw.layers import LockedDropout, WeightDrop, apply_weight_drop


@dataclass
class LockedDropoutConfig(InjectionConfig):
    """The recurrent rate; null takes the rate policy (or the table default), 0 switches it off."""

    recurrent: float | None = rate(doc="on recurrent layer outputs, one mask per sequence (table: 0.2-0.3)")


class LockedDropoutRegularizer(InjectingRegularizer):
    """Locked (variational) dropout on the output of every recurrent layer."""

    name = "locked_dropout"
    family = "dropout"
    description = "locked (variational) dropout on recurrent outputs: one mask shared over time"
    Config = LockedDropoutConfig
    kinds = (RECURRENT,)

    def supports(self, kind: str, module: nn.Module, out_dim: int | None) -> str | None:
        if not isinstance(module, nn.RNNBase):
            return f"{type(module).__name__} is not an nn.RNN/LSTM/GRU, so its time axis is unknown"
        return None

    def make_module(self, kind: str, rate: float, item: PlanItem) -> nn.Module:
        return LockedDropout(rate, batch_first=item.options.get("batch_first", True))


@dataclass
class DropConnectConfig(InjectionConfig):
    """The weight-drop rate; null takes the rate policy over the range 0.2-0.5, 0 switches it off."""

    recurrent: float | None = rate(doc="share of hidden-to-hidden weights dropped (range 0.2-0.5)")


class DropConnectRegularizer(InjectingRegularizer):
    """Weight drop on the hidden-to-hidden matrices of every RNN, LSTM and GRU."""

    name = "dropconnect"
    family = "dropconnect"
    description = "DropConnect (weight drop) on recurrent hidden-to-hidden weights, as in AWD-LSTM"
    Config = DropConnectConfig
    kinds = (RECURRENT,)
    # Merity et al., "Regularizing and Optimizing LSTM Language Models", ICLR 2018: weight drop
    # 0.5 on the hidden-to-hidden matrices (0.2-0.5 across their experiments).
    rate_ranges = {RECURRENT: RateRange(0.2, 0.5, 0.5)}

    def plan(self, model: nn.Module, ctx: PlanContext) -> list[PlanItem]:
        mm = model_map(model, ctx)
        rows: list[PlanItem] = []
        rate, reason = self.rate_for(RECURRENT, ctx)
        if not rate:
            return rows
        for info in mm.layers:
            if info.kind != RECURRENT:
                continue
            if not isinstance(info.module, nn.RNNBase):
                rows.append(PlanItem(self.name, info.path, RECURRENT, self.name, None,
                                     f"not applied: {type(info.module).__name__} is not an nn.RNN/LSTM/GRU",
                                     action="note"))
                continue
            names = [n for n in info.module._flat_weights_names if n.startswith("weight_hh_l")]
            current = info.module._modules.get("weight_drop")
            if isinstance(current, WeightDrop) and self.config.existing == "keep":
                continue
            note = "; weight drop present, rate set" if isinstance(current, WeightDrop) else ""
            rows.append(PlanItem(self.name, info.path, RECURRENT, self.name, rate,
                                 f"{reason}; on {', '.join(names)}{note}", action="wrap", anchor=info.path))
        if not rows:
            warnings.warn(f"regularizer {self.name!r} found no recurrent layer in {type(model).__name__}; "
                          f"nothing was changed", stacklevel=2)
        return rows

    def wrap(self, model: nn.Module, item: PlanItem) -> None:
        """A wrap row: weight drop on the hidden-to-hidden matrices of the RNN at ``item.anchor``."""
        assert item.anchor is not None and item.rate is not None  # plan() fills both on a wrap row
        # plan() wraps nn.RNNBase layers only (and apply_weight_drop checks the type again)
        apply_weight_drop(cast(nn.RNNBase, model.get_submodule(item.anchor)), item.rate)


@hookimpl
def regfw_register_regularizers(register):
    register(LockedDropoutRegularizer)
    register(DropConnectRegularizer)
