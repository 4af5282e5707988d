"""The Lightning callback that moves one regularizer's rates along its :class:`~regfw.train.schedules.RateSchedule`.

:class:`RateScheduler` is what ``regularizers: {NAME: {schedule: {...}}}`` adds to a fit (through
:meth:`regfw.extend.regularizer.InjectingRegularizer.callbacks`). It finds the layers that regularizer
placed (the plan rows of a :class:`~regfw.train.module.RegularizedModule`), takes each row's planned
rate as that layer's target, and sets every layer to ``schedule.rate(target, t)``:

* every optimizer step (``every: step``, at ``on_train_batch_start``, before the forward pass
  that the step's gradient comes from) or at the start of each epoch (``every: epoch``);
* ``t`` comes from the trainer's counters only: ``global_step`` (optimizer steps, so gradient
  accumulation counts one step per update) or ``current_epoch``; a fractional epoch is
  ``global_step / steps_per_epoch``. Lightning restores both counters on resume, so a resumed run
  sets bitwise the same rates at the same steps as one that was never stopped;
* the mean rate per layer kind is logged once per epoch as ``rate/<regularizer>/<kind>``.

:meth:`RateScheduler.state_dict` keeps the schedule, the targets and the rates last set, and
:meth:`~RateScheduler.load_state_dict` refuses a checkpoint of another schedule or other targets
(the rates would not continue), naming what differs.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any

import pytorch_lightning as pl
from torch import nn

from regfw.placement.api import planned_module
from regfw.placement.surgery import is_dropout
from regfw.train.schedules import RateSchedule

__all__ = ["RateScheduler", "ScheduledLayer"]

_STATE_VERSION = 1


@dataclasses.dataclass
class ScheduledLayer:
    """One place a schedule moves: its path, kind, planned (target) rate and how to set it."""

    path: str
    kind: str
    target: float
    module: nn.Module | None = dataclasses.field(repr=False, default=None)
    row: Any = dataclasses.field(repr=False, default=None)

    def set(self, regularizer: Any, model: nn.Module, value: float) -> None:
        if self.module is not None:
            setattr(self.module, "p", value)  # noqa: B010 - a Rate descriptor or property, not a tensor
        else:  # e.g. attention_dropout's rows set torch's own modules: re-apply the row at the new rate
            regularizer.apply(model, [dataclasses.replace(self.row, rate=value)])


def _has_rate(module: nn.Module) -> bool:
    p = getattr(module, "p", None)
    return is_dropout(module) and isinstance(p, (int, float)) and not isinstance(p, bool)


def scheduled_layers(model: nn.Module, rows: list, regularizer: str) -> list[ScheduledLayer]:
    """The places the plan ``rows`` of ``regularizer`` rated, in row order."""
    out: list[ScheduledLayer] = []
    for row in rows:
        if row.regularizer != regularizer or row.action == "note" or not row.rate:
            continue
        hit = planned_module(model, row) if row.action in ("before", "after", "set") else None
        if hit is not None and _has_rate(hit[1]):
            out.append(ScheduledLayer(hit[0], row.kind, float(row.rate), hit[1], row))
            continue
        if row.action == "wrap":  # the rate lives in a child of the wrapped layer (weight drop, ...)
            host = model.get_submodule(row.anchor) if row.anchor else model
            found = [(n, m) for n, m in host.named_children() if _has_rate(m)]
            for name, child in found:
                path = f"{row.anchor}.{name}" if row.anchor else name
                out.append(ScheduledLayer(path, row.kind, float(row.rate), child, row))
            if found:
                continue
        out.append(ScheduledLayer(row.anchor or row.path, row.kind, float(row.rate), None, row))
    return out


class RateScheduler(pl.Callback):
    """Move the rates ``regularizer`` planned along ``schedule`` (see the module docstring).

    Args:
        regularizer: the :class:`~regfw.extend.regularizer.Regularizer` object whose plan rows are moved.
        schedule: the shape, its length and how often it is applied.
        prefix: prefix of the logged metric names.
    """

    def __init__(self, regularizer: Any, schedule: RateSchedule, prefix: str = "rate/") -> None:
        super().__init__()
        if not isinstance(schedule, RateSchedule):
            raise TypeError(f"RateScheduler: schedule must be a RateSchedule, got {schedule!r}")
        self.regularizer = regularizer
        self.schedule = schedule
        self.prefix = prefix
        self.layers: list[ScheduledLayer] = []
        self.position: float | None = None  #: the ``t`` of the rates last set
        self._model: nn.Module | None = None
        self._loaded: dict | None = None

    @property
    def name(self) -> str:
        return str(self.regularizer.name)

    @property
    def state_key(self) -> str:
        return self._generate_state_key(regularizer=self.name)

    # ------------------------------------------------------------------ binding and stepping

    def bind(self, module: nn.Module) -> list[ScheduledLayer]:
        """Find the scheduled layers in ``module`` (a RegularizedModule, or a module with a ``plan``)."""
        plan = getattr(module, "plan", None)
        rows = plan.rows() if plan is not None and hasattr(plan, "rows") else []
        inner = getattr(module, "model", None)
        model = inner if isinstance(inner, nn.Module) and rows else module
        self._model = model
        self.layers = scheduled_layers(model, rows, self.name)
        self._check_loaded()
        return self.layers

    def progress(self, trainer: pl.Trainer) -> float:
        """Training time ``t`` in the schedule's unit, from the trainer's counters."""
        if self.schedule.unit == "step":
            return float(trainer.global_step)
        if self.schedule.every == "epoch":
            return float(trainer.current_epoch)
        batches = trainer.num_training_batches
        if not isinstance(batches, int) or batches <= 0 or math.isinf(batches):
            return float(trainer.current_epoch)
        per_epoch = max(1, math.ceil(batches / max(1, trainer.accumulate_grad_batches)))
        return trainer.global_step / per_epoch

    def rates_at(self, t: float) -> dict[str, float]:
        """The rate of every scheduled layer at time ``t``."""
        return {layer.path: self.schedule.rate(layer.target, t) for layer in self.layers}

    def step(self, t: float) -> None:
        """Set every scheduled layer to its rate at time ``t`` (nothing when ``t`` did not change)."""
        if t == self.position or self._model is None:
            return
        for layer in self.layers:
            layer.set(self.regularizer, self._model, self.schedule.rate(layer.target, t))
        self.position = t

    def rates(self) -> dict[str, float]:
        """The rate each scheduled layer has now, by path."""
        return {layer.path: self.schedule.rate(layer.target, self.position) if self.position is not None
                else layer.target for layer in self.layers}

    # ------------------------------------------------------------------ Lightning hooks

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.bind(pl_module)
        self.position = None

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.step(self.progress(trainer))

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        if self.schedule.every == "step":
            self.step(self.progress(trainer))

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        by_kind: dict[str, list[float]] = {}
        rates = self.rates()
        for layer in self.layers:
            by_kind.setdefault(layer.kind, []).append(rates[layer.path])
        for kind, values in by_kind.items():
            pl_module.log(f"{self.prefix}{self.name}/{kind}", sum(values) / len(values), on_step=False,
                          on_epoch=True)

    # ------------------------------------------------------------------ checkpoint state

    def state_dict(self) -> dict[str, Any]:
        return {
            "version": _STATE_VERSION,
            "regularizer": self.name,
            "schedule": dataclasses.asdict(self.schedule),
            "targets": {layer.path: layer.target for layer in self.layers},
            "position": self.position,
            "rates": self.rates(),
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        version = state_dict.get("version")
        if version != _STATE_VERSION:
            raise ValueError(f"RateScheduler: checkpoint state version {version!r} is not {_STATE_VERSION}; it was "
                             f"written by another regfw version")
        saved = state_dict.get("schedule")
        if saved != dataclasses.asdict(self.schedule):
            raise ValueError(f"RateScheduler: the checkpoint's schedule of {self.name!r} is {saved}, the config's is "
                             f"{dataclasses.asdict(self.schedule)}; resume with the config the run was started with")
        self._loaded = dict(state_dict)
        self._check_loaded()

    def _check_loaded(self) -> None:
        if self._loaded is None or not self.layers:
            return
        saved = {str(k): float(v) for k, v in self._loaded["targets"].items()}
        mine = {layer.path: layer.target for layer in self.layers}
        if saved != mine:
            differ = sorted(set(saved.items()) ^ set(mine.items()))
            raise ValueError(f"RateScheduler: the checkpoint's scheduled layers of {self.name!r} differ from this "
                             f"model's: {differ[:4]}; resume with the config the run was started with")
        self._loaded = None
