"""The ``drop_path`` regularizer: stochastic depth on the residual branches of a model.

Huang, Sun, Liu, Sedra and Weinberger, "Deep Networks with Stochastic Depth", ECCV 2016: in
training, each residual block's branch is dropped for a whole sample with some probability, so
``x + f(x)`` becomes ``x`` for that sample; kept branches are scaled by ``1 / (1 - p)``. The rate
grows linearly with depth, from 0 at the first block to ``p`` at the last
(:func:`regfw.layers.drop_path_schedule`).

Where the branches are. Residual adds are functional (``out + identity``) and invisible to
module hooks, so the model is traced with ``torch.fx``, or captured with ``torch.export`` of the example
input where ``torch.fx`` cannot trace it (:func:`regfw.placement.dataflow.find_residuals`; the plan then says so):
for each add whose operands share an input, the operand that runs more parameterised modules is
the branch. :class:`regfw.layers.DropPath` then hangs as a forward hook on the module producing
the branch operand (for a torchvision-style block, its last BatchNorm), so the model keeps its
class, forward and parameter names. A model neither can capture gets no DropPath and a
warning saying why; a branch that ends in a function rather than a module gets a plan note.

The rate at the last block comes from the ``residual`` row of the rate table (0.1, timm's and
DeiT's default) unless given. ``depth`` sets the profile over depth; ``schedule`` grows the
rates over training time as well (scheduled drop path, Zoph et al. 2018:
``{schedule: {kind: linear, epochs: E}}``). This plugin belongs to the ``dropout`` family, for kind
``residual``.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Literal

from torch import nn

import regfw
from regfw.config.schema import rate
from regfw.extend.regularizer import InjectingRegularizer, PlanContext, PlanItem
from regfw.layers import DropPath, drop_path_schedule
from regfw.placement.kinds import RESIDUAL, choose_rate, transformer_ranges
from regfw.train.schedules import RateSchedule


@dataclass
class DropPathConfig:
    """The rate at the deepest block and how it grows with depth."""

    rate: float | None = rate(doc="drop rate of the deepest residual block (table: 0.1)")
    #: ``linear``: 0 at the first block up to ``rate`` at the last (Huang et al. 2016);
    #: ``uniform``: ``rate`` everywhere.
    depth: Literal["linear", "uniform"] = "linear"
    #: Scale kept branches by 1 / (1 - p) (as timm does); false keeps them as they are.
    scale_by_keep: bool = True
    #: Where a branch already ends in a DropPath: set its rate, or leave it alone.
    existing: Literal["override", "keep"] = "override"
    #: How the rates grow over training, e.g. ``{kind: linear, epochs: 100}``: scheduled drop
    #: path (Zoph et al. 2018); see :mod:`regfw.train.schedules`.
    schedule: RateSchedule = field(default_factory=RateSchedule)


class DropPathRegularizer(InjectingRegularizer):
    """DropPath on the branch operand of every residual add ``torch.fx`` finds."""

    name = "drop_path"
    family = "dropout"
    description = "stochastic depth (DropPath) on residual branches, linear depth schedule; torch.fx or torch.export"
    Config = DropPathConfig
    kinds = (RESIDUAL,)

    def claims(self) -> tuple[str, ...]:
        return () if self.config.rate == 0 else (RESIDUAL,)

    _capture: str | None = None

    def describe(self, model: nn.Module) -> list[str]:
        """The schedule line, and how the residual adds were found where ``torch.fx`` could not trace."""
        return [*super().describe(model), *([self._capture] if self._capture else [])]

    def plan(self, model: nn.Module, ctx: PlanContext) -> list[PlanItem]:
        from regfw.placement.api import is_path_drop, model_map, reuse_existing

        mm = model_map(model, ctx)
        sites, error = mm.residuals.result
        capture = getattr(mm.residuals, "capture", None)
        self._capture = capture if capture and "torch.export" in capture else None
        if error:
            warnings.warn(f"drop_path: {error}", stacklevel=2)
            return []
        if not sites:
            hidden = [type(m).__name__ for m in model.modules()
                      if isinstance(m, (nn.TransformerEncoderLayer, nn.TransformerDecoderLayer))]
            hint = (f"; the residual adds of {hidden[0]} happen inside that torch module, which DropPath "
                    f"cannot reach (set its dropout instead, e.g. with attention_dropout)") if hidden else ""
            warnings.warn(f"drop_path: found no residual add in {type(model).__name__}; nothing was inserted{hint}",
                          stacklevel=2)
            return []
        family = transformer_ranges(mm)  # a model with attention blocks: the Transformer range
        top, why = choose_rate(RESIDUAL, self.config.rate, "auto", ctx.n_examples, ctx.n_params,
                               {**family, **self.rate_ranges})
        if family and self.config.rate is None:
            why += f"; Transformer range: attention blocks ({mm.attention_summary()})"
        if not top:
            return []
        blocks = list(dict.fromkeys(s.block for s in sites if s.anchor is not None))
        if self.config.depth == "linear":
            rates = drop_path_schedule(top, len(blocks))
        else:
            rates = [top] * len(blocks)
        rows: list[PlanItem] = []
        for site in sites:
            where = f"residual add {site.node!r}"
            if site.anchor is None:
                rows.append(PlanItem(self.name, site.block, RESIDUAL, self.name, None,
                                     f"not inserted at {where}: {site.problem}", action="note"))
                continue
            index = blocks.index(site.block)
            p = rates[index]
            reason = f"{why}; {self.config.depth} depth schedule, block {index + 1} of {len(blocks)}; {where}"
            existing = site.anchor if is_path_drop(mm.module(site.anchor)) else None  # regfw's, timm's, torchvision's
            if p == 0 and existing is None:
                rows.append(PlanItem(self.name, site.block, RESIDUAL, self.name, 0.0,
                                     reason + "; rate 0, nothing inserted", action="note"))
                continue
            reused = reuse_existing(self, mm, RESIDUAL, site.anchor, "after", p, reason, existing, site.block)
            if reused is not None:
                rows.extend(reused)
                continue
            rows.append(PlanItem(self.name, site.block, RESIDUAL, self.name, p, reason, action="after",
                                 anchor=site.anchor))
        return rows

    def make_module(self, kind: str, rate: float, item: PlanItem) -> nn.Module:
        return DropPath(rate, scale_by_keep=self.config.scale_by_keep)


@regfw.hookimpl
def regfw_register_regularizers(register):
    register(DropPathRegularizer)
