"""``RegularizedModule``: a LightningModule that trains any ``nn.Module`` with regularizers."""
from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch import nn

from regfw.batch import BatchFormat, split_batch
from regfw.contract import check_callbacks, check_groups
from regfw.errors import ConfigError
from regfw.plan import Plan, apply_plan, make_plan
from regfw.regularizer import Regularizer
from regfw.steps import MixedTargets, regularized_step
from regfw.surgery import is_dropout
from regfw.tensors import split_mean_variance  # the split MC dropout uses too (run.py passes it)

LOSSES = ("cross_entropy", "mse", "gaussian_nll")
#: The values of ``run.on_nan`` (the ``on_nan`` argument).
ON_NAN = ("stop", "skip", "ignore")


def gaussian_nll(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Gaussian NLL for a model whose last dimension holds ``[mean, raw variance]`` halves."""
    mean, variance = split_mean_variance(output)
    return F.gaussian_nll_loss(mean, target, variance)


def _loss_fn(loss: str | Callable) -> Callable:
    if callable(loss):
        return loss
    table = {"cross_entropy": F.cross_entropy, "mse": F.mse_loss, "gaussian_nll": gaussian_nll}
    if loss not in table:
        raise ConfigError(f"model.loss: got {loss!r}, expected one of {', '.join(LOSSES)} or a callable.")
    return table[loss]


def _regularizer_section(regularizers: Any) -> dict:
    if regularizers is None:
        return {}
    if isinstance(regularizers, Mapping):
        return dict(regularizers)
    section = {}
    for reg in regularizers:
        if not isinstance(reg, Regularizer):
            raise ConfigError(f"regularizers: expected Regularizer objects or a mapping, got {reg!r}")
        section[reg.name] = dataclasses.asdict(reg.config)
    return section


class RegularizedModule(pl.LightningModule):
    """Train ``model`` with the selected regularizers applied.

    The regularizers are applied when the module is built, from the serialisable settings kept
    in ``hparams``, so ``RegularizedModule.load_from_checkpoint(path)`` rebuilds the same
    structure (pass ``model=`` again for a model that was not built from a config).

    Args:
        model: any ``nn.Module`` (None: build it from ``model_config``).
        loss: ``"cross_entropy"`` (classification), ``"mse"`` or ``"gaussian_nll"`` (regression),
            or a callable ``loss(output, target)``.
        regularizers: a ``regularizers:`` config mapping (``{"dropout": {"hidden": 0.3}}``) or
            :class:`~regfw.Regularizer` objects.
        optimizer: ``{"name": "adam", "lr": 1e-3, "weight_decay": 0, "momentum": 0}``.
        n_examples: training-set size, for the rate policy.
        example_input: one input batch; the forward call order decides which layer is the input
            and which the output layer. Only its shape and dtype are kept.
        model_config: ``{"name"|"class_path": ..., "init_args": {...}}`` to rebuild the model.
        on_nan: what a NaN or infinite training loss does (``run.on_nan``; see :attr:`on_nonfinite`).
            Kept in ``hparams``, so a module loaded from a checkpoint keeps it.
        batch: where inputs and targets sit in a batch, a :class:`~regfw.batch.BatchFormat` or
            ``{"inputs": KEY_OR_INDEX, "targets": KEY_OR_INDEX}`` (default ``(inputs, targets)``).

    Each training step runs :func:`regfw.steps.regularized_step`: the regularizers' batch
    transforms, the forward pass, the (transformed) loss, their loss terms. Logged per epoch:
    ``train_loss`` (the data loss, after the batch and loss transforms, without the terms),
    ``train_penalty`` (the sum of the terms) and ``train_penalty/<name>`` (each term); the loss
    that is backpropagated is ``train_loss + train_penalty``.
    """

    def __init__(
        self,
        model: nn.Module | None = None,
        loss: str | Callable = "cross_entropy",
        regularizers: Mapping[str, Any] | Sequence[Regularizer] | None = None,
        optimizer: Mapping[str, Any] | None = None,
        n_examples: int | None = None,
        example_input: torch.Tensor | None = None,
        model_config: Mapping[str, Any] | None = None,
        input_shape: Sequence[int] | None = None,
        input_dtype: str | None = None,
        on_nan: str = "ignore",
        batch: BatchFormat | Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__()
        if on_nan not in ON_NAN:
            raise ConfigError(f"run.on_nan: got {on_nan!r}, expected one of {', '.join(ON_NAN)}.")
        self.batch_format = BatchFormat.coerce(batch)
        if example_input is not None:
            input_shape, input_dtype = list(example_input.shape), str(example_input.dtype).replace("torch.", "")
        section = _regularizer_section(regularizers)
        self.save_hyperparameters({
            "loss": loss if isinstance(loss, str) else getattr(loss, "__name__", "custom"),
            "regularizers": section,
            "optimizer": dict(optimizer or {"name": "adam", "lr": 1e-3}),
            "n_examples": n_examples,
            "model_config": dict(model_config) if model_config else None,
            "input_shape": input_shape,
            "input_dtype": input_dtype,
            "on_nan": on_nan,
            "batch": self.batch_format.as_dict(),
        })
        self.on_nonfinite = on_nan
        if model is None:
            if not model_config:
                raise ConfigError("RegularizedModule: pass `model=` (an nn.Module) or `model_config=`.")
            from regfw.factory import build_model

            model = build_model(model_config)
        self.model = model
        self.loss_fn = _loss_fn(loss)
        self.task = "classification" if loss == "cross_entropy" else "regression"
        #: What the step methods are told (``Step.task``): unknown for a custom loss function.
        self.step_task: str | None = None if callable(loss) else self.task
        if input_shape is not None:
            self.example_input_array = torch.zeros(input_shape, dtype=getattr(torch, input_dtype or "float32"))
        from regfw.registry import build_regularizers

        # objects given: used as they are (built once by the caller); a mapping: built here, once
        self.regularizers: list[Regularizer]
        if regularizers is None or isinstance(regularizers, Mapping):
            self.regularizers = build_regularizers(section)
        else:
            self.regularizers = list(regularizers)
        self.plan: Plan = make_plan(model, self.regularizers, n_examples, self.example_input_array)
        apply_plan(model, self.regularizers, self.plan)

    # -- forward and steps -----------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)

    def _log_step(self, stage: str, out: torch.Tensor, y: Any, loss: torch.Tensor) -> None:
        n = len(y)
        self.log(f"{stage}_loss", loss, on_step=False, on_epoch=True, prog_bar=True, batch_size=n,
                 sync_dist=True)  # under DDP: the mean over every rank, not rank 0's shard
        if self.task == "classification":
            pred = out.argmax(-1)
            if isinstance(y, MixedTargets):  # mixup: the accuracy against each target, weighted
                acc = y.lam * (pred == y.first).float().mean() + (1 - y.lam) * (pred == y.second).float().mean()
            else:
                acc = (pred == y).float().mean()
            self.log(f"{stage}_acc", acc, on_step=False, on_epoch=True, prog_bar=True, batch_size=n,
                     sync_dist=True)

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
        self._log_step("train", result.outputs, result.targets, result.data_loss)
        if result.terms:
            n = len(y)
            penalty = torch.stack(list(result.terms.values())).sum()
            self.log("train_penalty", penalty, on_step=False, on_epoch=True, batch_size=n, sync_dist=True)
            for name, term in result.terms.items():
                self.log(f"train_penalty/{name}", term.detach(), on_step=False, on_epoch=True, batch_size=n)
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
        from regfw.errors import NonFiniteLossError

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

    def configure_optimizers(self) -> torch.optim.Optimizer:
        cfg = dict(self.hparams.optimizer)
        name = cfg.pop("name", "adam")
        classes = {"adam": torch.optim.Adam, "adamw": torch.optim.AdamW, "sgd": torch.optim.SGD,
                   "rmsprop": torch.optim.RMSprop}
        if name not in classes:
            raise ConfigError(f"optimizer.name: got {name!r}, expected one of {', '.join(classes)}.")
        if name not in ("sgd", "rmsprop"):
            cfg.pop("momentum", None)
        elif not cfg.get("momentum"):
            cfg.pop("momentum", None)
        owner, groups = self.param_groups()
        if cfg.get("weight_decay") and any("weight_decay" in g for g in groups):
            raise ConfigError(
                f"optimizer.weight_decay={cfg['weight_decay']:g} and regularizers.{owner} both decay the "
                f"weights (its parameter groups set their own weight_decay); set optimizer.weight_decay: 0 "
                f"or remove regularizers.{owner}."
            )
        return classes[name](groups, **cfg)

    def configure_callbacks(self) -> list[pl.Callback]:
        return [cb for reg in self.regularizers for cb in check_callbacks(reg, reg.callbacks())]

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        from regfw import __version__

        checkpoint["regfw"] = {
            "version": __version__,
            "regularizers": sorted(self.hparams.regularizers),
            "model_class": f"{type(self.model).__module__}.{type(self.model).__qualname__}",
            "plugins": _plugin_origins(self.regularizers),
            # rates are plain attributes, not state: a rate schedule's current values resume from here
            "rates": {name: float(m.p) for name, m in self.model.named_modules()
                      if is_dropout(m) and isinstance(getattr(m, "p", None), (int, float))},
        }

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        modules = dict(self.model.named_modules())
        for name, p in ((checkpoint.get("regfw") or {}).get("rates") or {}).items():
            if name in modules and is_dropout(modules[name]):
                modules[name].p = p


def _plugin_origins(regularizers: Sequence[Regularizer]) -> dict:
    """Which plugin (and distribution, version) provided each regularizer, for checkpoint metadata."""
    from regfw.plugins import origin_of

    out = {}
    for reg in regularizers:
        info = origin_of(type(reg).__module__)
        out[reg.name] = ({"plugin": info.name, "distribution": info.distribution, "version": info.version}
                         if info else {"plugin": None, "module": type(reg).__module__})
    return out
