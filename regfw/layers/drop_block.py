"""DropBlock: dropout of contiguous square regions of convolutional feature maps.

Ghiasi, Lin and Le, "DropBlock: A regularization method for convolutional networks", NeurIPS 2018.

Exact rate. The paper (and timm) pick the seed probability ``gamma = p / block^2 * area / valid_area``,
which ignores that blocks overlap one another: on small maps it over-drops badly (92% dropped on a
7x7 map with block 7 at a 10% target). Here seeds are placed on the positions where a whole block fits
(top-left corners ``(r, c)``, ``0 <= r <= H - bh``, ``0 <= c <= W - bw``), each independently with
probability ``gamma``. A pixel is dropped unless every one of the ``k(i, j)`` seeds whose block covers
it is off, so

    E[dropped fraction] = 1 - mean_{i,j} (1 - gamma) ** k(i, j),    k(i, j) = k_h(i) * k_w(j),

where ``k_h(i)`` counts the seed rows covering row ``i`` (likewise for columns). This is exact,
including the border, where fewer blocks reach. :func:`drop_block_gamma` solves it for ``gamma`` by
Newton's method on ``lambda = -log(1 - gamma)``, where the left side is convex and decreasing, so the
iteration started at 0 climbs monotonically to the root; the result is cached per
``(H, W, bh, bw, p)``.

Fast sampling. Seeds are rare (``gamma`` is about ``p / block^2``), so instead of drawing one
Bernoulli per seed position, the number of seeds is drawn from ``Poisson(lambda * num_positions)``
and each is put on a uniform position (with replacement). By Poisson thinning every position then
holds ``Poisson(lambda)`` seeds independently of the others, so it is "on" with probability exactly
``1 - exp(-lambda) = gamma``: the same distribution as the Bernoulli field, at the cost of
``O(num_seeds * block area)`` index writes instead of a random number per element and a max-pool.
Forward plus backward is several times faster than ``F.dropout`` on the same tensor (``bench/dropblock.py``).

Under ``torch.compile`` the sampler (a seed count drawn first, then a Python loop over chunks of
seeds: data-dependent, a graph break) is one operator of the graph, ``regfw::block_mask``, a
``torch.library`` custom op that runs the same code, the solve for the seed intensity included: the
compiled graph draws eager mode's masks, at eager mode's cost.

Rescaling is per sample: kept activations are multiplied by ``numel / kept`` of that sample's mask,
with zero kept giving zeros (no division by zero).
"""
from __future__ import annotations

import functools
import math

import torch
from torch import Tensor

from .base import Rate, StochasticModule, check_rate, zeros_like_graph

__all__ = ["drop_block_2d", "drop_block_gamma", "DropBlock2d"]

# Upper bound on int64 indices materialised at once while filling a mask (32 MiB).
_MAX_INDICES = 1 << 22


def _block_pair(block_size: int | tuple[int, int]) -> tuple[int, int]:
    pair = (block_size, block_size) if isinstance(block_size, int) else tuple(block_size)
    if len(pair) != 2 or not all(isinstance(b, int) and not isinstance(b, bool) and b >= 1 for b in pair):
        raise ValueError(
            f"block_size must be a positive int or a pair (height, width) of positive ints, got {block_size!r}"
        )
    return pair


def _coverage(n: int, b: int) -> list[int]:
    """For each index of an axis of length ``n``, how many block starts ``r in [0, n - b]`` cover it."""
    return [min(i, n - b) - max(0, i - b + 1) + 1 for i in range(n)]


@functools.lru_cache(maxsize=1024)
def _seed_intensity(height: int, width: int, block_h: int, block_w: int, p: float) -> float:
    """``lambda = -log(1 - gamma)`` for which the expected dropped fraction equals ``p`` exactly."""
    if p <= 0.0:
        return 0.0
    if p >= 1.0:
        return math.inf
    # Histogram of the coverage counts k = k_h * k_w, weighted by the share of pixels having it.
    rows: dict[int, int] = {}
    for k in _coverage(height, block_h):
        rows[k] = rows.get(k, 0) + 1
    cols: dict[int, int] = {}
    for k in _coverage(width, block_w):
        cols[k] = cols.get(k, 0) + 1
    hist: dict[int, float] = {}
    area = height * width
    for kh, nh in rows.items():
        for kw, nw in cols.items():
            hist[kh * kw] = hist.get(kh * kw, 0.0) + nh * nw / area
    ks = list(hist)
    ws = [hist[k] for k in ks]
    target = 1.0 - p  # solve g(lam) = sum_k w_k exp(-lam k) = target; g is convex and decreasing
    lam = 0.0
    for _ in range(10_000):
        terms = [w * math.exp(-lam * k) for k, w in zip(ks, ws, strict=True)]
        g = math.fsum(terms)
        slope = math.fsum(k * t for k, t in zip(ks, terms, strict=True))
        if g <= target or slope == 0.0:
            break
        step = (g - target) / slope
        lam += step
        if step <= 1e-15 * lam:
            break
    return lam


def _concrete(value: float) -> float:
    """``value`` as a plain Python float, also where a trace holds it symbolically (a rate changed
    between calls becomes symbolic under Dynamo's automatic dynamic): reading its exact binary value
    makes the graph specialise on it, as it does on the rate of every other dropout layer."""
    return float.fromhex(float(value).hex())


