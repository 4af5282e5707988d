"""The plan: what every selected regularizer does to a model, computed once.

``regfw plan`` prints a :class:`Plan` and :class:`~regfw.train.module.RegularizedModule` applies the
same object, so what is printed is what is done. Two checks hold every regularizer to that:
:func:`make_plan` refuses a row that cannot be carried out (an unknown action, no anchor or
rate, or a ``wrap`` / insertion row from a class without ``wrap`` / ``make_module``), and
:func:`apply_plan` refuses a regularizer whose ``apply`` left one of its rows undone (every row
is carried out by :meth:`regfw.Regularizer.apply_row`).
"""
from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from regfw.errors import ConfigError, PluginError
from regfw.extend.contract import check_claims, check_items, check_lines, who
from regfw.extend.regularizer import PlanContext, PlanItem, Regularizer, missing_method, row_problem
from regfw.placement.plan_items import tracking_applied
from regfw.placement.surgery import LayerInfo, ModelMap, analyse, is_batchnorm, is_dropout, is_injected
from regfw.placement.untouched import untouched


@dataclass(repr=False)
class Plan:
    """Per regularizer: its rows and any extra description lines; plus warnings.

    ``str(plan)`` and ``repr(plan)`` are :meth:`format`, the table ``regfw plan`` prints, so
    ``print(Regularize(...).plan_for(module))`` (or the plan as a notebook cell's value) shows
    exactly what would be done.
    """

    items: dict[str, list[PlanItem]]
    notes: dict[str, list[str]]
    layers: list[LayerInfo]
    context: PlanContext
    warnings: list[str] = field(default_factory=list)

    def __str__(self) -> str:
        return self.format()

    __repr__ = __str__

    def rows(self) -> list[PlanItem]:
        return [item for items in self.items.values() for item in items]

    def format(self) -> str:
        """A human-readable table: one row per insertion with its reason."""
        ctx = self.context
        changes = sum(1 for item in self.rows() if item.action != "note")
        lines = [
            f"plan: N={ctx.n_examples if ctx.n_examples is not None else '?'} training examples, "
            f"P={ctx.n_params} parameters, {changes} change(s)"
        ]
        header = ("regularizer", "path", "kind", "variant", "rate", "action", "why")
        table = [header]
        for item in self.rows():
            where = item.action if item.anchor in (None, item.path) else f"{item.action} {item.anchor}"
            rate = "-" if item.rate is None else f"{item.rate:g}"
            table.append((item.regularizer, item.path or "<model>", item.kind, item.variant, rate, where, item.reason))
        widths = [max(len(str(row[i])) for row in table) for i in range(len(header) - 1)]
        for row in table:
            cells = [str(c).ljust(w) for c, w in zip(row, widths, strict=False)] + [str(row[-1])]  # last: unpadded
            lines.append("  ".join(cells).rstrip())
        for name, notes in self.notes.items():
            for note in notes:
                lines.append(f"{name}: {note}")
        for warning in self.warnings:
            lines.append(f"warning: {warning}")
        return "\n".join(lines)


def make_plan(model: nn.Module, regularizers: Sequence[Regularizer], n_examples: int | None = None,
              example_input: Any = None) -> Plan:
    """Analyse ``model`` once and ask every regularizer for its rows (nothing is changed).

    Raises :class:`~regfw.errors.ConfigError` when two regularizers of one family claim the
    same layer kind. Warnings a regularizer raises while planning, and dropout placed directly
    before a BatchNorm, are collected in ``Plan.warnings`` (printed by ``regfw plan`` and
    emitted again by :func:`apply_plan`).
    """
    check_names(regularizers)
    check_families(regularizers)
    with untouched(model):  # every pass of planning (graph captures, probes) leaves the model as it was
        return _make_plan(model, regularizers, n_examples, example_input)


