"""Losses: the one place that knows them.

``model.loss`` (and ``RegularizedModule(loss=...)``) takes a shorthand (:data:`LOSS_NAMES`), ``auto``
(decided by the data's ``task``), a loss class or function path (``torch.nn.HuberLoss``, or
``{class_path, init_args}``), or a callable ``loss(output, target)``. This module checks such a spec
(before torch is imported, so a config error answers at once), resolves ``auto``, says which task a
loss trains, how many outputs per target it needs, how Monte Carlo dropout reads a model trained with
it, and turns the spec into the function the training step calls.
"""
from __future__ import annotations

import inspect
import typing
from collections.abc import Callable, Mapping
from typing import Any

from regfw.config.imports import import_class
from regfw.errors import ConfigError, closest_hint

#: The loss shorthands of ``model.loss`` and the task each trains.
LOSS_TASKS: dict[str, str] = {"cross_entropy": "classification", "mse": "regression", "gaussian_nll": "regression"}
#: The loss shorthands of ``model.loss``.
LOSS_NAMES = tuple(LOSS_TASKS)
#: The shorthands that train a regression model.
REGRESSION_LOSSES = tuple(name for name, task in LOSS_TASKS.items() if task == "regression")
#: The shorthand whose model predicts a mean and a variance per target (two outputs each).
GAUSSIAN = "gaussian_nll"

LossSpec = str | Mapping[str, Any] | Callable


def check_loss_spec(spec: Any, key: str = "model.loss") -> None:
    """A :class:`ConfigError` for a ``model.loss`` that is neither a shorthand, ``auto``, a dotted
    path nor ``{class_path, init_args}``."""
    if isinstance(spec, Mapping):
        if not isinstance(spec.get("class_path"), str) or set(spec) - {"class_path", "init_args"}:
            raise ConfigError(f"{key}: got {dict(spec)!r}, expected {{class_path: ..., init_args: {{...}}}}.")
        return
    if not isinstance(spec, str) or (spec not in (*LOSS_NAMES, "auto") and "." not in spec):
        raise ConfigError(f"{key}: got {spec!r}, expected auto, one of {', '.join(LOSS_NAMES)}, or a class path "
                          f"such as torch.nn.HuberLoss.{closest_hint(str(spec), list(LOSS_NAMES))}")


def resolve_loss(spec: Any, data_task: str | None) -> Any:
    """``spec`` with ``auto`` decided by the data's task (``mse`` for regression, else ``cross_entropy``)."""
    if spec != "auto":
        return spec
    return "mse" if data_task == "regression" else "cross_entropy"


def check_loss_fits_data(spec: Any, data_task: str | None, data_name: str) -> None:
    """A :class:`ConfigError` when a shorthand loss trains the other task than the data's."""
    task = LOSS_TASKS.get(spec) if isinstance(spec, str) else None
    if task is None or data_task not in LOSS_TASKS.values() or task == data_task:
        return
    if data_task == "classification":
        raise ConfigError(f"model.loss: got {spec!r}, a regression loss, but data {data_name!r} is a classification "
                          f"task; use cross_entropy (or auto).", key="model.loss")
    raise ConfigError(f"model.loss: got {spec!r}, a classification loss, but data {data_name!r} is a regression "
                      f"task; use {' or '.join(REGRESSION_LOSSES)} (or auto).", key="model.loss")


def outputs_per_target(spec: Any) -> int:
    """How many model outputs one target needs: 2 for ``gaussian_nll`` (mean and raw variance), else 1."""
    return 2 if spec == GAUSSIAN else 1


def mc_output_transform(spec: Any) -> Callable | None:
    """What Monte Carlo dropout applies to the outputs of a model trained with ``spec``: the
    ``(mean, variance)`` split of a ``gaussian_nll`` model (the one the loss trained), else None."""
    if spec != GAUSSIAN:
        return None
    from regfw.tensors import split_mean_variance  # torch: imported when a loss is used, not when checked

    return split_mean_variance


