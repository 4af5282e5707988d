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
    change the model as planned: every row goes through :meth:`apply_row`, the one applier,
    which carries it out by its ``action`` with the regularizer's :meth:`make_module`
    (``before``/``after``), :meth:`set_existing` (``set``) or :meth:`wrap` (``wrap``).
    :func:`regfw.placement.plan.apply_plan` refuses a regularizer whose ``apply`` left a planned row
    undone, and :func:`regfw.placement.plan.make_plan` one that plans a row it has no method for, so the
    rows ``regfw plan`` prints are exactly what training applies.
``param_groups(model)``, ``callbacks()``, ``check(config)``, ``describe(model)``, ``claims()``
    optimizer parameter groups, Lightning callbacks, a check against the whole config, extra
    ``regfw plan`` lines, the layer kinds claimed within the ``family``.

Every training step (called by :func:`regfw.train.steps.regularized_step`, never through pluggy):

``transform_batch(inputs, targets, step)``
    before the forward pass: a new ``(inputs, targets)`` (mixup, cutmix).
``transform_loss(loss_fn, step)``
    a new loss function ``loss(outputs, targets)`` (label smoothing).
``loss_term(step)``
    after the data loss: a scalar added to the loss, logged as ``train_penalty/<name>``
    (penalties, R-Drop, confidence penalty). Its default returns ``penalty(model)``.
"""
from __future__ import annotations

import dataclasses
import sys
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, Literal

import torch
from torch import nn

from regfw.config.validation import rate
from regfw.errors import PluginError
from regfw.placement import kinds as K
from regfw.placement.api import plan_residual_rows
from regfw.placement.plan_items import ACTIONS, PlanContext, PlanItem, mark_applied
from regfw.placement.surgery import LayerInfo, attach, injected_name, plan_insertions, set_rate
from regfw.train.schedules import RateSchedule

if TYPE_CHECKING:  # pragma: no cover - typing only
    from regfw.train.steps import LossFn, Step


@dataclass
class NoConfig:
    """The config of a regularizer without settings."""


@dataclass
class InjectionConfig:
    """Settings every :class:`InjectingRegularizer` shares; subclass it and add one rate per kind.

    ``policy``: ``auto`` takes the rules of thumb from dataset size and parameter count,
    ``default`` the rate table's default (see :mod:`regfw.placement.kinds`); an explicit rate always wins.
    ``existing``: where the model already has dropout at a place, ``override`` sets its rate,
    ``keep`` leaves it alone; a second layer is never added.
    ``schedule``: how the planned rates move during training (:mod:`regfw.train.schedules`).
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
    #: table's (kind -> ``(low, high)``, ``(low, high, default)`` or a :class:`regfw.placement.kinds.RateRange`);
    #: :func:`regfw.placement.kinds.choose_rate` uses it instead of that kind's row of the rate table.
    rate_ranges: ClassVar[K.OwnRanges] = {}
    #: The key of the ``regularizers:`` section this object was built from (``dropout``, or a
    #: qualified ``DIST:NAME``), set by :func:`regfw.registry.regularizers.build_regularizers`; empty for an
    #: object made directly.
    selected_as: str = ""

    def __init__(self, config: Any = None) -> None:
        self.config = config if config is not None else self.Config()

    # Everything below is optional; the defaults do nothing.
    def plan(self, model: nn.Module, ctx: PlanContext) -> list[PlanItem]:
        return []

    def apply(self, model: nn.Module, items: list[PlanItem]) -> None:
        """Carry out this regularizer's rows, each through :meth:`apply_row`. An override that does
        more (remember what was inserted) calls ``super().apply(model, items)``."""
        for item in items:
            self.apply_row(model, item)

    def apply_row(self, model: nn.Module, item: PlanItem) -> None:
        """Carry out one planned row by its ``action``: ``before``/``after`` insert
        :meth:`make_module`'s module on ``item.anchor``, ``set`` calls :meth:`set_existing`, ``wrap``
        calls :meth:`wrap`, ``note`` does nothing. The one applier of every regularizer: a class that
        overrides it is refused when it registers (override the methods it calls instead)."""
        if item.action == "note":
            return
        if item.action not in ACTIONS or item.anchor is None or (item.rate is None and item.action != "wrap"):
            raise PluginError(f"regularizer {self.name!r} ({type(self).__module__}.{type(self).__qualname__}): "
                              f"cannot carry out the plan row {item!r}: {row_problem(item)}")
        if item.action in ("before", "after"):
            assert item.rate is not None  # checked above
            attach(model, item.anchor, injected_name(self.name, item.action),
                   self.make_module(item.kind, item.rate, item), item.action)
        elif item.action == "set":
            self.set_existing(model, item)
        else:
            self.wrap(model, item)
        mark_applied(item)

    def make_module(self, kind: str, rate: float, item: PlanItem) -> nn.Module:
        """The module a ``before``/``after`` row inserts (called by :meth:`apply_row`)."""
        raise NotImplementedError(f"{type(self).__qualname__}.make_module")

    def set_existing(self, model: nn.Module, item: PlanItem) -> None:
        """Carry out a ``set`` row: give the module at ``item.anchor`` the rate ``item.rate``
        (default: its ``p``, or timm's ``drop_prob``; :func:`regfw.placement.api.set_rate`)."""
        assert item.anchor is not None and item.rate is not None  # apply_row checked both
        set_rate(model, item.anchor, item.rate)

    def wrap(self, model: nn.Module, item: PlanItem) -> None:
        """Carry out a ``wrap`` row: modify the layer at ``item.anchor`` itself (weight drop, weight
        noise, embedding dropout). No default: a regularizer that plans ``wrap`` rows defines it."""
        raise NotImplementedError(f"{type(self).__qualname__}.wrap")

    def param_groups(self, model: nn.Module) -> list[dict] | None:
        return None

    def penalty(self, model: nn.Module) -> torch.Tensor | None:
        """A loss term that needs only the model (a weight penalty); see :meth:`loss_term`."""
        return None

    # -- per training step (see regfw.train.steps for the order) ----------------------------------------
    def transform_batch(self, inputs: Any, targets: Any, step: Step) -> tuple[Any, Any]:
        """Before the forward pass: the ``(inputs, targets)`` to train on instead (default: unchanged).

        Targets may become :class:`regfw.train.steps.MixedTargets` (a pair and a weight), whose loss
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
        ``family`` claiming the same kind are a config error (checked by :func:`regfw.placement.plan.make_plan`)."""
        return ()

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.config!r})"


