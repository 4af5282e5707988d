"""One regularized training step: the per-step methods of the selected regularizers, in order.

:class:`~regfw.train.module.RegularizedModule` runs :func:`regularized_step` in ``training_step``; a
Lightning callback or a user's own ``training_step`` can run the same pieces on any model:

* :func:`transform_batch` before the forward pass (mixup, cutmix, R-Drop's repeated batch);
* :func:`transform_loss` around the loss function (label smoothing);
* :func:`compute_loss` the data loss, for plain or :class:`MixedTargets` targets;
* :func:`add_terms` the loss terms that see the model, the batch, the outputs and the data
  loss (penalties, R-Drop's KL term, confidence penalty), returning the total and the terms by
  regularizer name.

Order (see ``docs/plugins.md``): regularizers are sorted by their ``step_order`` (default 0),
ties kept in the order of the config's ``regularizers:`` section. Batch transforms run in that
order, each on the previous one's result; loss transforms wrap in that order, so the first is
innermost; terms are added in that order. No pluggy hook is called per batch.
"""
from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from torch import nn

from regfw.errors import ConfigError
from regfw.extend.contract import check_loss_fn, check_term, check_transformed_batch
from regfw.model_io import call_model
from regfw.train.batch import batch_size
from regfw.train.losses import REGRESSION_LOSSES

LossFn = Callable[[Any, Any], torch.Tensor]


class Regularizer(Protocol):
    """What a training step asks of a regularizer (:class:`regfw.extend.regularizer.Regularizer` has
    all of it), named here so that the step never imports the base classes."""

    name: str

    def transform_batch(self, inputs: Any, targets: Any, step: Step) -> tuple[Any, Any]: ...

    def transform_loss(self, loss_fn: LossFn, step: Step) -> LossFn: ...

    def loss_term(self, step: Step) -> torch.Tensor | None: ...


@dataclass
class MixedTargets:
    """Targets of a batch whose examples were mixed: ``lam`` of ``first`` and ``1 - lam`` of ``second``.

    The loss of mixed targets is ``lam * loss(out, first) + (1 - lam) * loss(out, second)``
    (:func:`compute_loss`), which for cross-entropy equals the cross-entropy against the mixed
    one-hot targets (Zhang et al., "mixup: Beyond Empirical Risk Minimization", ICLR 2018) and
    for squared error differs from the error against mixed targets by a constant only.
    """

    first: Any
    second: Any
    lam: float

    def __len__(self) -> int:
        return len(self.first)


@dataclass
class Step:
    """What the per-step methods of a regularizer see; one object for the whole training step.

    Filled as the step goes: ``inputs``/``targets`` (after the batch transforms that ran so
    far), then ``outputs`` and ``data_loss`` after the forward pass and the loss. ``forward``
    runs the model (R-Drop's second pass when it cannot be batched with the first); ``state``
    is scratch space for the step, keyed by regularizer name (e.g. what a batch transform
    tells the same regularizer's loss term).
    """

    model: nn.Module
    inputs: Any
    targets: Any
    outputs: Any = None
    data_loss: torch.Tensor | None = None
    loss_fn: LossFn | None = None
    forward: Callable[[Any], Any] | None = None
    batch_idx: int = 0
    #: ``"classification"``, ``"regression"``, or None when the host does not know.
    task: str | None = None
    #: The LightningModule that trains ``model``, when there is one.
    module: Any = None
    #: The number of examples of the batch as it came from the data loader.
    batch_size: int = 0
    state: dict = field(default_factory=dict)

    def run_forward(self, inputs: Any) -> Any:
        """``forward(inputs)``, or the model called on ``inputs`` when no ``forward`` was given (a dict
        as keyword arguments, a tuple as positional ones: :func:`regfw.model_io.call_model`)."""
        if self.forward is not None:
            return self.forward(inputs)
        return call_model(self.model, inputs)


@dataclass
class StepResult:
    """The outcome of :func:`regularized_step`: the loss to backpropagate and its parts."""

    total: torch.Tensor
    data_loss: torch.Tensor
    #: One loss term per regularizer that added one, by regularizer name, in the order added.
    terms: dict[str, torch.Tensor]
    outputs: Any
    inputs: Any
    targets: Any


def ordered(regularizers: Iterable[Regularizer]) -> list[Regularizer]:
    """``regularizers`` sorted by ``step_order``; ties keep their given (config) order."""
    return sorted(regularizers, key=lambda r: getattr(r, "step_order", 0))


def transform_batch(regularizers: Sequence[Regularizer], step: Step) -> Step:
    """Run every ``transform_batch`` in order; ``step.inputs``/``step.targets`` become the result."""
    for reg in ordered(regularizers):
        result = reg.transform_batch(step.inputs, step.targets, step)
        step.inputs, step.targets = check_transformed_batch(reg, result)
    return step


