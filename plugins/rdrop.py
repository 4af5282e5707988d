"""The ``rdrop`` regularizer: two dropout passes per example, pulled together by a symmetric KL term.

Liang et al., "R-Drop: Regularized Dropout for Neural Networks", NeurIPS 2021. Each example goes
through the model twice, with independent dropout masks, giving predictions ``P1`` and ``P2``;
the loss is ``NLL(P1) + NLL(P2) + alpha * (KL(P1 || P2) + KL(P2 || P1)) / 2``.

With ``batched: true`` (the default) the second pass rides in the first forward call: the batch
is concatenated with itself (after mixup, if selected, so that both copies see the same mixed
examples), the data loss is the mean over both copies, ``(NLL1 + NLL2) / 2``, and the term is
``alpha * (KL12 + KL21) / 4``: the paper's loss halved. ``batched: false`` runs a second forward
call instead, for models whose batch dimension is not the first or whose layers mix the examples
of a batch (BatchNorm then sees each example twice); its term also adds ``(NLL2 - NLL1) / 2`` so
the total is the same. R-Drop needs dropout in the model: select a dropout regularizer too.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from regfw.extend import (
    ConfigError,
    MixedTargets,
    Regularizer,
    Step,
    batch_size,
    compute_loss,
    concat_batches,
    hookimpl,
    index_batch,
    nonneg,
    require_classification,
)


@dataclass
class RDropConfig:
    """``regularizers.rdrop``."""

    alpha: float = nonneg(1.0, doc="weight of the symmetric KL term (paper: 0.3 to 5 by task)")
    batched: bool = True


def symmetric_kl(first: torch.Tensor, second: torch.Tensor) -> torch.Tensor:
    """``(KL(P1 || P2) + KL(P2 || P1)) / 2`` of the softmax of two logit tensors, averaged over examples."""
    lp, lq = F.log_softmax(first, dim=-1), F.log_softmax(second, dim=-1)
    kl_pq = F.kl_div(lq, lp, log_target=True, reduction="batchmean")
    kl_qp = F.kl_div(lp, lq, log_target=True, reduction="batchmean")
    return 0.5 * (kl_pq + kl_qp)


def _twice(value: Any) -> Any:
    if isinstance(value, MixedTargets):
        return MixedTargets(_twice(value.first), _twice(value.second), value.lam)
    return concat_batches(value, value)


class RDrop(Regularizer):
    """Two dropout passes per training example and the symmetric KL between their predictions."""

    name = "rdrop"
    description = "two dropout passes per example and alpha * symmetric KL between them (Liang et al. 2021)"
    Config = RDropConfig
    #: after every other batch transform: both copies must be the same examples
    step_order = 100

    def check(self, config: Any) -> None:
        require_classification(self.name, config=config)

    def transform_batch(self, inputs: Any, targets: Any, step: Step) -> tuple[Any, Any]:
        if not self.config.batched:
            return inputs, targets
        try:
            doubled = _twice(inputs), (None if targets is None else _twice(targets))
        except TypeError as exc:
            raise ConfigError(f"regularizers.rdrop.batched: cannot concatenate these inputs ({exc}); "
                              f"set batched: false to run the second pass separately.") from None
        step.state[self.name] = batch_size(inputs)
        return doubled

    def loss_term(self, step: Step) -> torch.Tensor | None:
        require_classification(self.name, step=step)
        n = step.state.get(self.name)
        if n is not None:
            rows = batch_size(step.outputs)
            if rows != 2 * n:
                raise ConfigError(f"regularizers.rdrop.batched: the model returned {rows} rows for {2 * n} "
                                  f"(twice {n}) concatenated examples; set batched: false for this model.")
            first, second = index_batch(step.outputs, slice(0, n)), index_batch(step.outputs, slice(n, None))
            return self.config.alpha / 2 * symmetric_kl(first, second)
        second = step.run_forward(step.inputs)
        assert step.loss_fn is not None and step.data_loss is not None
        other = compute_loss(step.loss_fn, second, step.targets)
        return 0.5 * (other - step.data_loss) + self.config.alpha / 2 * symmetric_kl(step.outputs, second)

    def describe(self, model: nn.Module) -> list[str]:
        how = "in one forward call (the batch concatenated with itself)" if self.config.batched else \
            "in a second forward call"
        return [f"two passes per example {how}; loss += {self.config.alpha:g} / 2 * symmetric KL(P1, P2)"]


@hookimpl
def regfw_register_regularizers(register):
    register(RDrop)
