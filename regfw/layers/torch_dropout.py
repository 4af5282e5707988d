"""torch's own dropout modules on regfw's CPU word masks, for Monte Carlo dropout.

Models bring ``nn.Dropout`` and friends (torchvision's classifiers, hand-written networks), and
Monte Carlo dropout reuses them. On CPU their masks come from torch's ``bernoulli_`` kernel, about
twice the cost of the sliced random words of :mod:`regfw.layers.masks` that regfw's own layers
draw (``bench/masks.py``); with T samples of a wide layer the mask is most of the sampled work.
:func:`word_forward` gives a replacement ``forward`` for one such module, which
:func:`regfw.uncertainty.mc_mode` installs on the instance for the duration of MC mode only:

* same distribution: per element (``nn.Dropout``) or per channel (``nn.Dropout1d/2d/3d`` on
  batched input), inverted scaling ``1 / (1 - p)``, ``nn.AlphaDropout``'s affine map; the rate is
  exact to 1/65536 (:data:`regfw.layers.masks.RESOLUTION`) and read from the module each call;
* ``inplace=True`` is honoured (the input is multiplied in place);
* any other case -- a tensor not on the CPU (CUDA keeps torch's fused kernels), eval mode, p = 0 or
  1, unbatched or unusual shapes for the channel variants -- runs the module's own forward.

Only the exact torch types are routed (a subclass may have its own forward), and never a module
whose instance already has a ``forward`` of its own.
"""
from __future__ import annotations

import types
from collections.abc import Callable

from torch import Tensor, nn
from torch.nn.modules.dropout import _DropoutNd

from .dropout import alpha_dropout
from .masks import keep_scale_mask, use_words

__all__ = ["ROUTED_TYPES", "word_forward"]

#: Channel variants: the input rank on which one mask entry per (sample, channel) is drawn.
_CHANNEL_RANK: dict[type, int] = {nn.Dropout1d: 3, nn.Dropout2d: 4, nn.Dropout3d: 5}
#: The torch dropout types :func:`word_forward` routes.
ROUTED_TYPES: tuple[type, ...] = (nn.Dropout, *_CHANNEL_RANK, nn.AlphaDropout)


def _usable(module: _DropoutNd, x: Tensor) -> bool:
    return module.training and 0.0 < module.p < 1.0 and isinstance(x, Tensor) and use_words(x)


def _element(self: _DropoutNd, x: Tensor) -> Tensor:
    if not _usable(self, x):
        return type(self).forward(self, x)
    mask = keep_scale_mask(x, x.shape, self.p)
    return x.mul_(mask) if self.inplace else x * mask


def _channel(self: _DropoutNd, x: Tensor) -> Tensor:
    rank = _CHANNEL_RANK[type(self)]
    if not _usable(self, x) or x.dim() != rank:
        return type(self).forward(self, x)
    mask = keep_scale_mask(x, (x.shape[0], x.shape[1], *([1] * (rank - 2))), self.p)
    return x.mul_(mask) if self.inplace else x * mask


def _alpha(self: _DropoutNd, x: Tensor) -> Tensor:
    if not _usable(self, x) or self.inplace:
        return type(self).forward(self, x)
    return alpha_dropout(x, self.p, training=True)


def word_forward(module: nn.Module) -> Callable[[Tensor], Tensor] | None:
    """A ``forward`` for ``module`` drawing its masks from random words on CPU, or None when
    ``module`` is not exactly one of :data:`ROUTED_TYPES` or already has an instance ``forward``.

    Install it with ``module.forward = fn`` and remove it with ``del module.forward`` (what
    :func:`regfw.uncertainty.mc_mode` does); the module's own forward serves every case the word
    path does not cover.
    """
    kind = type(module)
    if kind not in ROUTED_TYPES or "forward" in module.__dict__ or not isinstance(module, _DropoutNd):
        return None
    # a bound method, not a closure: a deepcopy of the module made meanwhile binds it to the copy
    fn = _element if kind is nn.Dropout else _alpha if kind is nn.AlphaDropout else _channel
    return types.MethodType(fn, module)
