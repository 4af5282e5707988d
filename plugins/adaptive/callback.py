"""Adaptive dropout rates: "raise dropout if overfitting, lower it if underfitting", automated.

The Lightning part of the ``adaptive_dropout`` plugin (its settings and regularizer are in
:mod:`regfw_plugins.adaptive`). The rule of thumb (Srivastava et al., JMLR 2014, appendix A; every
practitioner's guide since) is applied by :class:`AdaptiveDropoutCallback`. At the end of each validation it compares

* ``train_loss``: the mean training loss since the previous validation. By default (``train_loss=
  "clean"``) it is measured with the model in eval mode -- dropout off, as for the validation loss --
  on every ``clean_every``-th training batch just before the optimizer sees it, so the gap is the
  generalisation gap and not the dropout noise (the noisy training loss of a dropout network is
  often *above* its validation loss). ``"noisy"`` uses the loss the optimizer minimised instead.
* ``val_loss``: the monitored validation metric (``val_loss`` by default).

and diagnoses (:func:`diagnose`), in this order:

1. **overfitting** when ``val_loss - train_loss > gap_threshold``: raise every rate by ``step``;
2. **underfitting** when ``train_loss > loss_threshold`` (if set): lower every rate by ``step``;
3. **underfitting** when the training loss *stalled* -- it fell by less than ``stall_delta``
   (relative) since the previous validation -- while the gap is below ``gap_threshold / 2``: the
   model stopped fitting the training data without overfitting, so its capacity, not the data,
   is the limit: lower;
4. otherwise hold.

A move happens only after the same diagnosis ``patience`` validations in a row, then the count
restarts (and ``cooldown`` validations are skipped). Each layer stays inside the range of its
layer kind in :data:`regfw.placement.kinds.RATE_TABLE`, or its regularizer's own range for the kind
(``rate_ranges``: alpha dropout's 0.05-0.1), or ``min_rate``/``max_rate`` when given, and a
rate already outside that range is never moved further out. The layers moved are the dropout
modules regfw inserted or re-rated (found through the plan of a
:class:`~regfw.train.module.RegularizedModule`, whose rows give each layer's kind, or by their
``regfw_`` names in any other module).

Every decision is kept in :attr:`AdaptiveDropoutCallback.history`; every change is logged with its reason
to the Python logger ``regfw.adaptive`` (INFO), to the Lightning loggers (metrics
``adaptive_dropout/decision``, ``adaptive_dropout/gap``, ``adaptive_dropout/rate/<kind>``; the
reason as text where a logger takes text) and to ``adaptive_dropout.jsonl`` in the log directory.
:meth:`AdaptiveDropoutCallback.state_dict` holds the schedule (rates, streak, cooldown, history), so a run
resumed from a checkpoint continues the same schedule.
"""
from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol, cast

import pytorch_lightning as pl
import torch
from pytorch_lightning.utilities import rank_zero_warn
from torch import nn

from regfw.extend import INJECTED_PREFIX, is_dropout, planned_module, validate_dataclass
from regfw.extend import kinds as K

from . import AdaptiveDropoutConfig

__all__ = ["AdaptiveDropoutCallback", "Diagnosis", "Decision", "RateTarget", "diagnose", "rate_targets",
           "UNKNOWN_RANGE"]

logger = logging.getLogger("regfw.adaptive")

#: The range for an injected layer whose kind is unknown (not in a plan): the rates the dropout
#: paper explored for hidden and input units.
UNKNOWN_RANGE = K.RateRange(0.0, 0.5, 0.5)
UP, HOLD, DOWN = 1, 0, -1
#: Where the training loss comes from: eval mode on training batches, or the optimised loss.
TRAIN_LOSSES = ("clean", "noisy")
_STATE_VERSION = 1


@dataclass(frozen=True)
class Diagnosis:
    """What the losses say: ``direction`` +1 (raise rates), -1 (lower) or 0, and why."""

    direction: int
    reason: str


