"""The rows of a plan (:class:`PlanItem`) and what a regularizer knows when it plans (:class:`PlanContext`).

Plain data, imported by :mod:`regfw.extend.regularizer` (which re-exports both, their public home) and by
:mod:`regfw.placement.surgery` and :mod:`regfw.placement.plan`, so that the placement code never imports the base
classes that call it.
"""
from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import asdict, dataclass, field
from typing import Any

#: What a plan row does: ``before`` (insert a module on the layer's input), ``after`` (on the
#: output of ``anchor``), ``set`` (change an existing module's rate), ``wrap`` (modify the layer
#: itself) or ``note`` (nothing: a remark shown in the plan).
ACTIONS = ("before", "after", "set", "wrap", "note")


@dataclass
class PlanContext:
    """What a regularizer may know about the run when it plans.

    ``layers`` is the classified model (see :func:`regfw.placement.api.classify_model`) and
    ``model_map`` the same plus its dataflow and residual adds (:class:`regfw.placement.api.ModelMap`),
    computed once and shared by all regularizers.
    """

    n_examples: int | None = None
    n_params: int | None = None
    example_input: Any = None
    model_map: Any = None
    #: Layer kind -> the selected dropout-family regularizer claiming it (``Regularizer.claims``), so one
    #: regularizer can leave a place to another (``attention_dropout`` leaves a Transformer layer's
    #: sub-layer dropouts to ``dropout`` when both are selected).
    claimed: dict[str, str] = field(default_factory=dict)

    @property
    def layers(self) -> list:
        return self.model_map.layers if self.model_map is not None else []


@dataclass
class PlanItem:
    """One thing a regularizer does to one place of the model."""

    regularizer: str
    path: str
    kind: str
    variant: str
    rate: float | None
    reason: str
    #: ``before`` (on the layer's input), ``after`` (on the output of ``anchor``), ``set``
    #: (change an existing module's rate), ``wrap`` (modify the layer itself) or ``note``.
    action: str = "after"
    #: The module path the inserted module hangs on (its forward hook runs there).
    anchor: str | None = None
    options: dict = field(default_factory=dict)

    def row(self) -> dict:
        return asdict(self)


_applied: ContextVar[set[int] | None] = ContextVar("regfw_applied_rows", default=None)


@contextmanager
def tracking_applied() -> Iterator[set[int]]:
    """Collect the ids of the rows :meth:`regfw.Regularizer.apply_row` carries out inside the block,
    so that :func:`regfw.placement.plan.apply_plan` can tell a planned row that was never applied."""
    done: set[int] = set()
    token = _applied.set(done)
    try:
        yield done
    finally:
        _applied.reset(token)


def mark_applied(item: PlanItem) -> None:
    """Record that ``item`` was carried out (a no-op outside :func:`tracking_applied`)."""
    done = _applied.get()
    if done is not None:
        done.add(id(item))