def transform_loss(regularizers: Sequence[Regularizer], loss_fn: LossFn, step: Step) -> LossFn:
    """``loss_fn`` wrapped by every ``transform_loss`` in order (the first is innermost)."""
    for reg in ordered(regularizers):
        loss_fn = check_loss_fn(reg, reg.transform_loss(loss_fn, step))
    return loss_fn


def compute_loss(loss_fn: LossFn, outputs: Any, targets: Any) -> torch.Tensor:
    """``loss_fn(outputs, targets)``; for :class:`MixedTargets` the ``lam``-weighted pair of losses."""
    if isinstance(targets, MixedTargets):
        return targets.lam * loss_fn(outputs, targets.first) + (1 - targets.lam) * loss_fn(outputs, targets.second)
    return loss_fn(outputs, targets)


def loss_terms(regularizers: Sequence[Regularizer], step: Step) -> dict[str, torch.Tensor]:
    """``{name: term}`` of every regularizer whose ``loss_term(step)`` is not None, in order."""
    terms: dict[str, torch.Tensor] = {}
    for reg in ordered(regularizers):
        # the default loss_term returns penalty(model): name the method the plugin wrote
        method = "penalty" if type(reg).loss_term.__qualname__ == "Regularizer.loss_term" else "loss_term"
        term = check_term(reg, reg.loss_term(step), method)
        if term is not None:
            terms[reg.name] = term.reshape(())
    return terms


def add_terms(regularizers: Sequence[Regularizer], model: nn.Module, inputs: Any, targets: Any, outputs: Any,
              loss: torch.Tensor, *, loss_fn: LossFn | None = None, step: Step | None = None,
              **context: Any) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """``(loss + every term, {name: term})``: the loss terms of ``regularizers`` for one step.

    The function a callback on a user's own LightningModule calls after its loss: ``inputs``,
    ``targets`` and ``outputs`` are that step's, ``loss`` its data loss. ``context`` fills the
    other :class:`Step` fields (``batch_idx``, ``task``, ``module``, ``forward``).
    """
    if step is None:
        step = Step(model=model, inputs=inputs, targets=targets, **context)
    step.outputs, step.data_loss, step.loss_fn = outputs, loss, loss_fn
    if not step.batch_size:
        step.batch_size = _size(targets if targets is not None else outputs)
    terms = loss_terms(regularizers, step)
    total = loss + torch.stack(list(terms.values())).sum() if terms else loss
    return total, terms


def _size(value: Any) -> int:
    try:
        return len(value) if isinstance(value, MixedTargets) else batch_size(value)
    except TypeError:
        return 0


def regularized_step(regularizers: Sequence[Regularizer], model: nn.Module, inputs: Any, targets: Any,
                     loss_fn: LossFn, *, forward: Callable[[Any], Any] | None = None, batch_idx: int = 0,
                     task: str | None = None, module: Any = None) -> StepResult:
    """The whole regularized training step on one batch; returns the loss to backpropagate.

    1. the batch transforms, in order (:func:`transform_batch`);
    2. the forward pass, ``forward(inputs)`` (default: the model called on the inputs, see
       :meth:`Step.run_forward`);
    3. the data loss with the transformed loss function (:func:`transform_loss`, :func:`compute_loss`);
    4. the loss terms, in order (:func:`add_terms`); ``total = data_loss + sum(terms)``.
    """
    step = Step(model=model, inputs=inputs, targets=targets, forward=forward, batch_idx=batch_idx, task=task,
                module=module, batch_size=_size(inputs))
    transform_batch(regularizers, step)
    outputs = step.run_forward(step.inputs)
    fn = transform_loss(regularizers, loss_fn, step)
    data_loss = compute_loss(fn, outputs, step.targets)
    total, terms = add_terms(regularizers, model, step.inputs, step.targets, outputs, data_loss, loss_fn=fn,
                             step=step)
    return StepResult(total, data_loss, terms, outputs, step.inputs, step.targets)



def require_classification(name: str, *, step: Step | None = None, config: Any = None) -> None:
    """A :class:`~regfw.errors.ConfigError` unless the task is classification (logits out, class targets).

    For regularizers that act on class probabilities (label smoothing, confidence penalty,
    R-Drop): called from ``check(config)`` with the resolved config (``model.loss``), and from a
    step method with the :class:`Step` (``step.task``); an unknown task passes.
    """
    loss = getattr(getattr(config, "model", None), "loss", None)
    if loss in REGRESSION_LOSSES or (step is not None and step.task == "regression"):
        what = f"model.loss is {loss!r}" if loss in REGRESSION_LOSSES else "the model is trained for regression"
        raise ConfigError(f"regularizers.{name}: acts on class probabilities, but {what}; use it with "
                          f"model.loss: cross_entropy (classification) or remove regularizers.{name}.")