def _make_plan(model: nn.Module, regularizers: Sequence[Regularizer], n_examples: int | None,
               example_input: Any) -> Plan:
    n_params = sum(p.numel() for p in model.parameters())
    mm = analyse(model, example_input)
    ctx = PlanContext(n_examples=n_examples, n_params=n_params, example_input=example_input,
                      model_map=mm, claimed={k: r.name for r in reversed(regularizers)
                                             if getattr(r, "family", "") == "dropout" for k in r.claims()})
    items: dict[str, list[PlanItem]] = {}
    notes: dict[str, list[str]] = {}
    collected: list[str] = list(mm.notes)
    for reg in regularizers:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            rows = check_rows(reg, check_items(reg, reg.plan(model, ctx)))
        for w in caught:
            if issubclass(w.category, UserWarning):
                collected.append(str(w.message))
            else:  # not about the plan (e.g. a library deprecation): pass it on unchanged
                warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
        items[reg.name] = rows
        extra = check_lines(reg, reg.describe(model))
        if not extra and type(reg).plan is Regularizer.plan:  # places nothing by design: say what it does
            extra = what_it_does(reg)
        selected = getattr(reg, "selected_as", "")
        if selected and selected != reg.name:  # by its qualified name: say which one the rows are
            extra = [f"selected as {selected} ({type(reg).__module__}.{type(reg).__qualname__})", *extra]
        if extra:
            notes[reg.name] = list(extra)
    plan = Plan(items, notes, mm.layers, ctx)
    plan.warnings.extend(dict.fromkeys(collected))
    plan.warnings.extend(batchnorm_warnings(mm, plan.rows()))
    return plan


#: The per-step and optimizer methods a regularizer may override, and what each does, for
#: :func:`what_it_does`.
_ACTS = (
    ("transform_batch", "changes each training batch"),
    ("transform_loss", "changes the loss function"),
    ("penalty", "adds a penalty on the model to the loss"),
    ("loss_term", "adds a loss term each training step"),
    ("param_groups", "sets optimizer parameter groups"),
    ("callbacks", "runs Lightning callbacks"),
)


def what_it_does(reg: Regularizer) -> list[str]:
    """One line for a regularizer that plans no layer change and describes nothing itself: which of
    its methods act (``regfw plan`` lists every selected regularizer, not only those with rows)."""
    acts = [text for method, text in _ACTS
            if getattr(type(reg), method, None) is not getattr(Regularizer, method, None)]
    return [f"no layer changes; {', '.join(acts) if acts else 'does nothing during training'}"]


def check_names(regularizers: Sequence[Regularizer]) -> None:
    """Two regularizers of one name: a config error (the plan keys its rows by name, so one's rows
    would be applied by the other; their inserted modules and logged terms would share the name)."""
    seen: dict[str, Regularizer] = {}
    for reg in regularizers:
        other = seen.setdefault(reg.name, reg)
        if other is not reg:
            first, second = (f"{type(r).__module__}.{type(r).__qualname__}" for r in (other, reg))
            raise ConfigError(f"regularizers: two selected regularizers are named {reg.name!r} ({first} and {second}); "
                              f"one plan takes one regularizer of a name: remove one of them.")


def check_families(regularizers: Sequence[Regularizer]) -> None:
    """Two regularizers of one family claiming the same layer kind: a config error naming both."""
    claimed: dict[tuple[str, str], Regularizer] = {}
    for reg in regularizers:
        family = getattr(reg, "family", "")
        if not family:
            continue
        for kind in check_claims(reg, reg.claims()):
            other = claimed.setdefault((family, kind), reg)
            if other is reg:
                continue
            switch = [r.name for r in (other, reg) if any(f.name == kind for f in dataclasses.fields(r.config))]
            fix = (f"switch the kind off in one of them, e.g. regularizers.{switch[0]}.{kind}: 0, or remove one"
                   if switch else "remove one of them")
            raise ConfigError(
                f"regularizers: {other.name!r} and {reg.name!r} are both {family} regularizers for {kind!r} "
                f"layers, and a layer kind takes one {family} variant; {fix}"
            )


