"""The ``dropout`` regularizer: inverted dropout injected per layer kind.

Srivastava et al., "Dropout: A Simple Way to Prevent Neural Networks from Overfitting", JMLR
2014. Rates not given in the config come from the rate table and policy in
:mod:`regfw.kinds`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Optional

from torch import nn

import regfw
from regfw.config import rate
from regfw.kinds import CONV, HIDDEN, INPUT, RECURRENT
from regfw.regularizer import InjectingRegularizer, PlanItem


@dataclass
class DropoutConfig:
    """Rates per layer kind; null takes the rate policy (or the table default)."""

    input: Optional[float] = rate(doc="dropout on the model input (table: 0.1-0.2)")
    hidden: Optional[float] = rate(doc="after hidden Linear layers (table: 0.3-0.5)")
    conv: Optional[float] = rate(doc="after conv layers (table: 0.1-0.3)")
    recurrent: Optional[float] = rate(doc="on recurrent layer outputs (table: 0.2-0.3)")
    #: ``auto``: the rules of thumb from dataset size and parameter count; ``default``: the table.
    policy: Literal["auto", "default"] = "auto"
    #: What to do where the model already has a dropout layer: set its rate, or leave it alone.
    existing: Literal["override", "keep"] = "override"


class Dropout(InjectingRegularizer):
    """Inverted dropout after hidden, conv and recurrent layers, and on the model input."""

    name = "dropout"
    family = "dropout"
    description = "inverted dropout per layer kind (input, hidden, conv, recurrent)"
    Config = DropoutConfig
    kinds = (INPUT, HIDDEN, CONV, RECURRENT)

    def make_module(self, kind: str, rate: float, item: PlanItem) -> nn.Module:
        return nn.Dropout(rate)


@regfw.hookimpl
def regfw_register_regularizers(register):
    register(Dropout)
