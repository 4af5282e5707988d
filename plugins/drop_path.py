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

from dataclasses import dataclass, field
from typing import Literal

from torch import nn

from regfw.extend import (
    RESIDUAL,
    InjectingRegularizer,
    PlanItem,
    RateSchedule,
    hookimpl,
    rate,
)
from regfw.layers import DropPath, drop_path_schedule


@dataclass
class DropPathConfig:
    """The rate at the deepest block and how it grows with depth."""

    rate: float | None = rate(doc="drop rate of the deepest residual block (table: 0.1)")
    #: ``linear``: 0 at the first block up to ``rate`` at the last (Huang et al. 2016);
    #: ``uniform``: ``rate`` everywhere.
    depth: Literal["linear", "uniform"] = "linear"
    #: Scale kept branches by 1 / (1 - p) (as timm does); false keeps them as they are.
    scale_by_keep: bool = True
    @property
    def residual(self) -> float | None:
        """The rate of kind ``residual``, which ``InjectingRegularizer.rate_for`` reads: ``rate``."""
        return self.rate

    #: Where a branch already ends in a DropPath: set its rate, or leave it alone.
    existing: Literal["override", "keep"] = "override"
    #: How the rates grow over training, e.g. ``{kind: linear, epochs: 100}``: scheduled drop
    #: path (Zoph et al. 2018); see :mod:`regfw.train.schedules`.
    schedule: RateSchedule = field(default_factory=RateSchedule)


class DropPathRegularizer(InjectingRegularizer):
    """DropPath on the branch operand of every residual add ``torch.fx`` (or ``torch.export``) finds."""

    name = "drop_path"
    family = "dropout"
    description = "stochastic depth (DropPath) on residual branches, linear depth schedule; torch.fx or torch.export"
    Config = DropPathConfig
    kinds = (RESIDUAL,)

    def residual_profile(self, top: float, n_blocks: int) -> tuple[list[float], str]:
        """``linear``: 0 at the first block up to ``top`` at the last; ``uniform``: ``top`` everywhere."""
        rates = drop_path_schedule(top, n_blocks) if self.config.depth == "linear" else [top] * n_blocks
        return rates, f"{self.config.depth} depth schedule"

    def make_module(self, kind: str, rate: float, item: PlanItem) -> nn.Module:
        return DropPath(rate, scale_by_keep=self.config.scale_by_keep)


@hookimpl
def regfw_register_regularizers(register):
    register(DropPathRegularizer)
