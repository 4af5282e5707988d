"""Optimizers and learning-rate schedulers from config specs, in Lightning's conventions.

The ``optimizer:`` and ``lr_scheduler:`` sections take ``class_path`` and ``init_args`` exactly
as a LightningCLI config does (a bare class name is looked up in ``torch.optim`` and
``torch.optim.lr_scheduler``, as LightningCLI does); the scheduler adds Lightning's
``interval``, ``frequency`` and ``monitor``. The short names (``optimizer.name: adam``) stay as
shorthands. Losses: :mod:`regfw.train.losses`.

The optimizer always receives the parameter groups of the selected regularizers (for example
weight decay's decay / no-decay groups), whichever class it is.
"""
from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from regfw.config.imports import import_class
from regfw.errors import ConfigError

#: The optimizer shorthands of ``optimizer.name``.
OPTIMIZERS: dict[str, type] = {"adam": torch.optim.Adam, "adamw": torch.optim.AdamW, "sgd": torch.optim.SGD,
                               "rmsprop": torch.optim.RMSprop}


def _import(path: str, key: str, search: tuple[str, ...] = ()) -> Any:

    if "." not in path:
        for module in search:
            found = getattr(__import__(module, fromlist=[path]), path, None)
            if found is not None:
                return found
        where = " or ".join(search) or "an importable module"
        raise ConfigError(f"{key}: got {path!r}, which is not a class of {where}; give a dotted path such as "
                          f"'torch.optim.AdamW' or 'mypkg.optim.MyOptimizer'.")
    return import_class(path, key)


def _construct(cls: Any, first: Any, init_args: Mapping[str, Any], key: str) -> Any:
    try:
        return cls(first, **dict(init_args))
    except TypeError as exc:
        raise ConfigError(f"{key}.init_args: {getattr(cls, '__name__', cls)}({', '.join(map(str, init_args))}) "
                          f"failed: {exc}") from None


def optimizer_spec(cfg: Any) -> dict:
    """The serialisable optimizer spec of an ``OptimizerConfig``: ``{"class_path", "init_args"}``
    when a class path is set, else the shorthand ``{"name", "lr", "weight_decay", "momentum"}``."""
    if getattr(cfg, "class_path", None):
        return {"class_path": cfg.class_path, "init_args": dict(cfg.init_args)}
    return {k: getattr(cfg, k) for k in ("name", "lr", "weight_decay", "momentum")}


def optimizer_settings(spec: Mapping[str, Any] | Callable) -> tuple[Any, dict, str]:
    """``(optimizer class or callable, keyword arguments, config key)`` of an optimizer spec."""
    if callable(spec) and not isinstance(spec, Mapping):
        return spec, {}, "optimizer"
    cfg = dict(spec)
    if cfg.get("class_path"):
        extra = sorted(set(cfg) - {"class_path", "init_args"})
        if extra:
            raise ConfigError(f"optimizer.{extra[0]}: with optimizer.class_path, put {extra[0]} in "
                              f"optimizer.init_args (Lightning's convention).")
        cls = _import(cfg["class_path"], "optimizer.class_path", ("torch.optim",))
        return cls, dict(cfg.get("init_args") or {}), "optimizer"
    cfg.pop("class_path", None)
    cfg.pop("init_args", None)
    name = cfg.pop("name", "adam") or "adam"
    if name not in OPTIMIZERS:
        raise ConfigError(f"optimizer.name: got {name!r}, expected one of {', '.join(OPTIMIZERS)} "
                          f"(or optimizer.class_path for any other optimizer).")
    if name not in ("sgd", "rmsprop") or not cfg.get("momentum"):
        cfg.pop("momentum", None)
    return OPTIMIZERS[name], cfg, "optimizer"


def build_optimizer(spec: Mapping[str, Any] | Callable, groups: list[dict], owner: str | None) -> torch.optim.Optimizer:
    """The optimizer of ``spec`` over the parameter ``groups`` (from regularizer ``owner``, if any).

    A weight decay given to the optimizer while ``owner``'s groups set their own is refused: the
    weights would be decayed twice (or the regularizer's exclusions silently undone).
    """
    cls, kwargs, key = optimizer_settings(spec)
    if kwargs.get("weight_decay") and any("weight_decay" in g for g in groups):
        where = "optimizer.init_args.weight_decay" if "class_path" in (spec if isinstance(spec, Mapping) else {}) \
            else "optimizer.weight_decay"
        raise ConfigError(
            f"{where}={kwargs['weight_decay']:g} and regularizers.{owner} both decay the weights (its parameter "
            f"groups set their own weight_decay); set {where}: 0 or remove regularizers.{owner}."
        )
    if not kwargs and not inspect.isclass(cls):
        return cls(groups)  # a callable such as functools.partial(torch.optim.AdamW, lr=...)
    return _construct(cls, groups, kwargs, key)