def drop_block_gamma(
    height: int, width: int, block_size: int | tuple[int, int], p: float
) -> float:
    """The seed probability that makes DropBlock drop exactly a fraction ``p`` in expectation.

    Seeds sit on the ``(H - bh + 1) x (W - bw + 1)`` top-left corners where a whole block fits; a block
    larger than the map is clipped to it. Exact, border included (see the module docstring); cached.
    """
    p = check_rate(p)
    bh, bw = _block_pair(block_size)
    if height < 1 or width < 1:
        raise ValueError(f"height and width must be >= 1, got {height}x{width}")
    lam = _seed_intensity(height, width, min(bh, height), min(bw, width), p)
    return 1.0 if math.isinf(lam) else -math.expm1(-lam)


def _block_mask(
    shape: tuple[int, int, int, int], block: tuple[int, int], lam: float, dtype: torch.dtype, device: torch.device
) -> Tensor:
    """A {0, 1} mask of ``shape`` = (N, C, H, W) with blocks seeded at rate ``1 - exp(-lam)``."""
    n, c, h, w = shape
    bh, bw = block
    rows, cols = h - bh + 1, w - bw + 1
    positions = n * c * rows * cols
    mask = torch.ones(shape, dtype=dtype, device=device)
    # The seed count is drawn on the CPU generator, so no device synchronisation is needed.
    count = int(torch.poisson(torch.tensor(lam * positions, dtype=torch.float64)).item())
    if count == 0:
        return mask
    offsets = (torch.arange(bh, device=device)[:, None] * w + torch.arange(bw, device=device)).reshape(-1)
    flat = mask.view(-1)
    chunk = max(1, _MAX_INDICES // (bh * bw))
    for start in range(0, count, chunk):
        seeds = torch.randint(0, positions, (min(chunk, count - start),), device=device)
        col = seeds % cols
        rest = seeds // cols
        row = rest % rows
        fmap = rest // rows
        corner = fmap * (h * w) + row * w + col
        flat.index_fill_(0, (corner[:, None] + offsets).reshape(-1), 0)
    return mask


@torch.library.custom_op("regfw::block_mask", mutates_args=(), tags=(torch.Tag.nondeterministic_seeded,))
def _block_mask_op(shape: list[int], block: list[int], p: float, dtype: torch.dtype,
                   device: torch.device) -> Tensor:
    """:func:`_block_mask` at the exact rate ``p`` as one opaque operator of a compiled graph (the seed
    intensity is solved here, in Python, at run time). Tagged as a seeded random op: a compiler must
    neither fold, merge nor recompute it (the backward pass sees the forward's mask)."""
    n, c, h, w = shape
    lam = _seed_intensity(h, w, block[0], block[1], p)
    return _block_mask((n, c, h, w), (block[0], block[1]), lam, dtype, device)


@_block_mask_op.register_fake
def _(shape: list[int], block: list[int], p: float, dtype: torch.dtype, device: torch.device) -> Tensor:
    return torch.empty(shape, dtype=dtype, device=device)


def drop_block_2d(
    x: Tensor,
    p: float = 0.1,
    block_size: int | tuple[int, int] = 7,
    training: bool = True,
    shared_channels: bool = False,
) -> Tensor:
    """DropBlock (Ghiasi et al., NeurIPS 2018) on an ``(N, C, H, W)`` input, at an exact expected rate.

    Args:
        x: input of shape ``(N, C, H, W)``.
        p: expected fraction of activations dropped, exact for every map and block size.
        block_size: side of the square block, or ``(height, width)``; even sizes are fine, and a block
            larger than the map is clipped to the map (the rate stays ``p``; with a block as large as
            the map, whole maps are dropped with probability ``p``).
        training: eval mode (``False``) returns ``x`` itself.
        shared_channels: one mask per sample shared by all channels instead of one per channel.

    Returns:
        ``x * mask * numel / kept`` with the rescale computed per sample, in one multiply.
    """
    p = check_rate(p)
    block = _block_pair(block_size)
    if x.dim() != 4:
        raise ValueError(f"drop_block_2d expects an input of shape (N, C, H, W), got shape {tuple(x.shape)}")
    if not training or p == 0.0 or x.numel() == 0:
        return x
    if p == 1.0:
        return zeros_like_graph(x)
    n, c, h, w = x.shape
    bh, bw = min(block[0], h), min(block[1], w)
    mask_c = 1 if shared_channels else c
    if torch.compiler.is_compiling():
        mask = _block_mask_op([n, mask_c, h, w], [bh, bw], _concrete(p), x.dtype, x.device)
    else:
        lam = _seed_intensity(h, w, bh, bw, p)
        mask = _block_mask((n, mask_c, h, w), (bh, bw), lam, x.dtype, x.device)
    kept = mask.sum(dim=(1, 2, 3), dtype=torch.float32)
    scale = (mask_c * h * w) / kept.clamp_min(1.0)  # kept == 0 means the mask is all zeros anyway
    mask.mul_(scale.to(x.dtype).view(n, 1, 1, 1))
    return x * mask


class DropBlock2d(StochasticModule):
    """DropBlock at an exact expected rate; see :func:`drop_block_2d`.

    Args:
        p: expected fraction dropped (0.1 is the paper's ImageNet setting, reached by a schedule).
        block_size: block side or ``(height, width)``; 7 in the paper for ResNet-50's last groups.
        shared_channels: one mask per sample for all channels (default: one per channel).
    """

    p = Rate()

    def __init__(
        self, p: float = 0.1, block_size: int | tuple[int, int] = 7, shared_channels: bool = False
    ) -> None:
        super().__init__()
        self.p = p
        _block_pair(block_size)
        self.block_size = block_size
        self.shared_channels = bool(shared_channels)

    def forward(self, x: Tensor) -> Tensor:
        return drop_block_2d(x, self.p, self.block_size, self.training, self.shared_channels)

    def extra_repr(self) -> str:
        return f"p={self.p}, block_size={self.block_size}, shared_channels={self.shared_channels}"
