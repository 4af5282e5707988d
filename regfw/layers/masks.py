"""Dropout masks at the random-number floor on CPU: Bernoulli draws from sliced random words.

On CPU the masks, not the matrix products, dominate dropout-everywhere networks and Monte Carlo
dropout: per element, ``bernoulli_`` and ``rand_like(x) >= p`` each produce a 32-bit (or wider)
random number and convert it. Here one call of the generator fills 64-bit words over their full
range (``torch.empty(n // 4, dtype=torch.int64).random_(-2**63, None)``), each word is read as four
16-bit slices, and a slice is compared with an integer threshold: a quarter of the random numbers,
no floating-point random numbers: about 4x faster than ``rand_like(x) >= p`` for the mask alone
(``bench/masks.py``).

**Resolution.** A slice is uniform on 65536 values, so an element is dropped with probability
``round(p * 65536) / 65536``: exact to 1/65536 (|error| <= 2**-17). Rates below 2**-17 drop
nothing; rates above ``1 - 2**-17`` drop everything (``p = 1`` returns zeros before any mask is
drawn anyway). The masks come from torch's global CPU generator, so they are reproducible under
``torch.manual_seed`` (a different stream than ``bernoulli_``'s: same distribution, other values).

On other devices (CUDA...) the layers keep torch's fused kernels (``F.dropout``, ``bernoulli_``);
:func:`use_words` says which path a tensor takes.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

__all__ = ["RESOLUTION", "drop_mask", "keep_scale_mask", "masked_scale", "use_words"]

#: Drop probabilities are multiples of this on the word path.
RESOLUTION = 1.0 / 65536
_FULL = -(2**63)  # random_(from=int64 min, to=None) fills all 64 bits


def use_words(x: Tensor) -> bool:
    """Whether masks for ``x`` are drawn from random words (CPU floating point) rather than by
    torch's kernels (every other device keeps them: fused and already at the hardware's floor)."""
    return x.device.type == "cpu" and x.is_floating_point()


def _threshold(p: float) -> int:
    """Signed 16-bit threshold ``t - 32768`` with ``t = round(p * 65536)``: a slice ``s`` drops when
    ``s < t - 32768`` (``s + 32768`` is uniform on ``[0, 65536)``)."""
    return int(round(p * 65536)) - 32768


def drop_mask(shape: Sequence[int], p: float, device: torch.device | str = "cpu") -> Tensor:
    """A boolean tensor of ``shape``, each entry True (drop) with probability ``round(p * 65536) / 65536``.

    Drawn from sliced 64-bit random words of the global generator of ``device`` (CPU is where this
    pays; on another device the same recipe runs there).
    """
    shape = tuple(int(s) for s in shape)
    n = 1
    for s in shape:
        n *= s
    t = _threshold(float(p))
    if t <= -32768 or n == 0:
        return torch.zeros(shape, dtype=torch.bool, device=device)
    if t >= 32768:
        return torch.ones(shape, dtype=torch.bool, device=device)
    words = torch.empty((n + 3) // 4, dtype=torch.int64, device=device).random_(_FULL, None)
    return words.view(torch.int16)[:n].view(shape) < t


def keep_scale_mask(like: Tensor, shape: Sequence[int], p: float, scale: float | None = None) -> Tensor:
    """A mask of ``shape`` in ``like``'s dtype and device: 0 for dropped entries, ``scale`` (default
    ``1 / (1 - p)``, inverted dropout) for kept ones. For masks smaller than the input (per channel,
    per sample, per sequence) that broadcast over it; ``p < 1``."""
    value = 1.0 / (1.0 - p) if scale is None else float(scale)
    if not use_words(like):
        mask = like.new_empty(tuple(shape)).bernoulli_(1.0 - p)
        return mask if value == 1.0 else mask.mul_(value)
    keep = ~drop_mask(shape, p, like.device)
    mask = keep.to(like.dtype)
    return mask if value == 1.0 else mask.mul_(value)


def masked_scale(x: Tensor, p: float, scale: float | None = None) -> Tensor:
    """Per-element dropout of ``x``: ``x`` times a mask of 0 (dropped) and ``scale`` (kept; default
    ``1 / (1 - p)``). Gradients flow to ``x`` through the kept entries.

    The boolean keep mask is turned into ``x``'s dtype before the product: measured on one CPU
    thread, ``x * float_mask`` is about twice as fast as ``x * bool_mask``, ``torch.where`` or
    ``masked_fill_`` (those take a slower type-promoting or scalar-filling path).
    """
    return x * keep_scale_mask(x, x.shape, p, scale)