def scheduler_config(spec: Mapping[str, Any] | None, optimizer: torch.optim.Optimizer) -> dict | None:
    """Lightning's ``lr_scheduler`` dict (scheduler, interval, frequency, monitor) for ``spec``."""
    if not spec:
        return None
    cfg = dict(spec)
    if not cfg.get("class_path"):
        raise ConfigError("lr_scheduler.class_path: missing; give a scheduler such as "
                          "torch.optim.lr_scheduler.CosineAnnealingLR with its init_args (or remove lr_scheduler).")
    cls = _import(cfg["class_path"], "lr_scheduler.class_path", ("torch.optim.lr_scheduler",))
    scheduler = _construct(cls, optimizer, cfg.get("init_args") or {}, "lr_scheduler")
    interval = cfg.get("interval", "epoch")
    if interval not in ("epoch", "step"):
        raise ConfigError(f"lr_scheduler.interval: got {interval!r}, expected 'epoch' or 'step'.")
    out = {"scheduler": scheduler, "interval": interval, "frequency": int(cfg.get("frequency", 1))}
    if cfg.get("monitor"):
        out["monitor"] = cfg["monitor"]
    return out


def optimizers_and_schedulers(configured: Any) -> tuple[list[torch.optim.Optimizer], list[Any]]:
    """The optimizers and schedulers in any of the forms ``configure_optimizers`` may return."""
    optimizers: list[torch.optim.Optimizer] = []
    schedulers: list[Any] = []

    def visit(item: Any) -> None:
        if isinstance(item, torch.optim.Optimizer):
            optimizers.append(item)
        elif isinstance(item, Mapping):
            for key in ("optimizer", "lr_scheduler", "scheduler"):
                if key in item:
                    visit(item[key])
        elif isinstance(item, (list, tuple)):
            for sub in item:
                visit(sub)
        elif hasattr(item, "optimizer") and hasattr(item, "step"):
            schedulers.append(item)

    visit(configured)
    return optimizers, schedulers


def _default_weight_decay(optimizer: torch.optim.Optimizer) -> float | None:
    param = inspect.signature(type(optimizer).__init__).parameters.get("weight_decay")
    return None if param is None or param.default is inspect.Parameter.empty else float(param.default)


def split_groups(optimizer: torch.optim.Optimizer, groups: list[dict], owner: str,
                 schedulers: Sequence[Any] = ()) -> None:
    """Split each of ``optimizer``'s parameter groups by the regularizer's ``groups``.

    Every new group keeps the user's group settings, plus the regularizer's group keys
    (``weight_decay`` and its markers); every per-group list of the ``schedulers``
    (``base_lrs``, ``min_lrs``, ``lr_lambdas`` ...) is repeated to match. A user's group whose
    ``weight_decay`` is neither 0 nor the optimizer's default, beside a regularizer group that
    sets its own, is a :class:`ConfigError`: the weights would be decayed twice, or the
    regularizer's exclusions (biases, norms) undone.
    """
    if any(optimizer.state.values()):
        raise ConfigError(f"Regularize: the optimizer already took steps; regularizers.{owner} needs its parameter "
                          f"groups before the first step.")
    group_of = {id(p): g for g in groups for p in g["params"]}
    default_wd = _default_weight_decay(optimizer)
    new_groups: list[dict] = []
    origin: list[int] = []
    for index, user in enumerate(optimizer.param_groups):
        by_reg: dict[int, list[nn.Parameter]] = {}
        for p in user["params"]:
            reg_group = group_of.get(id(p))
            by_reg.setdefault(-1 if reg_group is None else next(i for i, g in enumerate(groups) if g is reg_group),
                              []).append(p)
        for key, params in by_reg.items():
            settings = {k: v for k, v in user.items() if k != "params"}
            if key >= 0:
                extra = {k: v for k, v in groups[key].items() if k != "params"}
                wd = float(user.get("weight_decay", 0.0) or 0.0)
                if "weight_decay" in extra and wd and wd != default_wd and wd != extra["weight_decay"]:
                    raise ConfigError(
                        f"Regularize: the optimizer's weight_decay={wd:g} and regularizers.{owner} both decay the "
                        f"weights (its parameter groups set their own weight_decay); leave weight_decay at the "
                        f"optimizer's default in configure_optimizers or remove regularizers.{owner}.")
                settings.update(extra)
            new_groups.append({"params": params, **settings})
            origin.append(index)
    n_old = len(optimizer.param_groups)
    optimizer.param_groups = new_groups
    for scheduler in schedulers:
        for attr, value in vars(scheduler).items():
            if isinstance(value, list) and len(value) == n_old and attr != "optimizer":
                setattr(scheduler, attr, [value[i] for i in origin])