def batchnorm_warnings(mm: ModelMap, rows: Sequence[PlanItem]) -> list[str]:
    """Dropout directly before a BatchNorm: BatchNorm sees a different variance in training than
    at inference, the "variance shift" of Li et al., "Understanding the Disharmony between Dropout
    and Batch Normalization by Variance Shift", CVPR 2019. Covers the model's own dropout layers
    and every planned insertion."""
    out = []
    for info in mm.layers:
        if is_injected(info.path) or not info.path or not is_dropout(info.module):
            continue
        bn = mm.flow.next(info.path)
        if bn is not None and is_batchnorm(mm.module(bn)):
            out.append(
                f"dropout {info.path!r} ({type(info.module).__name__}) feeds BatchNorm {bn!r} directly: the "
                f"variance {bn!r} sees in training differs from inference (variance shift, Li et al. 2019). "
                f"Move the dropout after {bn!r} and its activation."
            )
    for row in rows:
        if row.action != "after" or row.anchor is None:
            continue
        bn = mm.flow.next(row.anchor)
        if bn is not None and is_batchnorm(mm.module(bn)):
            out.append(
                f"{row.regularizer} puts {row.variant} on the output of {row.anchor!r}, which feeds BatchNorm "
                f"{bn!r} directly: the variance {bn!r} sees in training differs from inference (variance "
                f"shift, Li et al. 2019). Switch the kind off for this model or reorder its layers."
            )
    return out


def check_rows(reg: Regularizer, rows: list[PlanItem]) -> list[PlanItem]:
    """``rows`` when ``reg`` can carry out every one of them; otherwise a :class:`PluginError`
    naming the regularizer's class, the row and the method it needs, before anything is printed
    or changed."""
    inserted: set[tuple[str | None, str]] = set()
    for row in rows:
        if row.action in ("before", "after"):
            spot = (row.anchor, row.action)
            if spot in inserted:  # the layer carries one module of a regularizer on each side
                raise PluginError(f"{who(reg)}: plan() returned two {row.action!r} rows on one layer "
                                  f"({_where(row)}); apply() inserts one module {row.action} a layer, so the second "
                                  f"would be printed but not carried out. Plan one row there.")
            inserted.add(spot)
        if row.regularizer != reg.name:
            raise PluginError(f"{who(reg)}: plan() returned a row ({_where(row)}) of regularizer {row.regularizer!r}, "
                              f"not its own name {reg.name!r}; `regfw plan` would show it under another name than "
                              f"the one that applies it. Make its rows with PlanItem(self.name, ...).")
        problem = row_problem(row)
        if problem:
            raise PluginError(f"{who(reg)}: plan() returned a row it cannot carry out ({_where(row)}): {problem}. "
                              f"Fix the plugin's plan method.")
        method = missing_method(reg, row)
        if method is not None:
            raise PluginError(
                f"{who(reg)}: plan() returned {'an' if row.action[0] in 'aeiou' else 'a'} {row.action!r} row "
                f"({_where(row)}), which apply() carries out with "
                f"{method}(), and {type(reg).__qualname__} does not define {method}(); define it, or plan another "
                f"action (see the regularizer contract in docs/plugins.md)")
    return rows


def _where(row: PlanItem) -> str:
    return f"path {row.path or '<model>'!r}, anchor {row.anchor!r}"


def apply_plan(model: nn.Module, regularizers: Sequence[Regularizer], plan: Plan) -> None:
    """Carry out ``plan`` on ``model``: each regularizer applies its own rows; the plan's
    warnings are emitted with :func:`warnings.warn`.

    Every row but a ``note`` must be carried out by :meth:`~regfw.Regularizer.apply_row` during
    the regularizer's ``apply``: one that was not (an ``apply`` override that skips rows or does
    the work itself) is a :class:`PluginError` naming the class, its ``apply`` and the rows, so a
    plan that `regfw plan` printed is never silently not applied.
    """
    for message in plan.warnings:
        warnings.warn(message, UserWarning, stacklevel=2)
    for reg in regularizers:
        rows = plan.items.get(reg.name, [])
        with tracking_applied() as done:
            reg.apply(model, rows)
        undone = [row for row in rows if row.action != "note" and id(row) not in done]
        if undone:
            owner = next(c for c in type(reg).__mro__ if "apply" in vars(c))
            listed = "; ".join(f"{r.action} {_where(r)}" for r in undone[:3]) + (", ..." if len(undone) > 3 else "")
            raise PluginError(
                f"{who(reg)}: {owner.__module__}.{owner.__qualname__}.apply() left {len(undone)} of its "
                f"{sum(r.action != 'note' for r in rows)} planned change(s) undone ({listed}), which `regfw plan` "
                f"lists as done. apply() must pass every row to self.apply_row(model, row) (call "
                f"super().apply(model, items) in an override; apply_row uses make_module, set_existing and wrap)")
