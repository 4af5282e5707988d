"""Rate schedules: a stochastic layer's rate as a function of training time.

A schedule moves each layer's rate between ``start`` and its *target*, the rate the plan gave
that layer (so a depth profile such as drop path's linear growth with depth is kept: every
block follows the same shape towards its own rate)::

    rate(t) = start + (target - start) * shape(t)

``t`` is training progress in epochs (``epochs: E``) or optimizer steps (``steps: S``); the
shapes are functions of ``u = t / length`` (clipped to [0, 1]):

``constant``
    no schedule: the planned rate throughout (the default).
``linear``
    ``shape = u``: DropBlock's linear warm-up of the drop rate from 0 to the target (Ghiasi, Lin
    and Le, "DropBlock", NeurIPS 2018) and scheduled drop path, the rate growing linearly over
    training (Zoph, Vasudevan, Shlens and Le, "Learning Transferable Architectures", CVPR 2018).
``cosine``
    ``shape = (1 - cos(pi u)) / 2``: the same end points, reached smoothly (a decay when
    ``start`` is above the target).
``step``
    ``shape = floor(u * stages) / stages``: ``stages`` equal jumps, the last at ``length``.
``early``
    the target for ``t < length``, then 0: early dropout (Liu, Xu, Wu, Li, Darrell and Xie,
    "Dropout Reduces Underfitting", ICML 2023), which helps underfitting models.
``late``
    0 for ``t < length``, then the target: their late dropout, for overfitting models.

The rate is recomputed ``every`` optimizer step (the default) or at the start of every epoch,
from the trainer's own counters (``global_step``, ``current_epoch``), so a resumed run sees the
same rates at the same steps as an uninterrupted one (see
:class:`regfw.train.schedule_callback.RateScheduler`). This module is torch- and Lightning-free: config
dataclasses import it at plugin discovery.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

from regfw.config.validation import rate

__all__ = ["RateSchedule", "SHAPES", "is_active"]

#: The schedule shapes, ``constant`` meaning none.
SHAPES = ("constant", "linear", "cosine", "step", "early", "late")


@dataclass
class RateSchedule:
    """``regularizers.NAME.schedule``: how the planned rates move during training.

    Example: ``dropblock: {schedule: {kind: linear, start: 0.0, epochs: 10}}``.
    """

    #: The shape (see the module docstring); ``constant``: no schedule.
    kind: Literal["constant", "linear", "cosine", "step", "early", "late"] = "constant"
    #: The rate at t = 0 for ``linear``, ``cosine`` and ``step`` (``early``/``late`` switch to 0).
    start: float = rate(0.0, doc="rate at the start of training")
    #: The length of the ramp (or the switch point of ``early``/``late``) in epochs ...
    epochs: float | None = field(default=None, metadata={"range": (0.0, None, "> 0", "exclusive"),
                                                         "doc": "ramp length in epochs"})
    #: ... or in optimizer steps; exactly one of the two for every shape but ``constant``.
    steps: int | None = field(default=None, metadata={"range": (0.0, None, "> 0", "exclusive"),
                                                      "doc": "ramp length in optimizer steps"})
    #: How many equal jumps the ``step`` shape makes.
    stages: int = field(default=2, metadata={"range": (0.0, None, "> 0", "exclusive"), "doc": "jumps of `step`"})
    #: Recompute the rates every optimizer ``step`` or at the start of every ``epoch``.
    every: Literal["step", "epoch"] = "step"

    def __post_init__(self) -> None:
        if self.kind == "constant":
            return
        if (self.epochs is None) == (self.steps is None):
            given = "both" if self.epochs is not None else "neither"
            raise ValueError(f"kind {self.kind!r} needs its length as exactly one of `epochs` or `steps`, "
                             f"{given} given; e.g. {{kind: {self.kind}, epochs: 10}}")
        if self.kind in ("early", "late") and self.start != 0.0:
            raise ValueError(f"start: got {self.start:g}, but kind {self.kind!r} switches between 0 and the "
                             f"planned rate; remove `start` (or use kind linear/cosine/step)")

    @property
    def active(self) -> bool:
        return self.kind != "constant"

    @property
    def unit(self) -> str:
        """``epoch`` or ``step``: what ``length`` counts."""
        return "epoch" if self.epochs is not None else "step"

    @property
    def length(self) -> float:
        return float(self.epochs if self.epochs is not None else self.steps or 0)

    def shape(self, t: float) -> float:
        """The position between ``start`` (0) and the target (1) after ``t`` units of training."""
        if self.kind == "constant":
            return 1.0
        if self.kind == "early":
            return 1.0 if t < self.length else 0.0
        if self.kind == "late":
            return 0.0 if t < self.length else 1.0
        u = min(max(t / self.length, 0.0), 1.0)
        if self.kind == "linear":
            return u
        if self.kind == "cosine":
            return 0.5 * (1.0 - math.cos(math.pi * u))
        return math.floor(u * self.stages + 1e-9) / self.stages  # step

    def rate(self, target: float, t: float) -> float:
        """The rate of a layer whose planned rate is ``target``, after ``t`` units of training."""
        start = 0.0 if self.kind in ("early", "late") else self.start
        return start + (float(target) - start) * self.shape(t)

    def describe(self) -> str:
        """One line for ``regfw plan``."""
        if not self.active:
            return "rate schedule: none (the planned rates throughout)"
        length = f"{self.length:g} {self.unit}(s)"
        when = "every optimizer step" if self.every == "step" else "at the start of every epoch"
        if self.kind == "early":
            what = f"early: the planned rates for the first {length}, then 0"
        elif self.kind == "late":
            what = f"late: 0 for the first {length}, then the planned rates"
        elif self.kind == "step":
            what = f"step: from {self.start:g} to the planned rates in {self.stages} equal jumps over {length}"
        else:
            what = f"{self.kind}: from {self.start:g} to the planned rates over {length}"
        return f"rate schedule {what}; updated {when}"


def is_active(schedule: object) -> bool:
    """True for a :class:`RateSchedule` (or its dict form) with a shape other than ``constant``."""
    if isinstance(schedule, RateSchedule):
        return schedule.active
    if isinstance(schedule, dict):
        return schedule.get("kind", "constant") != "constant"
    return False
