"""``RegularizedModule``: a LightningModule that trains any ``nn.Module`` with regularizers."""
from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import pytorch_lightning as pl
import torch
from torch import nn

from regfw import __version__
from regfw.build.factory import build_model
from regfw.errors import ConfigError, NonFiniteLossError
from regfw.extend.contract import check_callbacks, check_groups
from regfw.extend.regularizer import Regularizer
from regfw.model_io import OutputKey, call_model, check_output_key, example_from_spec, example_spec, select_output
from regfw.placement.plan import Plan, apply_plan, make_plan
from regfw.placement.surgery import is_dropout
from regfw.registry.discovery import origin_of
from regfw.registry.regularizers import build_regularizers, section_key
from regfw.run.checkpoints import seal_in_hook
from regfw.run.stopping import EvaluationStop
from regfw.train.batch import BatchFormat, split_batch
from regfw.train.epoch_metrics import EpochMeans
from regfw.train.losses import check_model_loss, loss_function, loss_hparam, loss_task, task_is_known
from regfw.train.optim import (
    build_optimizer,
    optimizers_and_schedulers,
    scheduler_config,
    split_groups,
)
from regfw.train.steps import MixedTargets, regularized_step

#: The values of ``run.on_nan`` (the ``on_nan`` argument).
ON_NAN = ("stop", "skip", "ignore")


def _regularizer_section(regularizers: Any) -> dict:
    if regularizers is None:
        return {}
    if isinstance(regularizers, Mapping):
        return dict(regularizers)
    section = {}
    for reg in regularizers:
        if not isinstance(reg, Regularizer):
            raise ConfigError(f"regularizers: expected Regularizer objects or a mapping, got {reg!r}")
        section[section_key(reg)] = dataclasses.asdict(reg.config)
    return section


