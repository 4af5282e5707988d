"""Element-wise and channel-wise dropout: standard, spatial, Gaussian and alpha dropout.

Each variant is a function plus a thin :class:`~regfw.layers.base.StochasticModule`, in the style
of timm's ``timm/layers/drop.py``. The common contract, tested in ``tests/layers``:

* the rate ``p`` is validated (a ``ValueError`` naming the value outside [0, 1]) and may be changed
  at run time (``module.p = 0.2``); forward passes read it each call;
* in eval mode (``training=False``) the input tensor itself is returned (``out is x``), except for
  classic (non-inverted) :class:`Dropout`, which scales by ``1 - p`` at inference;
* ``p = 0`` returns the input tensor itself; ``p = 1`` returns zeros, with no NaN and no division by zero;
* masks are made in the input's dtype and on its device, from torch's global generator, so results
  are reproducible under ``torch.manual_seed``; on CPU they come from sliced random words
  (:mod:`regfw.layers.masks`: drop rates exact to 1/65536), elsewhere from torch's fused kernels.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from .base import Rate, StochasticModule, check_rate, zeros_like_graph
from .masks import keep_scale_mask, masked_scale, use_words

__all__ = [
    "dropout",
    "spatial_dropout",
    "gaussian_dropout",
    "alpha_dropout",
    "Dropout",
    "SpatialDropout",
    "SpatialDropout1d",
    "SpatialDropout2d",
    "SpatialDropout3d",
    "GaussianDropout",
    "AlphaDropout",
]



def dropout(x: Tensor, p: float = 0.5, training: bool = True, inverted: bool = True) -> Tensor:
    """Per-element dropout (Srivastava et al., "Dropout: A Simple Way to Prevent Neural Networks
    from Overfitting", JMLR 2014).

    ``inverted=True`` (the default, as in ``torch.nn.Dropout``): kept units are scaled by
    ``1 / (1 - p)`` during training and inference is the identity. ``inverted=False`` is the scheme of
    the paper: no scaling during training, the output is multiplied by ``1 - p`` at inference, so the
    two schemes can be compared. Both keep the expected activation equal between training and inference.
    """
    p = check_rate(p)
    if p == 0.0:
        return x
    if inverted:
        if not training:
            return x
        if p == 1.0:
            return zeros_like_graph(x)
        if use_words(x):  # masks dominate Monte Carlo dropout on CPU: draw them at the floor
            return masked_scale(x, p)
        return F.dropout(x, p, training=True)
    if not training:
        return x * (1.0 - p)
    if p == 1.0:
        return zeros_like_graph(x)
    if use_words(x):
        return masked_scale(x, p, scale=1.0)
    mask = torch.empty_like(x, memory_format=torch.contiguous_format).bernoulli_(1.0 - p)
    return x * mask


def spatial_dropout(x: Tensor, p: float = 0.5, training: bool = True) -> Tensor:
    """Drop whole channels (Tompson et al., "Efficient Object Localization Using Convolutional
    Networks", CVPR 2015).

    ``x`` has shape ``(N, C, *spatial)`` with at least one spatial dimension; one Bernoulli draw per
    (sample, channel) zeroes the whole feature map, kept maps are scaled by ``1 / (1 - p)``. Adjacent
    pixels of a convolutional map are strongly correlated, so per-element dropout removes little
    information there; dropping whole channels does.
    """
    p = check_rate(p)
    if x.dim() < 3:
        raise ValueError(
            f"spatial_dropout expects an input of shape (N, C, *spatial) with rank >= 3, got shape "
            f"{tuple(x.shape)}; use dropout() for (N, C) inputs"
        )
    if not training or p == 0.0:
        return x
    if p == 1.0:
        return zeros_like_graph(x)
    return x * keep_scale_mask(x, x.shape[:2] + (1,) * (x.dim() - 2), p)


def gaussian_dropout(x: Tensor, p: float = 0.5, training: bool = True) -> Tensor:
    """Multiplicative Gaussian noise with the mean and variance of inverted dropout at rate ``p``.

    Srivastava et al. 2014, section 10: multiplying by ``N(1, sigma^2)`` with ``sigma^2 = p / (1 - p)``
    has the same first two moments as the inverted Bernoulli mask ``Bernoulli(1 - p) / (1 - p)``, and
    needs no rescaling at inference. At ``p = 1`` the variance is infinite; the limit of the Bernoulli
    counterpart drops everything, so this function returns zeros there (documented, tested).
    """
    p = check_rate(p)
    if not training or p == 0.0:
        return x
    if p == 1.0:
        return zeros_like_graph(x)
    std = math.sqrt(p / (1.0 - p))
    noise = torch.empty_like(x, memory_format=torch.contiguous_format).normal_(1.0, std)
    return x * noise


def alpha_dropout(x: Tensor, p: float = 0.5, training: bool = True) -> Tensor:
    """Alpha dropout for self-normalizing networks (Klambauer et al., "Self-Normalizing Neural
    Networks", NeurIPS 2017).

    Dropped units are set to SELU's negative saturation value and an affine correction keeps zero mean
    and unit variance, so SELU networks stay normalized. Wraps ``torch.nn.functional.alpha_dropout``
    under the common contract (eval and ``p = 0`` return the input itself, ``p = 1`` gives zeros).
    """
    p = check_rate(p)
    if not training or p == 0.0:
        return x
    if p == 1.0:
        return zeros_like_graph(x)
    if use_words(x):  # F.alpha_dropout's affine map, with the mask drawn from random words
        alpha = 1.7580993408473766  # -SELU's negative saturation value
        a = 1.0 / math.sqrt((alpha * alpha * p + 1.0) * (1.0 - p))
        keep = keep_scale_mask(x, x.shape, p, scale=1.0)  # kept: a * x + alpha a p; dropped: -alpha a + alpha a p
        return (x * a).add_(alpha * a).mul_(keep).add_(alpha * a * (p - 1.0))
    return F.alpha_dropout(x, p, training=True)


class Dropout(StochasticModule):
    """Per-element dropout; see :func:`dropout`.

    Args:
        p: drop probability in [0, 1].
        inverted: scale by ``1 / (1 - p)`` in training (default). With ``inverted=False`` training does
            not scale and inference multiplies by ``1 - p``: the one exception to "eval is the identity".
    """

    p = Rate()

    def __init__(self, p: float = 0.5, inverted: bool = True) -> None:
        super().__init__()
        self.p = p
        self.inverted = bool(inverted)

    def forward(self, x: Tensor) -> Tensor:
        return dropout(x, self.p, self.training, self.inverted)

    def extra_repr(self) -> str:
        return f"p={self.p}, inverted={self.inverted}"


class SpatialDropout(StochasticModule):
    """Channel dropout for inputs ``(N, C, *spatial)`` of any rank >= 3; see :func:`spatial_dropout`.

    The subclasses :class:`SpatialDropout1d`, :class:`SpatialDropout2d` and :class:`SpatialDropout3d`
    additionally check the rank (3, 4 and 5), which catches a missing batch dimension early.
    """

    p = Rate()
    expected_dim: int | None = None
    layout = "(N, C, *spatial)"

    def __init__(self, p: float = 0.5) -> None:
        super().__init__()
        self.p = p

    def forward(self, x: Tensor) -> Tensor:
        if self.expected_dim is not None and x.dim() != self.expected_dim:
            raise ValueError(
                f"{type(self).__name__} expects a rank-{self.expected_dim} input {self.layout}, "
                f"got shape {tuple(x.shape)}"
            )
        return spatial_dropout(x, self.p, self.training)

    def extra_repr(self) -> str:
        return f"p={self.p}"


class SpatialDropout1d(SpatialDropout):
    """Channel dropout for ``(N, C, L)`` inputs; see :func:`spatial_dropout`."""

    expected_dim = 3
    layout = "(N, C, L)"


class SpatialDropout2d(SpatialDropout):
    """Channel dropout for ``(N, C, H, W)`` inputs; see :func:`spatial_dropout`."""

    expected_dim = 4
    layout = "(N, C, H, W)"


class SpatialDropout3d(SpatialDropout):
    """Channel dropout for ``(N, C, D, H, W)`` inputs; see :func:`spatial_dropout`."""

    expected_dim = 5
    layout = "(N, C, D, H, W)"


class GaussianDropout(StochasticModule):
    """Multiplicative ``N(1, p / (1 - p))`` noise; see :func:`gaussian_dropout` (zeros at ``p = 1``)."""

    p = Rate()

    def __init__(self, p: float = 0.5) -> None:
        super().__init__()
        self.p = p

    def forward(self, x: Tensor) -> Tensor:
        return gaussian_dropout(x, self.p, self.training)

    def extra_repr(self) -> str:
        return f"p={self.p}"


class AlphaDropout(StochasticModule):
    """Alpha dropout for SELU networks; see :func:`alpha_dropout`."""

    p = Rate()

    def __init__(self, p: float = 0.5) -> None:
        super().__init__()
        self.p = p

    def forward(self, x: Tensor) -> Tensor:
        return alpha_dropout(x, self.p, self.training)

    def extra_repr(self) -> str:
        return f"p={self.p}"
