"""Small helpers on nested containers of tensors."""
from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor


def iter_tensors(obj: Any) -> Iterator[Tensor]:
    """Every tensor inside nested tuples, lists and dicts (dict values), in order."""
    if isinstance(obj, Tensor):
        yield obj
    elif isinstance(obj, (list, tuple)):
        for item in obj:
            yield from iter_tensors(item)
    elif isinstance(obj, dict):
        for item in obj.values():
            yield from iter_tensors(item)


def to_device(obj: Any, device: torch.device | str) -> Any:
    """``obj`` with every tensor inside nested tuples (named ones too), lists and dicts moved to
    ``device``; other values (flags among keyword inputs) as they are."""
    if isinstance(obj, Tensor):
        return obj.to(device)
    if isinstance(obj, Mapping):
        return {k: to_device(v, device) for k, v in obj.items()}
    if isinstance(obj, tuple) and hasattr(type(obj), "_fields"):
        return type(obj)(*(to_device(v, device) for v in obj))
    if isinstance(obj, (list, tuple)):
        return type(obj)(to_device(v, device) for v in obj)
    return obj


#: How the second half of a Gaussian head becomes a variance: ``softplus(raw) + 1e-6`` (what
#: ``model.loss: gaussian_nll`` trains) or ``exp(raw)`` (a head predicting log-variances).
VARIANCE_LINKS = ("softplus", "exp")


def split_mean_variance(output: Tensor, link: str = "softplus") -> tuple[Tensor, Tensor]:
    """``(mean, variance)`` of a Gaussian head whose last dimension holds ``[mean, raw]`` halves.

    The one split shared by training (the ``gaussian_nll`` loss of :mod:`regfw.train.losses`) and Monte
    Carlo dropout (its ``output_transform``; :func:`regfw.uncertainty.split_mean_logvar` is the
    ``exp`` link), so the variance MC dropout reports is the one the loss trained. ``link``:
    ``softplus`` (Lakshminarayanan et al. 2017, "Simple and Scalable Predictive Uncertainty
    Estimation using Deep Ensembles": positive and well-behaved for large raw values; ``+ 1e-6``
    keeps the NLL finite) or ``exp`` (the raw half is a log-variance, Kendall & Gal 2017).
    """
    d = output.shape[-1]
    if d % 2:
        raise ValueError(f"split_mean_variance needs an even last dimension (means, then raw variances), got {d}")
    if link not in VARIANCE_LINKS:
        raise ValueError(f"split_mean_variance: link must be one of {', '.join(VARIANCE_LINKS)}, got {link!r}")
    mean, raw = output[..., : d // 2], output[..., d // 2 :]
    if link == "exp":
        return mean, raw.exp()
    return mean, F.softplus(raw) + 1e-6