def gaussian_nll(output: Any, target: Any) -> Any:
    """Gaussian NLL for a model whose last dimension holds ``[mean, raw variance]`` halves."""
    import torch.nn.functional as F

    from regfw.tensors import split_mean_variance

    mean, variance = split_mean_variance(output)
    return F.gaussian_nll_loss(mean, target, variance)


def loss_function(spec: LossSpec) -> Callable:
    """The loss function ``loss(output, target)`` of a spec: a shorthand, a class or function path
    (``{class_path, init_args}`` or a dotted string), or a callable (returned as it is)."""
    if callable(spec) and not isinstance(spec, Mapping):
        return spec
    check_loss_spec(spec)
    if isinstance(spec, str) and "." not in spec:
        import torch.nn.functional as F

        table: dict[str, Callable] = {"cross_entropy": F.cross_entropy, "mse": F.mse_loss, GAUSSIAN: gaussian_nll}
        if spec not in table:  # `auto`: decided by the data, which a module built by hand does not have
            raise ConfigError(f"model.loss: got {spec!r}, expected one of {', '.join(LOSS_NAMES)}, a class path "
                              f"such as torch.nn.HuberLoss, or a callable.")
        return table[spec]
    path, init_args = (spec["class_path"], spec.get("init_args") or {}) if isinstance(spec, Mapping) else (spec, {})
    obj = import_class(path, "model.loss")
    if inspect.isclass(obj):
        try:
            return typing.cast(Callable, obj(**dict(init_args)))
        except TypeError as exc:
            raise ConfigError(f"model.loss.init_args: {obj.__name__}({', '.join(map(str, init_args))}) failed: "
                              f"{exc}") from None
    if init_args or not callable(obj):
        raise ConfigError(f"model.loss: {path!r} is not a class; init_args need a loss class such as "
                          f"torch.nn.CrossEntropyLoss.")
    return typing.cast(Callable, obj)


def loss_task(loss_fn: Callable) -> str:
    """``classification`` for cross-entropy and NLL losses (functions or modules), else ``regression``."""
    import torch.nn.functional as F
    from torch import nn

    if loss_fn in (F.cross_entropy, F.nll_loss) or isinstance(loss_fn, (nn.CrossEntropyLoss, nn.NLLLoss)):
        return "classification"
    return "regression"


def task_is_known(spec: LossSpec, loss_fn: Callable) -> bool:
    """Whether the task of ``spec`` is known rather than guessed: a shorthand, or a classification
    loss (a custom loss function trains whatever its author meant)."""
    return (isinstance(spec, str) and spec in LOSS_TASKS) or loss_task(loss_fn) == "classification"


def loss_hparam(spec: LossSpec) -> Any:
    """What ``hparams.loss`` records: the spec itself, or a callable's import path (so a reloaded
    module finds it again), or ``"custom"`` for one that cannot be imported by name."""
    if isinstance(spec, str):
        return spec
    if isinstance(spec, Mapping):
        return {"class_path": spec["class_path"], "init_args": dict(spec.get("init_args") or {})}
    module, name = getattr(spec, "__module__", None), getattr(spec, "__qualname__", "")
    if module and name and "<" not in name:
        return f"{module}.{name}"
    return getattr(spec, "__name__", "custom")


def check_model_loss(model: Any) -> None:
    """A :class:`ConfigError` for a model whose forward computes its own losses in training (a
    detection model taking targets), which ``loss(model(inputs), targets)`` cannot train."""
    from regfw.placement.structure import own_loss_forward

    own_loss = own_loss_forward(model)
    if own_loss is None:
        return
    raise ConfigError(
        f"model: {type(model).__name__}.forward takes {own_loss!r} and computes its own losses in training "
        f"(a detection model), which RegularizedModule's step loss(model(inputs), targets) cannot train. "
        f"Regularize it with regfw.placement.plan.make_plan(model, regularizers, example_input=[image, ...]) and "
        f"apply_plan, then train it in your own loop or LightningModule: loss = sum(model(images, targets).values())")
