"""Concrete dropout: dropout whose rate is a trained parameter.

Gal, Hron and Kendall, "Concrete Dropout", NeurIPS 2017. The Bernoulli mask of dropout is
replaced by its continuous relaxation (the Concrete, or relaxed Bernoulli, distribution of
Maddison et al. 2017 and Jang et al. 2017) at temperature ``t``::

    drop = sigmoid((log p - log(1 - p) + log u - log(1 - u)) / t),   u ~ U(0, 1)
    out  = x * (1 - drop) / (1 - p)

so the output is differentiable in ``p``, and ``p = sigmoid(p_logit)`` is learned with the
weights. At ``t = 0.1`` (the paper's value) the mask is all but binary. The objective that
makes learning ``p`` meaningful is the variational one: the data term plus, per layer, the KL
term of :func:`concrete_regularizer` divided by the training-set size N; without it the rates
collapse to 0 (no noise fits the training data best).

As every regfw layer: eval mode is the identity, the rate is in ``p`` (here a float view of the
parameter; assigning to it sets the parameter), and Monte Carlo dropout samples it (it is a
:class:`~regfw.layers.base.StochasticModule`).
"""
from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from .base import StochasticModule, check_rate

__all__ = ["ConcreteDropout", "concrete_dropout", "concrete_regularizer"]

_EPS = 1e-7


def concrete_dropout(x: Tensor, p: Tensor, temperature: float = 0.1, training: bool = True) -> Tensor:
    """Relaxed-Bernoulli dropout of ``x`` at the (tensor) rate ``p``, differentiable in ``p``."""
    if not training:
        return x
    u = torch.rand_like(x).clamp_(_EPS, 1.0 - _EPS)
    p = p.to(x.dtype).clamp(_EPS, 1.0 - _EPS)
    drop = torch.sigmoid((torch.log(p) - torch.log1p(-p) + torch.log(u) - torch.log1p(-u)) / temperature)
    return x * (1.0 - drop) / (1.0 - p)


def concrete_regularizer(p: Tensor, weight_sq: Tensor, input_dim: int, weight_scale: float,
                         dropout_scale: float) -> Tensor:
    """The KL term of one concrete dropout layer (Gal, Hron and Kendall 2017, eq. 3 and their code).

    ``weight_scale * |W|^2 / (1 - p) + dropout_scale * K * (p log p + (1 - p) log(1 - p))``, where
    ``W`` are the weights the dropped units feed, ``K`` the number of units dropped per example and,
    for a loss that is the mean negative log-likelihood over a training set of N examples and a
    prior length-scale ``l``, ``weight_scale = l^2 / (2N)`` and ``dropout_scale = 1 / N``. The
    second term is minus the entropy of the mask: it pulls ``p`` towards 0.5 with a strength that
    falls as 1/N, so the learned rate is high for little data and falls as data grows.
    """
    p = p.clamp(_EPS, 1.0 - _EPS)
    entropy_term = p * torch.log(p) + (1.0 - p) * torch.log1p(-p)
    return weight_scale * weight_sq / (1.0 - p) + dropout_scale * input_dim * entropy_term


class ConcreteDropout(StochasticModule):
    """Dropout with a learned rate (see the module docstring).

    Args:
        p: the initial rate, in (0, 1).
        temperature: of the relaxed Bernoulli; 0.1 as in the paper.

    ``input_dim`` (the number of units dropped per example, ``K`` of the regularizer) is read
    from the first training-mode input.
    """

    def __init__(self, p: float = 0.1, temperature: float = 0.1) -> None:
        super().__init__()
        p = check_rate(p)
        if not 0.0 < p < 1.0:
            raise ValueError(f"ConcreteDropout: the initial rate p must be in (0, 1), got {p!r}")
        if not temperature > 0:
            raise ValueError(f"ConcreteDropout: temperature must be > 0, got {temperature!r}")
        self.p_logit = nn.Parameter(torch.tensor(math.log(p) - math.log1p(-p)))
        self.temperature = float(temperature)
        self.input_dim = 0

    def rate(self) -> Tensor:
        """The rate as a tensor in the autograd graph."""
        return torch.sigmoid(self.p_logit)

    @property
    def p(self) -> float:
        return float(torch.sigmoid(self.p_logit.detach()))

    @p.setter
    def p(self, value: float) -> None:
        value = check_rate(value)
        value = min(max(value, _EPS), 1.0 - _EPS)
        with torch.no_grad():
            self.p_logit.fill_(math.log(value) - math.log1p(-value))

    def forward(self, x: Tensor) -> Tensor:
        if not self.training:
            return x
        if not self.input_dim:
            self.input_dim = int(x[0].numel()) if x.dim() > 1 else int(x.numel())
        return concrete_dropout(x, self.rate(), self.temperature, True)

    def extra_repr(self) -> str:
        return f"p={self.p:.4g} (learned), temperature={self.temperature:g}"