class RegularizedModule(pl.LightningModule):
    """Train ``model`` with the selected regularizers applied.

    The regularizers are applied when the module is built, from the serialisable settings kept
    in ``hparams``, so ``RegularizedModule.load_from_checkpoint(path)`` rebuilds the same
    structure (pass ``model=`` again for a model that was not built from a config).

    Args:
        model: any ``nn.Module`` (None: build it from ``model_config``).
        loss: ``"cross_entropy"`` (classification), ``"mse"`` or ``"gaussian_nll"`` (regression),
            a loss class or function path (``"torch.nn.HuberLoss"``, or ``{"class_path": ...,
            "init_args": {...}}``), or a callable ``loss(output, target)``.
        regularizers: a ``regularizers:`` config mapping (``{"dropout": {"hidden": 0.3}}``) or
            :class:`~regfw.Regularizer` objects.
        optimizer: ``{"name": "adam", "lr": 1e-3, "weight_decay": 0, "momentum": 0}``, or any
            optimizer as ``{"class_path": "torch.optim.AdamW", "init_args": {"lr": 1e-3}}``, or a
            callable taking the parameter groups (``functools.partial(torch.optim.SGD, lr=0.1)``).
            It always receives the regularizers' parameter groups.
        lr_scheduler: ``{"class_path": ..., "init_args": {...}, "interval": "epoch"|"step",
            "frequency": 1, "monitor": "val_loss"}`` (Lightning's scheduler settings), or None.
        task: ``"classification"`` or ``"regression"``; None: classification for cross-entropy
            and NLL losses, regression otherwise.
        n_examples: training-set size, for the rate policy.
        example_input: one input batch; the forward call order decides which layer is the input
            and which the output layer. A tensor, a dict of keyword arguments or a tuple of
            positional arguments (:func:`regfw.model_io.call_model`); only the shapes and dtypes
            are kept (``input_shape``/``input_dtype``: dicts of them for a dict).
        model_config: ``{"name"|"class_path": ..., "init_args": {...}}`` to rebuild the model.
        on_nan: what a NaN or infinite training loss does (``run.on_nan``; see :attr:`on_nonfinite`).
            Kept in ``hparams``, so a module loaded from a checkpoint keeps it.
        batch: where inputs and targets sit in a batch, a :class:`~regfw.train.batch.BatchFormat` or
            ``{"inputs": KEY_OR_INDEX, "targets": KEY_OR_INDEX}`` (default ``(inputs, targets)``;
            a dict batch such as Hugging Face's: the dict minus its label keys as the model's
            keyword arguments, ``labels`` as the targets; see :mod:`regfw.train.batch`).
        output_key: which tensor of the model's output the loss and the metrics read
            (:func:`regfw.model_io.select_output`): None (a tensor; else a Hugging Face
            ``ModelOutput``'s or a dict's ``logits``; else the lone tensor), a key, a position,
            or a callable (not kept in ``hparams``: pass it again when loading).
        plan: the plan of ``regularizers`` already applied to ``model`` (what
            :func:`regfw.build.fit.build_fit` passes, having built everything once); None: the
            module makes the plan on ``example_input`` and applies it.

    Each training step runs :func:`regfw.train.steps.regularized_step`: the regularizers' batch
    transforms, the forward pass, the (transformed) loss, their loss terms. Logged per epoch:
    ``train_loss`` (the data loss, after the batch and loss transforms, without the terms),
    ``train_penalty`` (the sum of the terms) and ``train_penalty/<name>`` (each term); the loss
    that is backpropagated is ``train_loss + train_penalty``.
    """

    def __init__(
        self,
        model: nn.Module | None = None,
        loss: str | Mapping[str, Any] | Callable = "cross_entropy",
        regularizers: Mapping[str, Any] | Sequence[Regularizer] | None = None,
        optimizer: Mapping[str, Any] | Callable | None = None,
        n_examples: int | None = None,
        example_input: Any = None,
        model_config: Mapping[str, Any] | None = None,
        input_shape: Sequence[int] | Mapping[str, Any] | None = None,
        input_dtype: str | Mapping[str, Any] | None = None,
        on_nan: str = "ignore",
        batch: BatchFormat | Mapping[str, Any] | None = None,
        lr_scheduler: Mapping[str, Any] | None = None,
        task: str | None = None,
        output_key: OutputKey = None,
        plan: Plan | None = None,
    ) -> None:
        super().__init__()
        if on_nan not in ON_NAN:
            raise ConfigError(f"run.on_nan: got {on_nan!r}, expected one of {', '.join(ON_NAN)}.")
        self.batch_format = BatchFormat.coerce(batch)
        if example_input is not None and not isinstance(example_input, (torch.Tensor, Mapping, tuple)):
            raise TypeError(
                f"example_input: got {type(example_input).__name__}, expected one input batch as a tensor, a dict of "
                f"keyword arguments or a tuple of positional arguments (its shapes and dtypes are kept for the "
                f"checkpoint). For a model taking a list (detection), plan it with "
                f"regfw.placement.plan.make_plan(model, regularizers, example_input=...), which accepts a tensor, a "
                f"tuple of positional arguments, a dict of keyword arguments or a list"
            )
        self.output_key = check_output_key(output_key)
        if example_input is not None:
            input_shape, input_dtype = example_spec(example_input)
        section = _regularizer_section(regularizers)
        hparams = {
            "loss": loss_hparam(loss),
            "regularizers": section,
            "optimizer": (dict(optimizer) if isinstance(optimizer, Mapping) else
                          loss_hparam(optimizer) if optimizer is not None else {"name": "adam", "lr": 1e-3}),
            "n_examples": n_examples,
            "model_config": dict(model_config) if model_config else None,
            "input_shape": input_shape,
            "input_dtype": input_dtype,
            "on_nan": on_nan,
            "batch": self.batch_format.as_dict(),
        }
        # recorded only when set, so checkpoints written before these settings existed still match
        recorded_key = output_key if isinstance(output_key, (str, int)) else None
        for key, value in (("lr_scheduler", dict(lr_scheduler) if lr_scheduler else None), ("task", task),
                           ("output_key", recorded_key)):
            if value is not None:
                hparams[key] = value
        self.save_hyperparameters(hparams)
        self._optimizer_spec = optimizer
        self.on_nonfinite = on_nan
        if model is None:
            if not model_config:
                raise ConfigError("RegularizedModule: pass `model=` (an nn.Module) or `model_config=`.")
            model = build_model(model_config)
        check_model_loss(model)
        self.model = model
        self.loss_fn = loss_function(loss)
        if task not in (None, "classification", "regression"):
            raise ConfigError(f"task: got {task!r}, expected 'classification' or 'regression' (or None to infer it "
                              f"from the loss).")
        self.task = task or loss_task(self.loss_fn)
        #: What the step methods are told (``Step.task``): unknown for a custom loss function, unless
        #: ``task`` says it or the loss is one whose task is known (cross-entropy, NLL, the shorthands).
        self.step_task: str | None = self.task if task is not None or task_is_known(loss, self.loss_fn) else None
        if input_shape is not None:
            self.example_input_array = example_from_spec(input_shape, input_dtype)
        # objects given: used as they are (built once by the caller); a mapping: built here, once
        self.regularizers: list[Regularizer]
        if regularizers is None or isinstance(regularizers, Mapping):
            self.regularizers = build_regularizers(section)
        else:
            self.regularizers = list(regularizers)
        if plan is None:
            plan = make_plan(model, self.regularizers, n_examples, self.example_input_array)
            apply_plan(model, self.regularizers, plan)
        self.plan: Plan = plan

    # -- forward and steps -----------------------------------------------------------------------
    def forward(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        """The model's output tensor (selected by ``output_key``). ``module(inputs)`` with one batch's
        inputs calls the model as :func:`regfw.model_io.call_model` does (a dict as keyword
        arguments, a tuple as positional ones); ``module(**kwargs)`` and ``module(a, b)`` pass
        them on as they are (what Lightning does with a dict or tuple ``example_input_array``)."""
        if len(args) == 1 and not kwargs:
            out = call_model(self.model, args[0])
        else:
            out = self.model(*args, **kwargs)
        return select_output(out, self.output_key)

    def _log_step(self, stage: str, out: torch.Tensor, y: Any, loss: torch.Tensor) -> None:
        # accumulated on the device, logged once per epoch (see _log_epoch): a per-step
        # self.log(sync_dist=True) cost more than the whole step of a small model
        n = len(y)
        self._epoch_means.add(f"{stage}_loss", loss, n)
        if self.task == "classification":
            pred = out.argmax(-1)
            if isinstance(y, MixedTargets):  # mixup: the accuracy against each target, weighted
                acc = y.lam * (pred == y.first).float().mean() + (1 - y.lam) * (pred == y.second).float().mean()
            else:
                acc = (pred == y).float().mean()
            self._epoch_means.add(f"{stage}_acc", acc, n)
        if self._last_batch(stage):  # logged from the step, so callbacks see them at epoch end
            self._log_epoch(stage)

    def _last_batch(self, stage: str) -> bool:
        """Whether the running step is the last of its epoch (Lightning's data fetcher knows it
        before the step). Outside a Trainer, or where it cannot know, the epoch-end hooks log."""
        if self._trainer is None:
            return False
        try:
            loop = self.trainer.fit_loop.epoch_loop if stage == "train" else self.trainer._evaluation_loop
            return bool(loop.batch_progress.is_last_batch)
        except (AttributeError, RuntimeError):
            return False

    @property
    def _epoch_means(self) -> EpochMeans:
        means = self.__dict__.get("_regfw_epoch_means")
        if means is None:
            means = self.__dict__["_regfw_epoch_means"] = EpochMeans()
        return means

    def _log_epoch(self, stage: str) -> None:
        """Log the epoch means of ``*_loss``, ``*_acc`` and ``train_penalty``: under DDP the mean
        over every example of every rank (one all_reduce of all sums and counts), not rank 0's shard."""
        means = self._epoch_means.pop(self.trainer.strategy if self._trainer is not None else None, f"{stage}_")
        for name, value in means.items():
            # already global: sync_dist=True only tells Lightning so (the mean of equal values)
            self.log(name, value, on_step=False, on_epoch=True, prog_bar=not name.startswith("train_penalty"),
                     sync_dist=True)

    def on_train_epoch_start(self) -> None:
        self._epoch_means.pop(prefix="train_")  # nothing left over from an interrupted epoch

    def on_train_epoch_end(self) -> None:
        self._log_epoch("train")  # an epoch cut short (max_steps), or no last-batch signal

    @property
    def _evaluation_stop(self) -> EvaluationStop:
        stop = self.__dict__.get("_regfw_evaluation_stop")
        if stop is None:
            stop = self.__dict__["_regfw_evaluation_stop"] = EvaluationStop()
        return stop

    # A SIGTERM during an evaluation epoch stops it at once (the MC callback's T passes over a batch
    # can take seconds, and Lightning looks at the signal only between batches): regfw.run.stopping.
    def on_validation_epoch_start(self) -> None:
        self._epoch_means.pop(prefix="val_")
        self._evaluation_stop.start(self._trainer)

    def on_validation_epoch_end(self) -> None:
        self._evaluation_stop.stop()
        self._log_epoch("val")

    def on_test_epoch_start(self) -> None:
        self._epoch_means.pop(prefix="test_")
        self._evaluation_stop.start(self._trainer)

    def on_test_epoch_end(self) -> None:
        self._evaluation_stop.stop()
        self._log_epoch("test")

    def split_batch(self, batch: Any) -> tuple[Any, Any]:
        """``(inputs, targets)`` of a batch by the module's :class:`~regfw.train.batch.BatchFormat`
        (what the MC callback, evaluation, active learning and predict use)."""
        return self._split(batch)

    def _split(self, batch: Any) -> tuple[Any, Any]:
        x, y = split_batch(batch, self.batch_format)
        if y is None:
            raise ConfigError(f"batch: found no targets in a {type(batch).__name__} batch; RegularizedModule needs "
                              f"(inputs, targets); set batch={{'targets': ...}} to where they are.")
        return x, y

    def _shared_step(self, batch: Any, stage: str) -> torch.Tensor:
        x, y = self._split(batch)
        out = self(x)
        loss = self.loss_fn(out, y)
        self._log_step(stage, out, y, loss)
        return loss

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor | None:
        x, y = self._split(batch)
        result = regularized_step(self.regularizers, self.model, x, y, self.loss_fn, forward=self,
                                  batch_idx=batch_idx, task=self.step_task, module=self)
        loss = result.total
        # checked before anything is logged, so a skipped batch leaves no NaN in the epoch metrics
        if self.on_nonfinite != "ignore" and not self._loss_is_finite(loss):
            self._nonfinite_loss(loss, batch_idx)
            return None
        if result.terms:  # before _log_step, which logs the epoch at its last batch
            n = len(y)
            self._epoch_means.add("train_penalty", torch.stack(list(result.terms.values())).sum(), n)
            for name, term in result.terms.items():
                self._epoch_means.add(f"train_penalty/{name}", term, n)
        self._log_step("train", result.outputs, result.targets, result.data_loss)
        return loss

    #: What a NaN or infinite training loss does: ``"stop"`` raises
    #: :class:`~regfw.errors.NonFiniteLossError` before the update (the weights stay finite),
    #: ``"skip"`` leaves that batch out (no update), ``"ignore"`` trains on it. Set from the
    #: ``on_nan`` argument (``regfw fit``: ``run.on_nan``), which ``hparams`` keeps.
    on_nonfinite: str = "ignore"

    def _loss_is_finite(self, loss: torch.Tensor) -> bool:
        finite = bool(torch.isfinite(loss.detach()).all())
        if self._trainer is not None and self.trainer.world_size > 1:  # every rank stops together
            finite = self.trainer.strategy.reduce_boolean_decision(finite, all=True)
        return finite

    def _nonfinite_loss(self, loss: torch.Tensor, batch_idx: int) -> None:

        step, epoch = (self.trainer.global_step, self.current_epoch) if self._trainer is not None else (-1, -1)
        where = f"step {step} (epoch {epoch}, batch {batch_idx})"
        if self.on_nonfinite == "stop":
            raise NonFiniteLossError(f"the training loss is {float(loss.detach().float().mean())} at {where}; "
                                     f"training stopped before that update", step=step, epoch=epoch,
                                     batch_idx=batch_idx)
        self.nonfinite_skipped = getattr(self, "nonfinite_skipped", 0) + 1
        from pytorch_lightning.utilities import rank_zero_warn

        rank_zero_warn(f"regfw: the training loss is {float(loss.detach().float().mean())} at {where}; that batch is "
                       f"skipped (run.on_nan=skip), {self.nonfinite_skipped} so far")
        return None

    def validation_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        return self._shared_step(batch, "val")

    def test_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        return self._shared_step(batch, "test")

    # -- optimizer and callbacks -----------------------------------------------------------------
    def param_groups(self) -> tuple[str | None, list[dict]]:
        """The regularizer that defines the optimizer's parameter groups (at most one may) and
        its groups; ``(None, [all trainable parameters])`` when none does."""
        found = [(reg.name, g) for reg in self.regularizers
                 if (g := check_groups(reg, reg.param_groups(self.model))) is not None]
        if len(found) > 1:
            raise ConfigError(
                f"regularizers: {found[0][0]!r} and {found[1][0]!r} both define optimizer parameter groups; "
                f"select only one of them"
            )
        if found:
            return found[0]
        return None, [{"params": [p for p in self.model.parameters() if p.requires_grad]}]

    def configure_optimizers(self) -> Any:
        """The configured optimizer over the regularizers' parameter groups, with the configured
        learning-rate scheduler in Lightning's ``{"optimizer", "lr_scheduler"}`` form."""
        owner, groups = self.param_groups()
        spec = self._optimizer_spec if callable(self._optimizer_spec) else self.hparams["optimizer"]
        optimizer = build_optimizer(spec, groups, owner)
        scheduler = scheduler_config(self.hparams.get("lr_scheduler"), optimizer)
        if scheduler is None:
            return optimizer
        return {"optimizer": optimizer, "lr_scheduler": scheduler}

    def setup(self, stage: str) -> None:
        """Give the regularizers' parameter groups to an optimizer configured from outside: LightningCLI's
        ``optimizer:``/``lr_scheduler:`` sections replace ``configure_optimizers`` on the instance,
        building the optimizer over ``self.parameters()`` in one group."""
        outside = self.__dict__.get("configure_optimizers")
        if outside is None or getattr(outside, "_regfw_groups", False):
            return
        owner, groups = self.param_groups()
        if owner is None:
            return

        def configure_optimizers() -> Any:
            result = outside()
            optimizers, schedulers = optimizers_and_schedulers(result)
            for optimizer in optimizers:
                split_groups(optimizer, groups, owner, [s for s in schedulers if s.optimizer is optimizer])
            return result

        configure_optimizers._regfw_groups = True  # type: ignore[attr-defined]
        self.configure_optimizers = configure_optimizers  # type: ignore[method-assign]

    def configure_callbacks(self) -> list[pl.Callback]:
        return [cb for reg in self.regularizers for cb in check_callbacks(reg, reg.callbacks())]

    def on_save_checkpoint(self, checkpoint: dict) -> None:

        checkpoint["regfw"] = {
            "version": __version__,
            "regularizers": sorted(self.hparams["regularizers"]),
            "model_class": f"{type(self.model).__module__}.{type(self.model).__qualname__}",
            "plugins": _plugin_origins(self.regularizers),
            # rates are plain attributes, not state: a rate schedule's current values resume from here
            "rates": {name: float(m.p) for name, m in self.model.named_modules()
                      if is_dropout(m) and isinstance(getattr(m, "p", None), (int, float))},
        }
        checkpoint["regfw_epoch_means"] = self._epoch_means.state_dict()  # a mid-epoch checkpoint's sums

        seal_in_hook(checkpoint, self._trainer)  # a Trainer without regfw's AtomicCheckpointIO keeps it too

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        if "regfw_epoch_means" in checkpoint:
            self._epoch_means.load_state_dict(checkpoint["regfw_epoch_means"])
        modules = dict(self.model.named_modules())
        for name, p in ((checkpoint.get("regfw") or {}).get("rates") or {}).items():
            if name in modules and is_dropout(modules[name]):
                modules[name].p = p


def _plugin_origins(regularizers: Sequence[Regularizer]) -> dict:
    """Which plugin (and distribution, version) provided each regularizer, for checkpoint metadata."""

    out = {}
    for reg in regularizers:
        info = origin_of(type(reg).__module__)
        out[section_key(reg)] = ({"plugin": info.name, "distribution": info.distribution, "version": info.version}
                         if info else {"plugin": None, "module": type(reg).__module__})
    return out
