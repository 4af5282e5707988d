"""The public base classes every regularizer plugin builds on.

A regularizer is a class with a ``name``, a ``Config`` dataclass (its config section is
validated against it) and a few optional methods that the host calls at well-defined times.
Every attribute and method is documented, with signatures, call order and logging, in
``docs/plugins.md`` (a test fails when one is not).

Once per model, before training:

``plan(model, ctx)``
    what this regularizer will do, as :class:`PlanItem` rows. ``regfw plan`` prints these rows
    and :meth:`apply` carries out exactly these rows.
``apply(model, items)``
    change the model (insert modules, wrap weights) as planned.
``param_groups(model)``, ``callbacks()``, ``check(config)``, ``describe(model)``, ``claims()``
    optimizer parameter groups, Lightning callbacks, a check against the whole config, extra
    ``regfw plan`` lines, the layer kinds claimed within the ``family``.

Every training step (called by :func:`regfw.steps.regularized_step`, never through pluggy):

``transform_batch(inputs, targets, step)``
    before the forward pass: a new ``(inputs, targets)`` (mixup, cutmix).
``transform_loss(loss_fn, step)``
    a new loss function ``loss(outputs, targets)`` (label smoothing).
``loss_term(step)``
    after the data loss: a scalar added to the loss, logged as ``train_penalty/<name>``
    (penalties, R-Drop, confidence penalty). Its default returns ``penalty(model)``.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, Literal

import torch
from torch import nn

from regfw import kinds as K
from regfw.plan_items import PlanContext, PlanItem
from regfw.schedules import RateSchedule

if TYPE_CHECKING:  # pragma: no cover - typing only
    from regfw.steps import LossFn, Step


@dataclass
class NoConfig:
    """The config of a regularizer without settings."""


@dataclass
class InjectionConfig:
    """Settings every :class:`InjectingRegularizer` shares; subclass it and add one rate per kind.

    ``policy``: ``auto`` takes the rules of thumb from dataset size and parameter count,
    ``default`` the rate table's default (see :mod:`regfw.kinds`); an explicit rate always wins.
    ``existing``: where the model already has dropout at a place, ``override`` sets its rate,
    ``keep`` leaves it alone; a second layer is never added.
    ``schedule``: how the planned rates move during training (:mod:`regfw.schedules`).
    """

    policy: Literal["auto", "default"] = "auto"
    existing: Literal["override", "keep"] = "override"
    schedule: RateSchedule = field(default_factory=RateSchedule)


class Regularizer:
    """Base class of every regularizer. Subclasses set ``name`` and ``Config``."""

    #: The name users select in ``regularizers:`` of the config.
    name: str = ""
    #: A dataclass describing the config section; every field needs a default.
    Config: ClassVar[type] = NoConfig
    #: One line shown by ``regfw plugins``.
    description: ClassVar[str] = ""
    #: Regularizers of one family (e.g. ``"dropout"``) may not claim the same layer kind.
    family: ClassVar[str] = ""
    #: Where the per-step methods run among the selected regularizers: ascending, ties in the
    #: config's order. R-Drop uses 100 so that it repeats the batch after mixup has mixed it.
    step_order: ClassVar[int] = 0
    #: The regularizer's own rate range for a kind where its "rate" means something else than the
    #: table's (kind -> ``(low, high)``, ``(low, high, default)`` or a :class:`regfw.kinds.RateRange`);
    #: :func:`regfw.kinds.choose_rate` uses it instead of that kind's row of the rate table.
    rate_ranges: ClassVar[K.OwnRanges] = {}

    def __init__(self, config: Any = None) -> None:
        self.config = config if config is not None else self.Config()

    # Everything below is optional; the defaults do nothing.
    def plan(self, model: nn.Module, ctx: PlanContext) -> list[PlanItem]:
        return []

    def apply(self, model: nn.Module, items: list[PlanItem]) -> None:
        return None

    def param_groups(self, model: nn.Module) -> list[dict] | None:
        return None

    def penalty(self, model: nn.Module) -> torch.Tensor | None:
        """A loss term that needs only the model (a weight penalty); see :meth:`loss_term`."""
        return None

    # -- per training step (see regfw.steps for the order) ----------------------------------------
    def transform_batch(self, inputs: Any, targets: Any, step: Step) -> tuple[Any, Any]:
        """Before the forward pass: the ``(inputs, targets)`` to train on instead (default: unchanged).

        Targets may become :class:`regfw.steps.MixedTargets` (a pair and a weight), whose loss
        is the weighted pair of losses.
        """
        return inputs, targets

    def transform_loss(self, loss_fn: LossFn, step: Step) -> LossFn:
        """The loss function ``loss(outputs, targets) -> tensor`` to use instead (default: unchanged)."""
        return loss_fn

    def loss_term(self, step: Step) -> torch.Tensor | None:
        """After the data loss: a scalar tensor added to it, or None. Default: ``penalty(step.model)``.

        ``step`` holds the model, the (transformed) inputs and targets, the outputs, the data loss
        and the loss function. The term is logged as ``train_penalty/<name>``.
        """
        return self.penalty(step.model)

    def callbacks(self) -> list:
        return []

    def check(self, config: Any) -> None:
        return None

    def describe(self, model: nn.Module) -> list[str]:
        return []

    def claims(self) -> tuple[str, ...]:
        """The layer kinds this regularizer acts on with its config: two regularizers of one
        ``family`` claiming the same kind are a config error (checked by :func:`regfw.plan.make_plan`)."""
        return ()

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.config!r})"


class InjectingRegularizer(Regularizer):
    """A regularizer that inserts one module per layer of chosen kinds.

    Subclasses implement :meth:`rate_for` (or rely on its default reading ``config.<kind>``
    and falling back to the rate policy of :mod:`regfw.kinds`) and :meth:`make_module`.
    Placement follows :func:`regfw.surgery.plan_insertions`: the input kind gets its module on
    the first layer's input; other kinds after the activation that follows the layer (never
    between a layer and its BatchNorm); the model's output layer gets nothing.
    """

    #: The kinds this regularizer acts on, e.g. ``("input", "hidden")``.
    kinds: ClassVar[tuple[str, ...]] = ()
    #: The variant name shown in plans (defaults to ``name``).
    variant: ClassVar[str] = ""

    def variant_for(self, kind: str) -> str:
        return self.variant or self.name

    def claims(self) -> tuple[str, ...]:
        """``kinds`` less those switched off by an explicit rate of 0 in the config."""
        return tuple(k for k in self.kinds if getattr(self.config, k, None) != 0)

    def supports(self, kind: str, module: nn.Module, out_dim: int | None) -> str | None:
        """None when the variant fits after ``module`` (whose output has rank ``out_dim``, if
        known); otherwise why not, shown as a note in the plan (e.g. DropBlock needs 4-d maps)."""
        return None

    def rate_for(self, kind: str, ctx: PlanContext) -> tuple[float | None, str]:
        """The rate for ``kind`` and why: explicit in the config, policy, or the table default.

        Returns ``(None, reason)`` to leave the kind out.
        """
        explicit = getattr(self.config, kind, None)
        if explicit is None and kind not in K.RATE_TABLE and kind not in self.rate_ranges:
            return None, "no default rate"
        return K.choose_rate(kind, explicit, getattr(self.config, "policy", "auto"), ctx.n_examples,
                             ctx.n_params, self.rate_ranges)

    def make_module(self, kind: str, rate: float, item: PlanItem) -> nn.Module:
        raise NotImplementedError

    def callbacks(self) -> list:
        """A :class:`~regfw.schedule_callback.RateScheduler` when the config has a ``schedule``."""
        schedule = getattr(self.config, "schedule", None)
        if not (isinstance(schedule, RateSchedule) and schedule.active):
            return []
        from regfw.schedule_callback import RateScheduler

        return [RateScheduler(self, schedule)]

    def describe(self, model: nn.Module) -> list[str]:
        schedule = getattr(self.config, "schedule", None)
        return [schedule.describe()] if isinstance(schedule, RateSchedule) and schedule.active else []

    def plan(self, model: nn.Module, ctx: PlanContext) -> list[PlanItem]:
        from regfw.surgery import plan_insertions  # torch.fx and the dataflow only when planning

        return plan_insertions(self, model, ctx)

    def apply(self, model: nn.Module, items: list[PlanItem]) -> None:
        from regfw.surgery import apply_insertions

        apply_insertions(self, model, items)
