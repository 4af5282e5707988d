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

**Scratch memory.** The random words (and, where autograd does not keep it, the mask that
:func:`masked_scale` multiplies by) are drawn into a per-thread buffer that is reused from call
to call, up to :data:`SCRATCH_ENTRIES` mask entries: freshly allocated megabyte tensors each cost
hundreds of page faults (the allocator hands the memory back to the system between calls), which
on one thread took longer than drawing the mask itself. The values are exactly those of fresh
tensors: the same draws of the same generator.

On other devices (CUDA...) the layers keep torch's fused kernels (``F.dropout``, ``bernoulli_``);
:func:`use_words` says which path a tensor takes.

**Under torch.compile** the CPU word masks are one operator of the compiled graph,
``regfw::word_mask`` (a ``torch.library`` custom op that runs the code above): the graph draws
the same words from the same generator as eager mode, so a seed gives the same masks compiled or
not, and never touches the scratch buffers, which a traced graph could not hold (module state read
by a trace is baked in). Measured on one thread (``bench/compile.py``'s MLP), a compiled training
step with regfw dropout took 1.8x the eager step when TorchInductor drew the masks with its own CPU
``rand``, and takes 1.26x with the operator. On other devices a compiled graph keeps torch's kernels,
which the compiler fuses.
"""
from __future__ import annotations

import math
import threading
from collections.abc import Sequence

import torch
from torch import Tensor

__all__ = ["RESOLUTION", "SCRATCH_ENTRIES", "drop_mask", "keep_scale_mask", "masked_scale", "use_words"]

#: Drop probabilities are multiples of this on the word path.
RESOLUTION = 1.0 / 65536
_FULL = -(2**63)  # random_(from=int64 min, to=None) fills all 64 bits
#: Masks of at most this many entries use the reused per-thread scratch buffers (2 bytes of random
#: words and one element of the input's dtype per entry: 48 MiB at most for float32).
SCRATCH_ENTRIES = 2**23
_scratch = threading.local()


def use_words(x: Tensor) -> bool:
    """Whether masks for ``x`` are drawn from random words (CPU floating point) rather than by
    torch's kernels (every other device keeps them: fused and already at the hardware's floor)."""
    return x.device.type == "cpu" and x.is_floating_point()


def _threshold(p: float) -> int:
    """Signed 16-bit threshold ``t - 32768`` with ``t = round(p * 65536)``: a slice ``s`` drops when
    ``s < t - 32768`` (``s + 32768`` is uniform on ``[0, 65536)``)."""
    return int(round(p * 65536)) - 32768


def _use_scratch(device: torch.device | str, n: int) -> bool:
    """Whether a draw of ``n`` entries on ``device`` may use the thread's scratch buffers: eager CPU
    draws up to :data:`SCRATCH_ENTRIES`. Never in a graph being compiled: there the buffer would be
    module state read by the trace, and the compiled graph allocates (and fuses) its own."""
    return torch.device(device).type == "cpu" and n <= SCRATCH_ENTRIES and not torch.compiler.is_compiling()


def _scratch_buffer(key: str, count: int, dtype: torch.dtype) -> Tensor:
    """The first ``count`` elements of this thread's CPU buffer ``key`` (grown when too small).

    Made outside inference mode, so it can be written in place under it (Lightning's validation)
    and outside it alike. The attribute name holds the dtype's bare name (``mask_float32``): an
    identifier, as attribute names should be."""
    key = f"{key}_{str(dtype).rpartition('.')[2]}"
    buf = getattr(_scratch, key, None)
    if buf is None or buf.numel() < count:
        with torch.inference_mode(False):
            buf = torch.empty(max(count, 4096), dtype=dtype)
        setattr(_scratch, key, buf)
    return buf[:count]


def _slices(shape: tuple[int, ...], n: int, device: torch.device | str) -> Tensor:
    """``n`` uniform 16-bit slices of 64-bit random words, as an int16 tensor of ``shape`` (on CPU in
    the thread's scratch buffer, valid until the next call: consume them at once)."""
    count = (n + 3) // 4
    if _use_scratch(device, n):
        words = _scratch_buffer("words", count, torch.int64).random_(_FULL, None)
    else:
        words = torch.empty(count, dtype=torch.int64, device=device).random_(_FULL, None)
    return words.view(torch.int16)[:n].view(shape)


def drop_mask(shape: Sequence[int], p: float, device: torch.device | str = "cpu") -> Tensor:
    """A boolean tensor of ``shape``, each entry True (drop) with probability ``round(p * 65536) / 65536``.

    Drawn from sliced 64-bit random words of the global generator of ``device`` (CPU is where this
    pays; on another device the same recipe runs there).
    """
    shape = tuple(int(s) for s in shape)
    n = math.prod(shape)
    t = _threshold(float(p))
    if t <= -32768 or n == 0:
        return torch.zeros(shape, dtype=torch.bool, device=device)
    if t >= 32768:
        return torch.ones(shape, dtype=torch.bool, device=device)
    return _slices(shape, n, device) < t


def keep_scale_mask(like: Tensor, shape: Sequence[int], p: float, scale: float | None = None) -> Tensor:
    """A mask of ``shape`` in ``like``'s dtype and device: 0 for dropped entries, ``scale`` (default
    ``1 / (1 - p)``, inverted dropout) for kept ones. For masks smaller than the input (per channel,
    per sample, per sequence) that broadcast over it; ``p < 1``.

    On the word path the slices are compared with the threshold straight into a tensor of
    ``like``'s dtype (``torch.ge(slices, t, out=mask)``, a kept entry is ``slice >= t``): one pass,
    measured 7x faster on one CPU thread than a boolean comparison, its inversion and ``.to`` (a
    boolean intermediate takes torch's slow, non-vectorised conversion path). The entries are those
    of ``~drop_mask(shape, p)`` for the same random state.
    """
    return _keep_scale_mask(like, shape, p, scale, scratch=False)


@torch.library.custom_op("regfw::word_mask", mutates_args=(), tags=(torch.Tag.nondeterministic_seeded,))
def _word_mask_op(shape: list[int], p: float, scale: float, dtype: torch.dtype) -> Tensor:
    """The CPU word-path mask as one opaque operator of a compiled graph (a fresh tensor, never
    scratch). Its inputs are numbers, so no gradient flows into it (a mask is a constant of autograd).

    Tagged ``nondeterministic_seeded``: a random op, which a compiler must neither fold, merge with
    another call nor recompute in the backward pass (the backward must see the forward's mask)."""
    return _keep_scale_mask(torch.empty((), dtype=dtype), shape, p, scale, scratch=False)


@_word_mask_op.register_fake
def _(shape: list[int], p: float, scale: float, dtype: torch.dtype) -> Tensor:
    return torch.empty(shape, dtype=dtype)


def _keep_scale_mask(like: Tensor, shape: Sequence[int], p: float, scale: float | None, scratch: bool) -> Tensor:
    """:func:`keep_scale_mask`; ``scratch``: the mask may live in the thread's scratch buffer
    (only for a caller that consumes it at once and where autograd does not save it)."""
    value = 1.0 / (1.0 - p) if scale is None else float(scale)
    if use_words(like) and torch.compiler.is_compiling():  # sizes stay symbolic: a graph for every batch size
        return _word_mask_op(list(shape), float(p), value, like.dtype)
    shape = tuple(int(s) for s in shape)
    if not use_words(like):
        mask = like.new_empty(shape).bernoulli_(1.0 - p)
        return mask if value == 1.0 else mask.mul_(value)
    n = math.prod(shape)
    t = _threshold(float(p))
    if t <= -32768 or n == 0:
        return torch.full(shape, value, dtype=like.dtype, device=like.device)
    if scratch and _use_scratch(like.device, n):
        mask = _scratch_buffer("mask", n, like.dtype).view(shape)
    else:
        mask = torch.empty(shape, dtype=like.dtype, device=like.device)
    if t >= 32768:
        return mask.zero_()
    torch.ge(_slices(shape, n, like.device), t, out=mask)
    return mask if value == 1.0 else mask.mul_(value)


def masked_scale(x: Tensor, p: float, scale: float | None = None) -> Tensor:
    """Per-element dropout of ``x``: ``x`` times a mask of 0 (dropped) and ``scale`` (kept; default
    ``1 / (1 - p)``). Gradients flow to ``x`` through the kept entries.

    The mask is in ``x``'s dtype before the product: measured on one CPU thread, ``x * float_mask``
    is about twice as fast as ``x * bool_mask``, ``torch.where`` or ``masked_fill_`` (those take a
    slower type-promoting or scalar-filling path). Where autograd will not keep the mask (no
    gradient to ``x``: Monte Carlo sampling, evaluation) it lives in the thread's scratch buffer.
    """
    scratch = not (x.requires_grad and torch.is_grad_enabled())
    return x * _keep_scale_mask(x, x.shape, p, scale, scratch)
