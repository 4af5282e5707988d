"""The ``label_smoothing`` regularizer: cross-entropy against targets mixed with the uniform distribution.

Szegedy et al., "Rethinking the Inception Architecture for Computer Vision", CVPR 2016,
section 7: the target of class ``y`` becomes ``(1 - epsilon) * onehot(y) + epsilon / K``, which
keeps the logits from growing without bound and the predictions from becoming over-confident
(Müller et al., "When Does Label Smoothing Help?", NeurIPS 2019).

Written as a loss transform: ``loss' = (1 - epsilon) * loss(out, y) + epsilon * mean_k(-log p_k)``,
exactly ``torch.nn.functional.cross_entropy(..., label_smoothing=epsilon)`` for a cross-entropy
loss, and it composes with mixup's mixed targets (the smoothing part does not depend on them).
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from regfw.extend import Regularizer, Step, hookimpl, rate, require_classification


@dataclass
class LabelSmoothingConfig:
    """``regularizers.label_smoothing``."""

    epsilon: float = rate(0.1, doc="the probability mass spread uniformly over the K classes (paper: 0.1)")


class LabelSmoothing(Regularizer):
    """Cross-entropy with label smoothing (training only; the validation loss stays the plain one)."""

    name = "label_smoothing"
    description = "cross-entropy against (1 - epsilon) * one-hot + epsilon / K targets (Szegedy et al. 2016)"
    Config = LabelSmoothingConfig

    def check(self, config: Any) -> None:
        require_classification(self.name, config=config)

    def transform_loss(self, loss_fn: Callable, step: Step) -> Callable:
        require_classification(self.name, step=step)
        eps = self.config.epsilon
        if not eps:
            return loss_fn

        def smoothed(outputs: torch.Tensor, targets: Any) -> torch.Tensor:
            uniform = -F.log_softmax(outputs, dim=-1).mean(dim=-1).mean()
            return (1 - eps) * loss_fn(outputs, targets) + eps * uniform

        return smoothed

    def describe(self, model: nn.Module) -> list[str]:
        eps = self.config.epsilon
        return [f"training loss = {1 - eps:g} * cross_entropy + {eps:g} * mean over classes of -log p "
                f"(targets {1 - eps:g} one-hot + {eps:g} / K)"]


@hookimpl
def regfw_register_regularizers(register):
    register(LabelSmoothing)
