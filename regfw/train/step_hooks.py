"""Lightning callbacks that run a regularizer's function at one point of every optimizer step.

Public (listed in ``docs/plugins.md``): a regularizer's ``callbacks()`` returns one of these with
its own function, so that a plugin never writes a Lightning callback for the common cases. This
module imports Lightning; plugins import it inside ``callbacks()``, which only a fit calls, so
plugin discovery stays light.

* :class:`BeforeOptimizerStepCallback` -- ``fn(optimizer)`` after the backward pass, before the step
  (where AdamW applies its decay): Lightning's ``on_before_optimizer_step``, once per real
  optimizer step (not per accumulated batch).
* :class:`StepPostHookCallback` -- ``fn()`` after every ``optimizer.step()`` (constraints such as
  max-norm), through ``torch.optim.Optimizer.register_step_post_hook``.
* :class:`LearnedRatesCallback` -- log rates a regularizer learns (``concrete_dropout``) once per
  epoch and print them when the fit ends.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytorch_lightning as pl
import torch

__all__ = ["BeforeOptimizerStepCallback", "StepPostHookCallback", "LearnedRatesCallback"]


class BeforeOptimizerStepCallback(pl.Callback):
    """Call ``fn(optimizer)`` at ``on_before_optimizer_step``: after the backward pass, before the step.

    ``fn`` should be picklable (a module-level function or a bound method of a picklable object),
    since checkpoints and DDP spawn pickle callbacks.
    """

    def __init__(self, fn: Callable[[torch.optim.Optimizer], Any]) -> None:
        self.fn = fn

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                                 optimizer: torch.optim.Optimizer) -> None:
        self.fn(optimizer)


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
