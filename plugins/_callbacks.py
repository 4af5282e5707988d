"""Lightning callbacks of the built-in weight regularizers (``weight_decay``, ``max_norm``).

Kept apart from the plugin modules so that plugin discovery never imports Lightning: the
regularizers import this module only when a Trainer asks for their callbacks.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytorch_lightning as pl
import torch


class DecoupledWeightDecayCallback(pl.Callback):
    """Decoupled weight decay for optimizers that do not decay decoupled themselves.

    Runs :func:`regfw_plugins.weight_decay.decoupled_decay_` at ``on_before_optimizer_step``,
    that is after the backward pass and before the step, where AdamW applies its decay.
    Lightning calls that hook once per real optimizer step (not per accumulated batch).
    """

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                                 optimizer: torch.optim.Optimizer) -> None:
        from regfw_plugins.weight_decay import decoupled_decay_

        decoupled_decay_(optimizer)


class StepPostHookCallback(pl.Callback):
    """Call ``fn()`` after every ``optimizer.step()`` of the fit.

    Registers ``fn`` with ``torch.optim.Optimizer.register_step_post_hook`` on each of the
    trainer's optimizers at ``on_fit_start`` and removes it when the fit ends, so it runs
    exactly once per optimizer step (never for a batch that only accumulates gradients, and
    never for a step that AMP skipped), with manual optimization too.
    """

    def __init__(self, fn: Callable[[], Any]) -> None:
        self.fn = fn
        self._handles: list = []

    def _hook(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        self.fn()

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._remove()
        self._handles = [opt.register_step_post_hook(self._hook) for opt in trainer.optimizers]

    def _remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._remove()

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._remove()

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_handles"] = []
        return state


class LearnedRatesCallback(pl.Callback):
    """Log rates that are learned (``concrete_dropout``) once per epoch and print them at the end.

    ``rates(model)`` returns ``{layer path: rate}`` for the module's ``model`` (a
    RegularizedModule's network, or the LightningModule itself). Logged as ``NAME/rate/<path>``.
    """

    def __init__(self, name: str, rates: Callable[[Any], dict]) -> None:
        self.name = name
        self.rates = rates
        self.last: dict = {}

    def _rates(self, pl_module: pl.LightningModule) -> dict:
        model = getattr(pl_module, "model", pl_module)
        return self.rates(model)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.last = self._rates(pl_module)
        for path, value in self.last.items():
            pl_module.log(f"{self.name}/rate/{path}", value, on_step=False, on_epoch=True)

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.last = self._rates(pl_module)
        if trainer.is_global_zero and self.last:
            print(f"{self.name}: learned rates " + ", ".join(f"{p} {v:.4f}" for p, v in self.last.items()))