def diagnose(train_loss: float, val_loss: float, gap_threshold: float, loss_threshold: float | None = None,
             previous_train_loss: float | None = None, stall_delta: float | None = None) -> Diagnosis:
    """The rule of thumb as a function of the losses (see the module docstring for the order)."""
    gap = val_loss - train_loss
    if gap > gap_threshold:
        return Diagnosis(UP, f"overfitting: val_loss - train_loss = {gap:.4g} > gap_threshold {gap_threshold:g}")
    if loss_threshold is not None and train_loss > loss_threshold:
        return Diagnosis(DOWN, f"underfitting: train_loss {train_loss:.4g} > loss_threshold {loss_threshold:g}")
    if stall_delta is not None and previous_train_loss is not None and gap < gap_threshold / 2:
        drop = (previous_train_loss - train_loss) / max(abs(previous_train_loss), 1e-12)
        if drop < stall_delta:
            return Diagnosis(DOWN, f"underfitting: train_loss stalled ({previous_train_loss:.4g} -> "
                                   f"{train_loss:.4g}, {100 * drop:.2f}% < stall_delta {100 * stall_delta:g}%) "
                                   f"with val_loss - train_loss = {gap:.4g} < gap_threshold / 2")
    return Diagnosis(HOLD, f"balanced: val_loss - train_loss = {gap:.4g} <= gap_threshold {gap_threshold:g}")


class _Rated(Protocol):
    """A dropout-family module: its rate is the number ``p`` (see :func:`_has_rate`)."""

    p: float


@dataclass
class RateTarget:
    """One layer whose rate the callback moves: its path, kind and allowed range."""

    path: str
    kind: str | None
    low: float
    high: float
    module: nn.Module = field(repr=False, compare=False)

    @property
    def rate(self) -> float:
        return float(cast(_Rated, self.module).p)

    @rate.setter
    def rate(self, value: float) -> None:
        cast(_Rated, self.module).p = value


@dataclass
class Decision:
    """One validation's decision: the losses, the diagnosis, what moved (``{path: [old, new]}``)."""

    epoch: int
    global_step: int
    train_loss: float
    val_loss: float
    gap: float
    diagnosis: int
    action: str  #: ``raise``, ``lower``, ``wait`` (patience or cooldown), ``at_bound`` or ``hold``
    reason: str
    changes: dict = field(default_factory=dict)

    @property
    def moved(self) -> int:
        """+1, -1 or 0: the direction the rates actually moved."""
        return {"raise": UP, "lower": DOWN}.get(self.action, HOLD)


def _has_rate(module: nn.Module) -> bool:
    p = getattr(module, "p", None)
    return is_dropout(module) and isinstance(p, (int, float)) and not isinstance(p, bool)


def rate_targets(model: nn.Module, rows: Iterable[Any] = (), kinds: Sequence[str] | None = None,
                 min_rate: float | None = None, max_rate: float | None = None,
                 own_ranges: Mapping[str, K.OwnRanges] | None = None) -> list[RateTarget]:
    """The dropout modules regfw inserted in ``model`` or re-rated, with their kinds and ranges.

    ``rows`` are the plan rows (:meth:`regfw.placement.plan.Plan.rows`) that give each module its kind;
    injected modules no row accounts for (their child name starts with ``regfw_``) are added with
    kind ``input`` for ``regfw_input_*`` children and unknown otherwise (range
    :data:`UNKNOWN_RANGE`). A row's range is its regularizer's own (``own_ranges``: regularizer name
    -> its ``rate_ranges``, e.g. alpha dropout's 0.05-0.1) where it declares one for the kind, else
    the rate table's. ``kinds`` keeps only those kinds; ``min_rate``/``max_rate`` replace the ranges.
    """
    found: dict[int, RateTarget] = {}

    def add(path: str, module: nn.Module, kind: str | None, regularizer: str | None = None) -> None:
        if id(module) in found or not _has_rate(module):
            return
        own = (own_ranges or {}).get(regularizer or "", {})
        if kind is not None and (kind in own or kind in K.RATE_TABLE):
            rng = K.rate_range(kind, own)
        else:
            rng = UNKNOWN_RANGE
        low = rng.low if min_rate is None else float(min_rate)
        high = rng.high if max_rate is None else float(max_rate)
        found[id(module)] = RateTarget(path, kind, low, high, module)

    for row in rows:
        hit = planned_module(model, row)
        if hit is not None:
            add(hit[0], hit[1], row.kind, row.regularizer)
    for path, module in model.named_modules():
        name = path.rsplit(".", 1)[-1]
        if name.startswith(INJECTED_PREFIX):
            add(path, module, K.INPUT if name.startswith(INJECTED_PREFIX + "input_") else None)
    targets = list(found.values())
    if kinds is not None:
        targets = [t for t in targets if t.kind in set(kinds)]
    return targets


