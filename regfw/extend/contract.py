"""Checks of what a regularizer's methods return, made where the host calls them.

A wrong answer (``describe()`` returning a string, ``penalty()`` a list of floats) is a
:class:`~regfw.errors.PluginError` naming the regularizer, its plugin and the method, with what
was expected, instead of a confusing failure later (a plan printed one character per line).
The checks are ``isinstance`` tests, cheap enough for every training step.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

import torch

from regfw.errors import PluginError, short_repr
from regfw.placement.plan_items import PlanItem
from regfw.registry.discovery import origin_of


class Regularizer(Protocol):
    """A regularizer as the checks see it: a named object (the base classes import this module)."""

    name: str


def who(reg: Regularizer) -> str:
    """``regularizer 'x' (plugin 'p', module.Class)``: how errors name a regularizer."""
    cls = type(reg)
    info = origin_of(cls.__module__)
    plugin = f"plugin {info.name!r}, " if info is not None else ""
    return f"regularizer {getattr(reg, 'name', '') or cls.__name__!r} ({plugin}{cls.__module__}.{cls.__qualname__})"


def bad_return(reg: Regularizer, method: str, value: Any, expected: str) -> PluginError:
    """The error for ``reg.method(...)`` returning ``value`` instead of ``expected``."""
    return PluginError(f"{who(reg)}: {method}() returned {type(value).__name__} {short_repr(value, 60)}, "
                       f"expected {expected}. Fix the plugin's {method} method.")


def check_lines(reg: Regularizer, value: Any, method: str = "describe") -> list[str]:
    """``describe()``: a list (or tuple) of strings."""
    if value is None:
        return []
    if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
        raise bad_return(reg, method, value, "a list of strings (one per line of `regfw plan`)")
    return list(value)


def check_items(reg: Regularizer, value: Any) -> list:
    """``plan()``: a list of :class:`~regfw.extend.regularizer.PlanItem`."""
    if value is None:
        return []
    if not isinstance(value, (list, tuple)) or not all(isinstance(v, PlanItem) for v in value):
        raise bad_return(reg, "plan", value, "a list of regfw.PlanItem")
    return list(value)


def check_groups(reg: Regularizer, value: Any) -> list[dict] | None:
    """``param_groups()``: None or a list of dicts, each with ``params``."""
    if value is None:
        return None
    if not isinstance(value, (list, tuple)) or not all(isinstance(g, dict) and "params" in g for g in value):
        raise bad_return(reg, "param_groups", value, "None or a list of dicts with a 'params' key")
    return list(value)


def check_callbacks(reg: Regularizer, value: Any) -> list:
    """``callbacks()``: a list of Lightning callbacks."""
    if value is None:
        return []
    if not isinstance(value, (list, tuple)):
        raise bad_return(reg, "callbacks", value, "a list of pytorch_lightning.Callback")
    import pytorch_lightning as pl

    if not all(isinstance(cb, pl.Callback) for cb in value):
        raise bad_return(reg, "callbacks", value, "a list of pytorch_lightning.Callback")
    return list(value)


def check_claims(reg: Regularizer, value: Any) -> tuple[str, ...]:
    """``claims()``: a tuple of layer-kind names."""
    if isinstance(value, str) or not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
        raise bad_return(reg, "claims", value, "a tuple of layer kinds such as ('hidden', 'conv')")
    return tuple(value)


def check_term(reg: Regularizer, value: Any, method: str = "loss_term") -> torch.Tensor | None:
    """``loss_term()`` / ``penalty()``: None or a tensor with one element."""
    if value is None:
        return None
    if not isinstance(value, torch.Tensor) or value.numel() != 1:
        raise bad_return(reg, method, value, "None or a scalar torch.Tensor (one element) that is part of the graph")
    return value


def check_transformed_batch(reg: Regularizer, value: Any) -> tuple[Any, Any]:
    """``transform_batch()``: an ``(inputs, targets)`` pair."""
    if not isinstance(value, tuple) or len(value) != 2:
        raise bad_return(reg, "transform_batch", value, "a tuple (inputs, targets)")
    return value


def check_loss_fn(reg: Regularizer, value: Any) -> Callable:
    """``transform_loss()``: a callable ``loss(outputs, targets)``."""
    if not callable(value):
        raise bad_return(reg, "transform_loss", value, "a callable loss(outputs, targets) -> tensor")
    return value
