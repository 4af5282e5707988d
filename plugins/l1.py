"""The ``l1`` regularizer: the penalty ``strength * sum(|w|)``, which drives weights to exactly zero.

Tibshirani, "Regression Shrinkage and Selection via the Lasso", JRSS-B 1996; Keras'
``regularizers.L1``. It acts on the same parameters as ``weight_decay`` (no biases, norms or
other 1-D parameters; the same ``embeddings`` and ``exclude`` settings) and composes with it
(L1 + L2 is the elastic net). The gradient is ``strength * sign(w)`` (0 at w = 0).
The default strength, 1e-5, is for a penalty summed over a whole network: Keras' 0.01 is per
layer and, summed over the ~10^4-10^6 weights of a network, swamps the data term.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from regfw.extend import DecaySetConfig, DecaySetRegularizer, check_finite, hookimpl, nonneg

DEFAULT_STRENGTH = 1e-5


@dataclass
class L1Config(DecaySetConfig):
    """``regularizers.l1``: the strength and which parameters (as for ``weight_decay``)."""

    strength: float = nonneg(DEFAULT_STRENGTH, doc="coefficient of sum(|w|) in the loss")

    def __post_init__(self) -> None:
        check_finite(self, ("strength",))


def l1_penalty(params: list[nn.Parameter], strength: float) -> torch.Tensor | None:
    """``strength * sum(|w|)`` over ``params`` (None when there are none)."""
    if not params:
        return None
    return strength * torch.stack([p.abs().sum() for p in params]).sum()


class L1(DecaySetRegularizer):
    """L1 penalty on the weights that ``weight_decay`` would decay."""

    name = "l1"
    description = "L1 penalty strength*sum(|w|) on weights (no biases, norms or 1-D parameters)"
    Config = L1Config

    def penalty(self, model: nn.Module) -> torch.Tensor | None:
        if not self.config.strength:
            return None
        return l1_penalty(self.decay_params(model), self.config.strength)

    def describe(self, model: nn.Module) -> list[str]:
        params = self.decay_params(model)
        return [f"loss += {self.config.strength:g} * sum(|w|) over {len(params)} tensor(s), "
                f"{sum(p.numel() for p in params):,} values (the weight_decay decay group)"]


@hookimpl
def regfw_register_regularizers(register):
    register(L1)