class AdaptiveDropoutCallback(pl.Callback):
    """Move the injected dropout rates up when overfitting and down when underfitting.

    See the module docstring for the rule. Use it through the ``adaptive_dropout`` regularizer
    (``regularizers: {dropout: {}, adaptive_dropout: {step: 0.05}}``) or pass it to a Trainer
    with a :class:`~regfw.train.module.RegularizedModule` (or any LightningModule with regfw-injected
    dropout).

    Args:
        config: the settings as one :class:`~regfw_plugins.adaptive.AdaptiveDropoutConfig` (what the
            ``adaptive_dropout`` regularizer passes); or give them as the keywords below, which are
            validated the same way (a :class:`~regfw.errors.ConfigError` naming
            ``AdaptiveDropout.<keyword>``).
        step: how much one move changes each rate (absolute: 0.3 becomes 0.35 with 0.05).
        patience: validations in a row with the same diagnosis before a move.
        gap_threshold: the validation-minus-training loss gap, in loss units, above which the
            model counts as overfitting.
        loss_threshold: a training loss above this counts as underfitting; None: not used.
        stall_delta: a relative fall of the training loss between validations below this, with a
            gap under ``gap_threshold / 2``, counts as underfitting; None: not used.
        monitor: the validation metric compared with the training loss.
        train_loss: ``"clean"`` (eval mode, dropout off) or ``"noisy"`` (the optimised loss).
        clean_every: measure the clean loss on every N-th training batch. Each costs one extra
            forward pass without gradients (about a third of a training step); raise N to save
            time at the price of a noisier estimate.
        loss_fn: ``loss(output, target)`` for the clean loss; default ``pl_module.loss_fn`` (a
            RegularizedModule has one). Without either the noisy loss is used, with a warning.
        cooldown: validations ignored after each move (to let the effect show).
        kinds: move only layers of these kinds (default: all).
        min_rate, max_rate: replace every kind's range from the rate table.
        log_file: name of the JSON-lines record of changes in the logger's directory (None: none).
        prefix: prefix of the logged metric names.
    """

    def __init__(self, config: AdaptiveDropoutConfig | None = None, *,
                 loss_fn: Callable[[Any, Any], torch.Tensor] | None = None,
                 log_file: str | None = "adaptive_dropout.jsonl", prefix: str = "adaptive_dropout/",
                 **settings: Any) -> None:
        super().__init__()
        if config is not None and settings:
            raise TypeError(f"AdaptiveDropoutCallback: give the settings as one AdaptiveDropoutConfig or as keywords, "
                            f"not both (got {sorted(settings)})")
        #: The validated settings; keywords go through the same validation as the config section.
        self.config: AdaptiveDropoutConfig = (
            config if config is not None else validate_dataclass(AdaptiveDropoutConfig, settings, "AdaptiveDropout"))
        self.loss_fn = loss_fn
        self.log_file = log_file
        self.prefix = prefix
        self.targets: list[RateTarget] = []
        self.history: list[Decision] = []
        self.streak = 0  #: validations in a row with diagnosis ``streak_direction``
        self.streak_direction = HOLD
        self.cooldown_left = 0
        self.previous_train_loss: float | None = None
        # the epoch's training-loss sum and count, kept as tensors on the loss's device so that no
        # training step waits for the device (they are read once per validation)
        self._loss_sum: torch.Tensor | float = 0.0
        self._loss_count: torch.Tensor | int = 0
        self._pending_rates: dict[str, float] | None = None
        self._warned: set[str] = set()
        self._clean_fn: Callable | None = None

    @property
    def state_key(self) -> str:
        """The checkpoint key of the schedule (the callback's name before it moved into the plugin)."""
        return "AdaptiveDropout"

    # ------------------------------------------------------------------ binding to a model

    def bind(self, module: nn.Module) -> list[RateTarget]:
        """Find the layers to move in ``module`` (a RegularizedModule, or any module).

        For a module with a ``plan`` and a ``model`` (a RegularizedModule) the plan rows give
        each layer's kind and paths are prefixed ``model.``. Rates loaded by
        :meth:`load_state_dict` are applied here.
        """
        model, prefix = module, ""
        plan = getattr(module, "plan", None)
        inner = getattr(module, "model", None)
        rows = plan.rows() if plan is not None and hasattr(plan, "rows") else []
        if isinstance(inner, nn.Module) and rows:
            model, prefix = inner, "model."
        regularizers = getattr(module, "regularizers", None) or ()
        own = {r.name: r.rate_ranges for r in regularizers if getattr(r, "rate_ranges", None)}
        targets = rate_targets(model, rows, self.config.kinds, self.config.min_rate, self.config.max_rate, own)
        for t in targets:
            t.path = prefix + t.path
        self.targets = targets
        self._apply_pending()
        return targets

    def _apply_pending(self) -> None:
        if self._pending_rates is None or not self.targets:
            return
        by_path = {t.path: t for t in self.targets}
        missing = [p for p in self._pending_rates if p not in by_path]
        if missing:
            rank_zero_warn(f"AdaptiveDropout: the checkpoint has rates for layers this model lacks: {missing}; "
                           f"they are ignored")
        for path, value in self._pending_rates.items():
            if path in by_path:
                by_path[path].rate = float(value)
        self._pending_rates = None

    def rates(self) -> dict[str, float]:
        """The current rate of every target layer, by path."""
        return {t.path: t.rate for t in self.targets}

    # ------------------------------------------------------------------ the decision

    def _moved_rate(self, target: RateTarget, direction: int) -> float:
        p = target.rate
        if direction == UP:
            new = max(p, min(p + self.config.step, target.high))
        else:
            new = min(p, max(p - self.config.step, target.low))
        return round(new, 6)

    def decide(self, train_loss: float, val_loss: float, epoch: int = 0, global_step: int = 0) -> Decision:
        """The decision for these losses given the current state; changes nothing."""
        gap = float(val_loss) - float(train_loss)
        diag = diagnose(float(train_loss), float(val_loss), self.config.gap_threshold, self.config.loss_threshold,
                        self.previous_train_loss, self.config.stall_delta)

        def decision(action: str, reason: str, changes: dict | None = None) -> Decision:
            return Decision(epoch, global_step, float(train_loss), float(val_loss), gap, diag.direction, action,
                            reason, changes or {})

        if self.cooldown_left > 0:
            return decision("wait", f"{diag.reason}; cooling down ({self.cooldown_left} validation(s) left)")
        if diag.direction == HOLD:
            return decision("hold", diag.reason)
        streak = self.streak + 1 if diag.direction == self.streak_direction else 1
        if streak < self.config.patience:
            return decision("wait", f"{diag.reason}; {streak}/{self.config.patience} validations in a row")
        changes = {}
        for t in self.targets:
            new = self._moved_rate(t, diag.direction)
            if new != round(t.rate, 6):
                changes[t.path] = [t.rate, new]
        if not changes:
            bound = "upper" if diag.direction == UP else "lower"
            return decision("at_bound", f"{diag.reason}; every rate is at its {bound} bound")
        verb = "raise" if diag.direction == UP else "lower"
        return decision(verb, f"{diag.reason}; {verb} {len(changes)} rate(s) by {self.config.step:g}", changes)

    def observe(self, train_loss: float, val_loss: float, epoch: int = 0, global_step: int = 0) -> Decision:
        """Decide, apply the decision to the target layers and the state, and record it."""
        d = self.decide(train_loss, val_loss, epoch, global_step)
        if self.cooldown_left > 0:
            self.cooldown_left -= 1
        elif d.diagnosis == HOLD:
            self.streak, self.streak_direction = 0, HOLD
        elif d.action == "wait":
            self.streak = self.streak + 1 if d.diagnosis == self.streak_direction else 1
            self.streak_direction = d.diagnosis
        else:  # a move, or a move blocked at the bound: the count restarts
            self.streak, self.streak_direction = 0, HOLD
            if d.changes:
                by_path = {t.path: t for t in self.targets}
                for path, (_, new) in d.changes.items():
                    by_path[path].rate = new
                self.cooldown_left = self.config.cooldown
        self.previous_train_loss = float(train_loss)
        self.history.append(d)
        level = logging.INFO if d.action in ("raise", "lower", "at_bound") else logging.DEBUG
        logger.log(level, "epoch %d step %d: %s (%s)%s", epoch, global_step, d.action, d.reason,
                   "".join(f"\n  {p}: {o:g} -> {n:g}" for p, (o, n) in d.changes.items()))
        return d

    # ------------------------------------------------------------------ Lightning hooks

    def _warn_once(self, key: str, message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            rank_zero_warn(message)

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self.bind(pl_module):
            rank_zero_warn(
                "AdaptiveDropout found no dropout layer inserted by regfw in "
                f"{type(pl_module).__name__}; nothing will be adapted. Select a dropout regularizer, "
                "e.g. `regularizers: {dropout: {}, adaptive_dropout: {}}`."
            )
        self._clean_fn = None
        if self.config.train_loss == "clean":
            self._clean_fn = self.loss_fn or getattr(pl_module, "loss_fn", None)
            if not callable(self._clean_fn):
                self._clean_fn = None
                self._warn_once("loss_fn", "AdaptiveDropout: train_loss='clean' needs loss_fn= or a "
                                           f"`loss_fn` attribute on {type(pl_module).__name__}; using the noisy "
                                           "training loss, which dropout inflates (the gap looks smaller)")

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._apply_pending()  # some strategies restore callback state after on_fit_start

    def _add(self, value: torch.Tensor) -> None:
        """Add one batch's loss (a non-finite one is left out) without a device sync."""
        v = value.detach().reshape(()).double()
        finite = torch.isfinite(v)
        self._loss_sum = self._loss_sum + torch.where(finite, v, torch.zeros_like(v))
        self._loss_count = self._loss_count + finite.long()

    @torch.no_grad()
    def _clean_loss(self, pl_module: pl.LightningModule, batch: Any) -> torch.Tensor | None:
        clean_fn = self._clean_fn
        if clean_fn is None:
            return None
        if not (isinstance(batch, (tuple, list)) and len(batch) >= 2):
            self._warn_once("batch", "AdaptiveDropout: train_loss='clean' expects (x, y) batches; using the "
                                     "noisy training loss")
            self._clean_fn = None
            return None
        saved = [(m, m.training) for m in pl_module.modules()]
        try:
            pl_module.eval()
            return clean_fn(pl_module(batch[0]), batch[1])
        finally:
            for m, flag in saved:
                m.training = flag

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        if self._clean_fn is not None and batch_idx % self.config.clean_every == 0:
            value = self._clean_loss(pl_module, batch)
            if value is not None:
                self._add(value)

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any,
                           batch: Any, batch_idx: int) -> None:
        if self._clean_fn is not None:
            return
        loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
        if isinstance(loss, torch.Tensor) and loss.numel() == 1:
            self._add(loss)

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking or int(self._loss_count) == 0:
            return
        val = trainer.callback_metrics.get(self.config.monitor)
        if val is None:
            known = ", ".join(sorted(trainer.callback_metrics)) or "(none)"
            self._warn_once("monitor", f"AdaptiveDropout: monitor {self.config.monitor!r} was not logged at "
                                       f"validation; logged metrics: {known}. Set `monitor` to one of them.")
            return
        train_loss = float(self._loss_sum) / int(self._loss_count)
        self._loss_sum, self._loss_count = 0.0, 0
        if trainer.world_size > 1:  # every process must take the same decision
            pair = torch.tensor([train_loss, float(val)], device=pl_module.device)
            train_loss, val_loss = (float(v) for v in trainer.strategy.reduce(pair, reduce_op="mean"))
        else:
            val_loss = float(val)
        self._apply_pending()
        d = self.observe(train_loss, val_loss, trainer.current_epoch, trainer.global_step)
        self._log(trainer, pl_module, d)

    def _log(self, trainer: pl.Trainer, pl_module: pl.LightningModule, d: Decision) -> None:
        pl_module.log(f"{self.prefix}decision", float(d.moved), on_step=False, on_epoch=True)
        pl_module.log(f"{self.prefix}gap", d.gap, on_step=False, on_epoch=True)
        pl_module.log(f"{self.prefix}train_loss", d.train_loss, on_step=False, on_epoch=True)
        by_kind: dict[str, list[float]] = {}
        for t in self.targets:
            by_kind.setdefault(t.kind or "other", []).append(t.rate)
        for kind, values in by_kind.items():
            pl_module.log(f"{self.prefix}rate/{kind}", sum(values) / len(values), on_step=False, on_epoch=True)
        if not d.changes or not trainer.is_global_zero:
            return
        text = d.reason + "".join(f"; {p}: {o:g} -> {n:g}" for p, (o, n) in d.changes.items())
        for lg in trainer.loggers:
            experiment = getattr(lg, "experiment", None)
            if experiment is not None and hasattr(experiment, "add_text"):  # TensorBoard
                experiment.add_text(f"{self.prefix}changes", text, trainer.global_step)
        if self.log_file and trainer.loggers and trainer.log_dir:
            os.makedirs(trainer.log_dir, exist_ok=True)
            with open(os.path.join(trainer.log_dir, self.log_file), "a") as fh:
                fh.write(json.dumps(asdict(d)) + "\n")

    # ------------------------------------------------------------------ checkpoint state

    def state_dict(self) -> dict[str, Any]:
        """Everything the schedule depends on: rates, streak, cooldown, losses, history."""
        rates = self.rates() if self.targets else dict(self._pending_rates or {})
        return {
            "version": _STATE_VERSION,
            "rates": rates,
            "streak": self.streak,
            "streak_direction": self.streak_direction,
            "cooldown_left": self.cooldown_left,
            "previous_train_loss": self.previous_train_loss,
            "loss_sum": float(self._loss_sum),
            "loss_count": int(self._loss_count),
            "history": [asdict(d) for d in self.history],
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore the schedule; the rates are applied to the model when it is bound."""
        version = state_dict.get("version")
        if version != _STATE_VERSION:
            raise ValueError(f"AdaptiveDropout: checkpoint state version {version!r} is not {_STATE_VERSION}; "
                             f"it was written by another regfw version")
        self.streak = int(state_dict["streak"])
        self.streak_direction = int(state_dict["streak_direction"])
        self.cooldown_left = int(state_dict["cooldown_left"])
        prev = state_dict["previous_train_loss"]
        self.previous_train_loss = None if prev is None else float(prev)
        self._loss_sum = float(state_dict["loss_sum"])
        self._loss_count = int(state_dict["loss_count"])
        self.history = [Decision(**d) for d in state_dict["history"]]
        self._pending_rates = {str(k): float(v) for k, v in state_dict["rates"].items()}
        self._apply_pending()
