"""The plan: what every selected regularizer does to a model, computed once.

``regfw plan`` prints a :class:`Plan` and :class:`~regfw.module.RegularizedModule` applies the
same object, so what is printed is what is done.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional, Sequence

from torch import nn

from regfw.errors import ConfigError
from regfw.regularizer import PlanContext, PlanItem, Regularizer
from regfw.surgery import LayerInfo, classify_model


@dataclass
class Plan:
    """Per regularizer: its rows and any extra description lines; plus warnings."""

    items: dict[str, list[PlanItem]]
    notes: dict[str, list[str]]
    layers: list[LayerInfo]
    context: PlanContext
    warnings: list[str] = field(default_factory=list)

    def rows(self) -> list[PlanItem]:
        return [item for items in self.items.values() for item in items]

    def format(self) -> str:
        """A human-readable table: one row per insertion with its reason."""
        ctx = self.context
        lines = [
            f"plan: N={ctx.n_examples if ctx.n_examples is not None else '?'} training examples, "
            f"P={ctx.n_params} parameters, {len(self.rows())} change(s)"
        ]
        header = ("regularizer", "path", "kind", "variant", "rate", "action", "why")
        table = [header]
        for item in self.rows():
            where = item.action if item.anchor in (None, item.path) else f"{item.action} {item.anchor}"
            rate = "-" if item.rate is None else f"{item.rate:g}"
            table.append((item.regularizer, item.path or "<model>", item.kind, item.variant, rate, where, item.reason))
        widths = [max(len(str(row[i])) for row in table) for i in range(len(header) - 1)]
        for row in table:
            cells = [str(c).ljust(w) for c, w in zip(row, widths)] + [str(row[-1])]
            lines.append("  ".join(cells).rstrip())
        for name, notes in self.notes.items():
            for note in notes:
                lines.append(f"{name}: {note}")
        for warning in self.warnings:
            lines.append(f"warning: {warning}")
        return "\n".join(lines)


def make_plan(model: nn.Module, regularizers: Sequence[Regularizer], n_examples: Optional[int] = None,
              example_input: Any = None) -> Plan:
    """Classify ``model`` once and ask every regularizer for its rows (nothing is changed)."""
    n_params = sum(p.numel() for p in model.parameters())
    layers = classify_model(model, example_input)
    ctx = PlanContext(n_examples=n_examples, n_params=n_params, layers=layers, example_input=example_input)
    items: dict[str, list[PlanItem]] = {}
    notes: dict[str, list[str]] = {}
    claimed: dict[tuple[str, str, str], str] = {}
    for reg in regularizers:
        rows = reg.plan(model, ctx)
        family = getattr(reg, "family", "")
        for row in rows:
            if family and row.action != "note":
                key = (family, row.path, row.kind)
                if key in claimed and claimed[key] != reg.name:
                    raise ConfigError(
                        f"regularizers: {claimed[key]!r} and {reg.name!r} both apply {family} to "
                        f"{row.kind} layers (first at {row.path!r}); select one of them for kind "
                        f"{row.kind!r}, e.g. set regularizers.{reg.name}.{row.kind}: 0 or remove it"
                    )
                claimed[key] = reg.name
        items[reg.name] = rows
        extra = reg.describe(model)
        if extra:
            notes[reg.name] = list(extra)
    plan = Plan(items, notes, layers, ctx)
    plan.warnings.extend(_batchnorm_warnings(model, plan))
    return plan


def _batchnorm_warnings(model: nn.Module, plan: Plan) -> list[str]:
    """Dropout that feeds a BatchNorm shifts its variance at inference (Li et al. 2019)."""
    from regfw.surgery import is_dropout

    out = []
    for info in plan.layers:
        if not is_dropout(info.module):
            continue
        parent_path = info.path.rsplit(".", 1)[0] if "." in info.path else ""
        parent = model.get_submodule(parent_path) if parent_path else model
        if not isinstance(parent, nn.Sequential):
            continue
        keys = list(parent._modules)
        idx = keys.index(info.path.rsplit(".", 1)[-1])
        if idx + 1 < len(keys) and isinstance(parent._modules[keys[idx + 1]], nn.modules.batchnorm._BatchNorm):
            bn = (parent_path + "." if parent_path else "") + keys[idx + 1]
            out.append(
                f"dropout {info.path!r} feeds BatchNorm {bn!r}: the variance it sees in training differs "
                f"from inference (variance shift). Move the dropout after {bn!r} and its activation."
            )
    return out


def apply_plan(model: nn.Module, regularizers: Sequence[Regularizer], plan: Plan) -> None:
    """Carry out ``plan`` on ``model`` (each regularizer applies its own rows)."""
    for reg in regularizers:
        reg.apply(model, plan.items.get(reg.name, []))
