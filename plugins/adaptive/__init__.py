"""The ``adaptive_dropout`` regularizer: the dropout rates follow the train/validation gap.

Selecting it adds an :class:`~regfw_plugins.adaptive.callback.AdaptiveDropoutCallback` to the fit: at each
validation it raises the rates of the dropout layers regfw inserted when the model overfits
(validation loss above training loss by more than ``gap_threshold``) and lowers them when it
underfits (training loss above ``loss_threshold``, or stalled while the gap is small), by
``step`` after ``patience`` validations in a row, within each layer kind's range of the rate
table. The training loss is measured with dropout off (``train_loss: clean``) so that it
compares with the validation loss. It inserts nothing itself, so it needs a regularizer that does
(``dropout`` or another of the dropout family)::

    regularizers:
      dropout: {}
      adaptive_dropout: {step: 0.05, patience: 2, gap_threshold: 0.1}

One feature, one plugin package: this module holds the settings (validated once, here) and the
regularizer; :mod:`regfw_plugins.adaptive.callback` the Lightning callback and the rule, which
take these settings as one object. Lightning is imported only when the fit asks for the
callback, never at plugin discovery.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from torch import nn

from regfw.extend import (
    RATE_KINDS,
    ConfigError,
    InjectingRegularizer,
    Regularizer,
    get_registry,
    hookimpl,
    is_active,
    nonneg,
    positive,
    rate,
)


@dataclass
class AdaptiveDropoutConfig:
    """Settings of the rate schedule (see :class:`~regfw_plugins.adaptive.callback.AdaptiveDropoutCallback`).

    The one validation of these settings: the config section and the callback's keyword
    constructor both go through :func:`regfw.config.schema.validate_dataclass` with this class.
    """

    #: How much one move changes each rate (absolute).
    step: float = field(default=0.05, metadata={"range": (0.0, 1.0, "(0, 1)", "exclusive"),
                                                "doc": "rate change per move"})
    #: Validations in a row with the same diagnosis before a move.
    patience: int = positive(2, doc="validations in a row before a move")
    #: The train/validation loss gap (loss units) that counts as over- or underfitting.
    gap_threshold: float = nonneg(0.1, doc="loss gap that counts as over/underfitting")
    #: A training loss above this counts as underfitting (null: not used).
    loss_threshold: float | None = nonneg(None, doc="training loss that counts as underfitting")
    #: A relative fall of the training loss between validations below this, with a gap under
    #: gap_threshold / 2, counts as underfitting (null: not used).
    stall_delta: float | None = nonneg(0.01, doc="relative training-loss fall that counts as a stall")
    #: ``clean``: the training loss in eval mode (dropout off), comparable with the validation loss;
    #: ``noisy``: the loss the optimizer minimised (dropout on, penalties included).
    train_loss: Literal["clean", "noisy"] = "clean"
    #: Measure the clean training loss on every N-th training batch.
    clean_every: int = positive(1, doc="clean training loss on every N-th batch")
    #: Validations ignored after a move.
    cooldown: int = nonneg(0, doc="validations ignored after a move")
    #: The validation metric compared with the training loss.
    monitor: str = "val_loss"
    #: Move only layers of these kinds (null: all).
    kinds: list[str] | None = None
    #: Replace every kind's range from the rate table.
    min_rate: float | None = rate(doc="lowest rate (null: each kind's range)")
    max_rate: float | None = rate(doc="highest rate (null: each kind's range)")

    def __post_init__(self) -> None:
        # ValueErrors: validate_dataclass reports them under the section's key.
        if self.kinds is not None:
            unknown = [k for k in self.kinds if k not in RATE_KINDS]
            if unknown:
                raise ValueError(f"kinds: got {unknown}, expected kinds among {', '.join(RATE_KINDS)}")
        if self.min_rate is not None and self.max_rate is not None and self.min_rate > self.max_rate:
            raise ValueError(f"min_rate {self.min_rate} is above max_rate {self.max_rate}; swap them or remove one")


class AdaptiveDropout(Regularizer):
    """Raise dropout rates when overfitting, lower them when underfitting, during the fit."""

    name = "adaptive_dropout"
    description = "moves the injected dropout rates with the train/validation gap, within each kind's range"
    Config = AdaptiveDropoutConfig

    def callbacks(self) -> list:
        from .callback import AdaptiveDropoutCallback

        return [AdaptiveDropoutCallback(self.config)]

    def check(self, config: Any) -> None:
        """A schedule needs layers to move: some selected regularizer must insert modules."""
        registry = get_registry()
        injecting = [name for name in config.regularizers if name in registry.specs
                     and issubclass(registry.specs[name].cls, InjectingRegularizer)]
        if not injecting:
            raise ConfigError(
                "regularizers.adaptive_dropout: adapts the rates of dropout layers that another regularizer "
                f"inserts, but none of the selected ones ({', '.join(config.regularizers)}) inserts any. "
                "Add one, e.g. `regularizers: {dropout: {}, adaptive_dropout: {}}`."
            )

        for name in injecting:
            cls = registry.specs[name].cls
            kinds = set(getattr(cls, "kinds", ()))
            if self.config.kinds is not None and not kinds & set(self.config.kinds):
                continue
            settings = config.regularizers[name] or {}
            if is_active(settings.get("schedule")):
                raise ConfigError(
                    f"regularizers.{name}.schedule and regularizers.adaptive_dropout both set the rates of "
                    f"{name}'s layers (a schedule fixes each rate as a function of training time); remove one, "
                    f"or keep adaptive_dropout off those kinds with regularizers.adaptive_dropout.kinds")
            if getattr(cls, "learns_rates", False):
                raise ConfigError(
                    f"regularizers.{name} learns its rates by gradient descent and regularizers.adaptive_dropout "
                    f"would move them too; remove one, or keep adaptive_dropout off {name}'s kinds "
                    f"({', '.join(sorted(kinds))}) with regularizers.adaptive_dropout.kinds")

    def describe(self, model: nn.Module) -> list[str]:
        c = self.config
        under = []
        if c.loss_threshold is not None:
            under.append(f"train loss > {c.loss_threshold:g}")
        if c.stall_delta is not None:
            under.append(f"train loss falls < {100 * c.stall_delta:g}% with gap < {c.gap_threshold / 2:g}")
        bounds = ("each kind's range" if c.min_rate is None and c.max_rate is None
                  else f"[{c.min_rate if c.min_rate is not None else 'kind low'}, "
                       f"{c.max_rate if c.max_rate is not None else 'kind high'}]")
        lower = f", lower them if {' or '.join(under)}" if under else ""
        return [f"at each validation: raise rates by {c.step:g} if {c.monitor} - {c.train_loss} train loss > "
                f"{c.gap_threshold:g}{lower}; after {c.patience} validation(s) in a row, within {bounds}"]


@hookimpl
def regfw_register_regularizers(register):
    register(AdaptiveDropout)
