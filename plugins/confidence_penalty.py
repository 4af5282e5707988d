"""The ``confidence_penalty`` regularizer: reward high-entropy predictions, ``loss -= beta * H(p(y|x))``.

Pereyra et al., "Regularizing Neural Networks by Penalizing Confident Output Distributions",
ICLR 2017 workshop: subtracting the entropy of the predicted distribution from the loss keeps a
network from putting all its mass on one class; it is label smoothing with the KL divergence
taken the other way round. The term is ``-strength * mean over the batch of H(softmax(out))``,
so ``train_penalty/confidence_penalty`` is negative.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from regfw.extend import Regularizer, Step, hookimpl, nonneg, require_classification


@dataclass
class ConfidencePenaltyConfig:
    """``regularizers.confidence_penalty``."""

    strength: float = nonneg(0.1, doc="beta, the weight of the entropy term (paper: 0.1 to 4 by task)")


def entropy(logits: torch.Tensor) -> torch.Tensor:
    """The entropy (nats) of ``softmax(logits)`` along the last dimension."""
    log_p = F.log_softmax(logits, dim=-1)
    return -(log_p.exp() * log_p).sum(dim=-1)


class ConfidencePenalty(Regularizer):
    """Adds ``-strength * H(softmax(outputs))`` to every training loss."""

    name = "confidence_penalty"
    description = "loss -= strength * entropy of the predicted distribution (Pereyra et al. 2017)"
    Config = ConfidencePenaltyConfig

    def check(self, config: Any) -> None:
        require_classification(self.name, config=config)

    def loss_term(self, step: Step) -> torch.Tensor | None:
        require_classification(self.name, step=step)
        if not self.config.strength:
            return None
        return -self.config.strength * entropy(step.outputs).mean()

    def describe(self, model: nn.Module) -> list[str]:
        return [f"training loss -= {self.config.strength:g} * entropy of softmax(outputs), per example, averaged"]


@hookimpl
def regfw_register_regularizers(register):
    register(ConfidencePenalty)
