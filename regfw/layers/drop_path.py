"""Stochastic depth (DropPath): drop a residual branch for whole samples.

Huang, Sun, Liu, Sedra and Weinberger, "Deep Networks with Stochastic Depth", ECCV 2016. Used on the
residual branch, ``x + drop_path(f(x))`` skips the block for the dropped samples.
"""
from __future__ import annotations

from torch import Tensor

from .base import Rate, StochasticModule, check_rate, zeros_like_graph
from .masks import keep_scale_mask

__all__ = ["drop_path", "drop_path_schedule", "DropPath"]


def drop_path(x: Tensor, p: float = 0.1, training: bool = True, scale_by_keep: bool = True) -> Tensor:
    """Zero the whole of each sample (dimension 0) with probability ``p``; one Bernoulli per sample.

    ``x`` may have any rank >= 1. Kept samples are scaled by ``1 / (1 - p)`` (inverted, as in timm)
    unless ``scale_by_keep=False``. Eval and ``p = 0`` return ``x`` itself; ``p = 1`` gives zeros.
    """
    p = check_rate(p)
    if x.dim() == 0:
        raise ValueError("drop_path expects an input with a batch dimension (rank >= 1), got a 0-d tensor")
    if not training or p == 0.0:
        return x
    if p == 1.0:
        return zeros_like_graph(x)
    mask = keep_scale_mask(x, (x.shape[0],) + (1,) * (x.dim() - 1), p, None if scale_by_keep else 1.0)
    return x * mask


def drop_path_schedule(p: float, num_blocks: int) -> list[float]:
    """The linear depth schedule of stochastic depth: 0 for the first block up to ``p`` for the last.

    Block ``i`` of ``num_blocks`` gets ``p * i / (num_blocks - 1)`` (``torch.linspace(0, p, n)``, as in
    timm's models). Huang et al. write ``p_l = l / L * p_L``; this variant leaves the first block, whose
    features everything else builds on, intact. A single block is the last block and gets ``p``.
    """
    p = check_rate(p)
    if isinstance(num_blocks, bool) or not isinstance(num_blocks, int) or num_blocks < 0:
        raise ValueError(f"num_blocks must be an int >= 0, got {num_blocks!r}")
    if num_blocks == 1:
        return [p]
    return [p * (i / (num_blocks - 1)) for i in range(num_blocks)]


class DropPath(StochasticModule):
    """Stochastic depth per sample; see :func:`drop_path`."""

    p = Rate()

    def __init__(self, p: float = 0.1, scale_by_keep: bool = True) -> None:
        super().__init__()
        self.p = p
        self.scale_by_keep = bool(scale_by_keep)

    def forward(self, x: Tensor) -> Tensor:
        return drop_path(x, self.p, self.training, self.scale_by_keep)

    def extra_repr(self) -> str:
        return f"p={self.p}, scale_by_keep={self.scale_by_keep}"