#: Where each kind's module goes, as the generated rate fields describe it.
KIND_PLACES = {
    K.INPUT: "on the model input",
    K.HIDDEN: "after hidden Linear layers",
    K.CONV: "after conv layers",
    K.RECURRENT: "on recurrent layer outputs",
    K.ATTENTION: "on the attention weights",
    K.RESIDUAL: "on residual branches (at the deepest block)",
    K.EMBEDDING: "on embedding rows",
}


def add_rate_fields(cls: type[InjectingRegularizer]) -> None:
    """Give ``cls.Config`` one rate field per kind of ``cls.kinds`` that it does not declare itself.

    A kind's rate is declared once, in ``kinds``; the field (null: the rate table and policy; 0
    switches the kind off) and its documentation come from the kind and the range that applies
    (the regularizer's ``rate_ranges``, else the rate table). A ``Config`` declared for this class
    gets the fields in place; an inherited one (``InjectionConfig`` itself, or a parent
    regularizer's) is never changed: the class gets a subclass of it, ``<Class>Config``.
    """
    config = InjectionConfig if cls.Config is NoConfig else cls.Config
    if not (isinstance(config, type) and issubclass(config, InjectionConfig)):
        return
    declared = {f.name for f in dataclasses.fields(config)}
    missing = [kind for kind in cls.kinds if kind not in declared and kind in KIND_PLACES]
    if not missing:
        return
    own = "Config" in vars(cls) and config.__module__ == cls.__module__ and config is not InjectionConfig
    if not own:
        config = type(f"{cls.__name__}Config", (config,), {"__module__": cls.__module__,
                                                          "__qualname__": f"{cls.__qualname__}Config",
                                                          "__doc__": f"The config of ``{cls.name}``."})
    else:  # the methods dataclass() wrote for the declared fields are written again for all of them
        for method in ("__init__", "__repr__", "__eq__", "__match_args__"):
            if method in vars(config):
                delattr(config, method)
    for kind in missing:
        span = K.rate_range(kind, cls.rate_ranges)
        table = f"{span.low:g}" if span.low == span.high else f"{span.low:g}-{span.high:g}"
        config.__annotations__ = {**config.__dict__.get("__annotations__", {}), kind: "float | None"}
        setattr(config, kind, rate(doc=f"{KIND_PLACES[kind]} (range: {table}); null: the rate table and policy, "
                                       "0: off"))
    cls.Config = dataclass(config)
    if not own:  # picklable by name, like a class written in the module
        vars(sys.modules[cls.__module__]).setdefault(config.__name__, config)


