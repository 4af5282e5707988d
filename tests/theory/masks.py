"""Exact enumeration of dropout masks, vectorised: every one of the 2^n keep/drop patterns at once."""
from __future__ import annotations

import torch


def all_masks(n: int, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """``[2^n, n]``: row ``k`` is the binary expansion of ``k`` (1 = unit kept)."""
    if not 0 < n <= 20:
        raise ValueError(f"enumerating 2^{n} masks is not sensible; use n in 1..20")
    k = torch.arange(2 ** n)
    return ((k[:, None] >> torch.arange(n)) & 1).to(dtype)


def mask_probs(masks: torch.Tensor, p: float) -> torch.Tensor:
    """``[2^n]``: the probability of each mask when every unit is dropped independently with rate ``p``."""
    kept = masks.sum(-1)
    n = masks.shape[-1]
    return (1 - p) ** kept * p ** (n - kept)
