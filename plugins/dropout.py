"""Element-wise dropout regularizers: ``dropout``, ``gaussian_dropout`` and ``alpha_dropout``.

Each drops (or perturbs) single activations, so each fits the input, hidden Linear and conv
layers alike. They form the ``dropout`` family with the channel, block, path and recurrent
variants: one layer kind takes one variant, so selecting two of them for the same kind is a
config error naming both.

* ``dropout``: Srivastava et al., "Dropout: A Simple Way to Prevent Neural Networks from
  Overfitting", JMLR 2014. ``inverted: false`` gives the paper's classic scheme (no scaling in
  training, outputs times ``1 - p`` at inference) for comparing the two.
* ``gaussian_dropout``: multiplicative ``N(1, p / (1 - p))`` noise, the same mean and variance as
  Bernoulli dropout at rate ``p`` (Srivastava et al. 2014, section 10).
* ``alpha_dropout``: for SELU networks (Klambauer et al., "Self-Normalizing Neural Networks",
  NeurIPS 2017); its rates come from its own range, 0.05-0.1.

Rates not given in the config come from the rate table and policy in :mod:`regfw.placement.kinds`.
"""
from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from regfw.extend import (
    CONV,
    HIDDEN,
    INPUT,
    RECURRENT,
    InjectingRegularizer,
    InjectionConfig,
    PlanItem,
    RateRange,
    hookimpl,
)
from regfw.layers import AlphaDropout as AlphaDropoutLayer
from regfw.layers import Dropout as DropoutLayer
from regfw.layers import GaussianDropout as GaussianDropoutLayer


@dataclass
class DropoutConfig(InjectionConfig):
    """The scheme; one rate field per kind of ``Dropout.kinds`` is added by ``InjectingRegularizer``
    (null takes the rate policy or the table default, 0 switches a kind off)."""

    #: ``true``: scale kept units by 1 / (1 - p) in training (torch's scheme); ``false``: the
    #: paper's classic scheme, scaling by (1 - p) at inference instead.
    inverted: bool = True


class Dropout(InjectingRegularizer):
    """Per-element dropout after hidden, conv and recurrent layers, and on the model input."""

    name = "dropout"
    family = "dropout"
    description = "per-element dropout per layer kind (input, hidden, conv, recurrent); inverted or classic"
    Config = DropoutConfig
    kinds = (INPUT, HIDDEN, CONV, RECURRENT)

    def make_module(self, kind: str, rate: float, item: PlanItem) -> nn.Module:
        return DropoutLayer(rate, inverted=self.config.inverted)


class GaussianDropout(InjectingRegularizer):
    """Multiplicative Gaussian noise with the moments of dropout at the planned rate (rates in
    Bernoulli-dropout terms: the noise variance is p / (1 - p))."""

    name = "gaussian_dropout"
    family = "dropout"
    description = "multiplicative N(1, p/(1-p)) noise per layer kind (input, hidden, conv)"
    kinds = (INPUT, HIDDEN, CONV)

    def make_module(self, kind: str, rate: float, item: PlanItem) -> nn.Module:
        return GaussianDropoutLayer(rate)


class AlphaDropout(InjectingRegularizer):
    """Alpha dropout, which keeps a SELU network's activations at zero mean and unit variance."""

    name = "alpha_dropout"
    family = "dropout"
    description = "alpha dropout for SELU networks (input, hidden; rates 0.05-0.1)"
    kinds = (INPUT, HIDDEN)
    # Klambauer et al., "Self-Normalizing Neural Networks", NeurIPS 2017: alpha dropout at 0.05
    # or 0.1; the per-element hidden range 0.3-0.5 would break the self-normalizing property.
    rate_ranges = {INPUT: RateRange(0.05, 0.1, 0.05), HIDDEN: RateRange(0.05, 0.1, 0.1)}

    def make_module(self, kind: str, rate: float, item: PlanItem) -> nn.Module:
        return AlphaDropoutLayer(rate)


@hookimpl
def regfw_register_regularizers(register):
    register(Dropout)
    register(GaussianDropout)
    register(AlphaDropout)