class InjectingRegularizer(Regularizer):
    """A regularizer that inserts one module per layer of chosen kinds.

    Its config gets one rate field per kind of ``kinds`` (:func:`add_rate_fields`): declare the
    kinds once, and only the settings that are not rates in ``Config``.

    Subclasses implement :meth:`rate_for` (or rely on its default reading ``config.<kind>``
    and falling back to the rate policy of :mod:`regfw.placement.kinds`) and :meth:`make_module`.
    Placement follows :func:`regfw.placement.surgery.plan_insertions`: the input kind gets its module on
    the first layer's input; other kinds after the activation that follows the layer (never
    between a layer and its BatchNorm); the model's output layer gets nothing.
    """

    #: The kinds this regularizer acts on, e.g. ``("input", "hidden")``.
    kinds: ClassVar[tuple[str, ...]] = ()
    #: The variant name shown in plans (defaults to ``name``).
    variant: ClassVar[str] = ""

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        add_rate_fields(cls)

    def variant_for(self, kind: str) -> str:
        return self.variant or self.name

    def claims(self) -> tuple[str, ...]:
        """``kinds`` less those switched off by an explicit rate of 0 in the config."""
        return tuple(k for k in self.kinds if getattr(self.config, k, None) != 0)

    def supports(self, kind: str, module: nn.Module, out_dim: int | None) -> str | None:
        """None when the variant fits after ``module`` (whose output has rank ``out_dim``, if
        known); otherwise why not, shown as a note in the plan (e.g. DropBlock needs 4-d maps)."""
        return None

    def rate_for(self, kind: str, ctx: PlanContext, layer: LayerInfo | None = None) -> tuple[float | None, str]:
        """The rate for ``kind`` and why: explicit in the config, policy, or the table default.

        ``layer`` is the layer the module goes after (path, module, kind; None for the model input
        and residual branches): an override may choose a rate per layer. Returns ``(None, reason)``
        to leave the kind out, or the layer.
        """
        explicit = getattr(self.config, kind, None)
        if explicit is None and kind not in K.RATE_TABLE and kind not in self.rate_ranges:
            return None, "no default rate"
        family = K.transformer_ranges(ctx.model_map)  # a model with attention blocks: 0-0.1
        rate, why = K.choose_rate(kind, explicit, getattr(self.config, "policy", "auto"), ctx.n_examples,
                                  ctx.n_params, {**family, **self.rate_ranges})
        if kind in family and kind not in self.rate_ranges and explicit is None:
            why += f"; Transformer range: attention blocks ({ctx.model_map.attention_summary()})"
        return rate, why

    def callbacks(self) -> list:
        """A :class:`~regfw.train.schedule_callback.RateScheduler` when the config has a ``schedule``."""
        schedule = getattr(self.config, "schedule", None)
        if not (isinstance(schedule, RateSchedule) and schedule.active):
            return []
        from regfw.train.schedule_callback import RateScheduler

        return [RateScheduler(self, schedule)]

    def describe(self, model: nn.Module) -> list[str]:
        schedule = getattr(self.config, "schedule", None)
        return [schedule.describe()] if isinstance(schedule, RateSchedule) and schedule.active else []

    def plan(self, model: nn.Module, ctx: PlanContext) -> list[PlanItem]:
        """The rows of every kind of ``kinds``: after layers of those kinds, on the model input, and
        for ``residual``, on every residual branch (:func:`regfw.placement.api.plan_residual_rows`,
        one rate everywhere; override :meth:`residual_profile` for a depth profile)."""
        layered = any(kind != K.RESIDUAL for kind in self.kinds)
        rows = plan_insertions(self, model, ctx) if layered else []
        if K.RESIDUAL in self.claims():
            rows += plan_residual_rows(self, model, ctx, self.residual_profile)
        return rows

    def residual_profile(self, top: float, n_blocks: int) -> tuple[list[float], str]:
        """The rate of each of ``n_blocks`` residual blocks, in forward order, given the rate
        ``top`` that :meth:`rate_for` chose for kind ``residual``, and a note for the plan's reason
        (default: ``top`` everywhere, no note)."""
        return [top] * n_blocks, ""


#: Methods of :class:`Regularizer` no subclass may override, and why (checked when it registers).
FINAL_METHODS = {
    "apply_row": "it is the one applier that carries out every planned row (what `regfw plan` printed); override "
                 "make_module (before/after rows), set_existing (set rows) or wrap (wrap rows) instead",
}


def check_overrides(cls: type[Regularizer]) -> None:
    """Refuse a regularizer class that overrides a method of :data:`FINAL_METHODS`, naming the class
    and the method."""
    for method, why in FINAL_METHODS.items():
        if getattr(cls, method, None) is not getattr(Regularizer, method):
            owner = next(c for c in cls.__mro__ if method in vars(c))
            raise PluginError(f"regularizer {cls.__module__}.{cls.__qualname__} overrides {method}() (in "
                              f"{owner.__qualname__}), which it may not: {why}")


def row_problem(item: PlanItem) -> str:
    """What makes ``item`` impossible to carry out, whoever planned it ('' when nothing)."""
    if item.action not in ACTIONS:
        return f"its action {item.action!r} is not one of {', '.join(ACTIONS)}"
    if item.action == "note":
        return ""
    if not isinstance(item.anchor, str):
        return f"a {item.action!r} row needs an anchor (the module path it acts on), got {item.anchor!r}"
    if item.action != "wrap" and (isinstance(item.rate, bool) or not isinstance(item.rate, (int, float))):
        return f"a {item.action!r} row needs a rate, got {item.rate!r}"
    return ""


def missing_method(reg: Regularizer, item: PlanItem) -> str | None:
    """The method ``reg`` lacks to carry out ``item`` (``make_module`` for an insertion, ``wrap`` for
    a wrap row), or None."""
    method = {"before": "make_module", "after": "make_module", "wrap": "wrap"}.get(item.action)
    if method is not None and getattr(type(reg), method) is getattr(Regularizer, method):
        return method
    return None
