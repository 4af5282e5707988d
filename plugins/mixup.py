"""The ``mixup`` regularizer: train on convex combinations of pairs of examples (or, with ``cutmix``, on patches).

* mixup: Zhang et al., "mixup: Beyond Empirical Risk Minimization", ICLR 2018. With
  ``lam ~ Beta(alpha, alpha)`` and a random pairing ``j`` of the batch,
  ``x = lam * x_i + (1 - lam) * x_j`` and the loss is ``lam * loss(out, y_i) + (1 - lam) *
  loss(out, y_j)``: for cross-entropy, the cross-entropy against the mixed one-hot targets.
* cutmix: Yun et al., "CutMix: Regularization Strategy to Train Strong Classifiers with
  Localizable Features", ICCV 2019. A box of area ``1 - lam`` of each image (inputs ``(N, C, H, W)``)
  is replaced by the same box of its partner, and ``lam`` becomes the exact kept fraction.

One ``lam`` and one pairing per batch, as in both papers' code; a batch is mixed with
probability ``prob``. Only the training batches are mixed.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from regfw.extend import ConfigError, MixedTargets, Regularizer, Step, batch_size, hookimpl, index_batch, positive


@dataclass
class MixupConfig:
    """``regularizers.mixup``."""

    alpha: float = positive(0.2, doc="lam ~ Beta(alpha, alpha); mixup's ImageNet setting 0.2, CIFAR 1.0; CutMix 1.0")
    cutmix: bool = False
    prob: float = field(default=1.0, metadata={"doc": "the probability that a batch is mixed, in [0, 1]"})

    def __post_init__(self) -> None:
        if not 0.0 <= self.prob <= 1.0:  # rate() is [0, 1), and 1 (every batch) is the default here
            raise ConfigError(f"regularizers.mixup.prob: got {self.prob!r}, expected a probability in [0, 1].")


def mix(inputs: torch.Tensor, perm: torch.Tensor, lam: float) -> torch.Tensor:
    """``lam * inputs + (1 - lam) * inputs[perm]`` (mixup)."""
    return lam * inputs + (1 - lam) * inputs[perm]


def cut(inputs: torch.Tensor, perm: torch.Tensor, lam: float) -> tuple[torch.Tensor, float]:
    """CutMix: a box of about ``1 - lam`` of the area taken from ``inputs[perm]``; returns the kept fraction."""
    h, w = inputs.shape[-2:]
    ratio = math.sqrt(1.0 - lam)
    ch, cw = int(h * ratio), int(w * ratio)
    cy, cx = int(torch.randint(h, ()).item()), int(torch.randint(w, ()).item())
    y0, y1 = max(cy - ch // 2, 0), min(cy + ch // 2, h)
    x0, x1 = max(cx - cw // 2, 0), min(cx + cw // 2, w)
    out = inputs.clone()
    out[..., y0:y1, x0:x1] = inputs[perm][..., y0:y1, x0:x1]
    return out, 1.0 - (y1 - y0) * (x1 - x0) / (h * w)


class Mixup(Regularizer):
    """Mixes each training batch with a permutation of itself (mixup or CutMix)."""

    name = "mixup"
    description = "train on mixed pairs of examples and their targets (mixup, Zhang et al. 2018; cutmix option)"
    Config = MixupConfig

    def transform_batch(self, inputs: Any, targets: Any, step: Step) -> tuple[Any, Any]:
        cfg = self.config
        if cfg.prob < 1.0 and float(torch.rand(())) >= cfg.prob:
            return inputs, targets
        if not isinstance(inputs, torch.Tensor) or not inputs.is_floating_point():
            what = f"{inputs.dtype} tensors" if isinstance(inputs, torch.Tensor) else type(inputs).__name__
            raise ConfigError(f"regularizers.mixup: mixes real-valued input tensors, but the inputs are {what} "
                              f"(token ids cannot be mixed); remove regularizers.mixup for this model.")
        if cfg.cutmix and inputs.dim() != 4:
            raise ConfigError(f"regularizers.mixup.cutmix: cuts boxes out of images (N, C, H, W), but the inputs "
                              f"have shape {list(inputs.shape)}; set cutmix: false for plain mixup.")
        lam = float(torch.distributions.Beta(cfg.alpha, cfg.alpha, validate_args=False).sample())
        perm = torch.randperm(batch_size(inputs), device=inputs.device)
        if cfg.cutmix:
            mixed, lam = cut(inputs, perm, lam)
        else:
            mixed = mix(inputs, perm, lam)
        if targets is None:
            return mixed, None
        return mixed, MixedTargets(targets, index_batch(targets, perm), lam)

    def describe(self, model: nn.Module) -> list[str]:
        a, how = self.config.alpha, "cutmix boxes" if self.config.cutmix else "x = lam * x_i + (1 - lam) * x_j"
        every = "every batch" if self.config.prob == 1 else f"{self.config.prob:g} of the batches"
        return [f"{every}: {how}, lam ~ Beta({a:g}, {a:g}); loss = lam * loss(y_i) + (1 - lam) * loss(y_j)"]


@hookimpl
def regfw_register_regularizers(register):
    register(Mixup)
