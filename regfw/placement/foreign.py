"""Stochastic layers regfw did not write: recognised, sampled by MC dropout and reused by plans.

Models from torchvision and timm bring their own stochastic layers, and some models call dropout
functionally inside a ``forward``. regfw treats all of them like its own layers: a plan sets their
rate (``existing: override``) or leaves it (``keep``) instead of adding a second layer at the same
place, and Monte Carlo dropout switches them on. Recognised:

========================================== =============== ===========================================
layer                                      rate attribute  how it is recognised
========================================== =============== ===========================================
torch's dropout family (``nn.Dropout*``,   ``p``           type (``nn.modules.dropout._DropoutNd``)
``nn.AlphaDropout``, ...)
torchvision ``StochasticDepth``            ``p``           class name and module path (``torchvision.``)
timm ``DropPath``                          ``drop_prob``   class name and module path (``timm.``)
timm ``DropBlock2d``                       ``drop_prob``   class name and module path (``timm.``)
``F.dropout``, ``F.dropout1d/2d/3d``,      the call's      a forward (:func:`watch_functional_dropout`)
``F.alpha_dropout``,                       ``p``
``F.feature_alpha_dropout`` in a forward
========================================== =============== ===========================================

Nothing here imports timm or torchvision: a module is matched by its class name and the package
its class comes from, so planning a plain torch model never loads them.

Some modules are random in training mode only through their *own* ``training`` flag, not through
a dropout child's: ``nn.TransformerEncoderLayer`` in eval mode takes a fused fast path that skips
its dropout children, timm's ``Attention`` passes ``dropout_p=attn_drop.p if self.training else 0``
to fused attention, and a ``forward`` calling ``F.dropout(x, p, self.training)`` reads its own
flag. :func:`mc_train_modules` lists those hosts; :func:`regfw.uncertainty.mc_mode` puts them in
training mode too (their other children keep their own flags, so BatchNorm stays in eval).
"""
from __future__ import annotations

import contextlib
import weakref
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class ForeignLayer:
    """One recognised foreign stochastic layer class."""

    package: str  #: top-level package its class comes from
    name: str  #: class name
    rate_attr: str  #: the attribute holding its rate
    what: str  #: ``element``, ``path`` (per-sample stochastic depth) or ``block``


#: Foreign stochastic layer classes, matched by package and class name (no import).
FOREIGN_LAYERS: tuple[ForeignLayer, ...] = (
    ForeignLayer("torchvision", "StochasticDepth", "p", "path"),
    ForeignLayer("timm", "DropPath", "drop_prob", "path"),
    ForeignLayer("timm", "DropBlock2d", "drop_prob", "block"),
)

#: The functional dropout calls a traced forward is watched for.
FUNCTIONAL_DROPOUT = (F.dropout, F.dropout1d, F.dropout2d, F.dropout3d, F.alpha_dropout, F.feature_alpha_dropout)
#: Their names, as a traced forward reports them.
FUNCTIONAL_NAMES = frozenset(f.__name__ for f in FUNCTIONAL_DROPOUT)

#: Modules found calling functional dropout: module -> (function name, rate). Weak, so a model's
#: modules are not kept alive by being recorded.
_FUNCTIONAL_HOSTS: weakref.WeakKeyDictionary[nn.Module, tuple[str, float]] = weakref.WeakKeyDictionary()
#: Models whose forward has been watched, with their module count then (a changed model is watched again).
_SCANNED: weakref.WeakKeyDictionary[nn.Module, int] = weakref.WeakKeyDictionary()
#: Bumped whenever ``_FUNCTIONAL_HOSTS`` gains a host or a host's rate changes, so that what is
#: computed from it (:func:`regfw.uncertainty.modes.model_index`) knows when to look again.
_generation = 0


def functional_generation() -> int:
    """A counter that changes whenever the recorded functional-dropout hosts or their rates change."""
    return _generation


def foreign_layer(module: nn.Module) -> ForeignLayer | None:
    """The :class:`ForeignLayer` entry ``module`` is an instance of (by its class's MRO), or None."""
    for cls in type(module).__mro__:
        package = cls.__module__.split(".", 1)[0]
        for entry in FOREIGN_LAYERS:
            if cls.__name__ == entry.name and package == entry.package and hasattr(module, entry.rate_attr):
                return entry
    return None


def is_foreign_stochastic(module: nn.Module) -> bool:
    """A stochastic layer of torchvision or timm (any rate), or a module calling functional dropout."""
    return foreign_layer(module) is not None or module in _FUNCTIONAL_HOSTS


def rate_attr(module: nn.Module) -> str | None:
    """The attribute holding the rate of a dropout-family module (``p``, timm's ``drop_prob``,
    ``nn.MultiheadAttention``'s ``dropout``), or None when it has none."""
    entry = foreign_layer(module)
    if entry is not None:
        return entry.rate_attr
    if isinstance(module, nn.MultiheadAttention):
        return "dropout"
    if module in _FUNCTIONAL_HOSTS:
        return _functional_rate_attr(module)
    return "p" if hasattr(module, "p") else None


def get_rate(module: nn.Module) -> float | None:
    """The rate of a dropout-family module (a functional call's ``p`` for a host), or None."""
    if module in _FUNCTIONAL_HOSTS and _functional_rate_attr(module) is None:
        return _FUNCTIONAL_HOSTS[module][1]
    attr = rate_attr(module)
    if attr is None:
        return None
    value = getattr(module, attr, None)
    try:
        return float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None


def set_rate(module: nn.Module, rate: float) -> None:
    """Set the rate of a dropout-family module; a ``ValueError`` naming the module when it has no
    rate attribute regfw can set (a functional call whose rate is a constant in the code)."""
    attr = rate_attr(module)
    if attr is None:
        raise ValueError(f"{type(module).__name__} has no rate attribute regfw can set (its dropout rate is fixed "
                         f"in its forward); use existing: keep for this model")
    global _generation
    setattr(module, attr, float(rate))
    if module in _FUNCTIONAL_HOSTS:
        _FUNCTIONAL_HOSTS[module] = (_FUNCTIONAL_HOSTS[module][0], float(rate))
        _generation += 1


def is_batch_shared(module: nn.Module) -> bool:
    """True for a foreign layer drawing one mask for the whole batch (torchvision
    ``StochasticDepth(mode="batch")``, timm ``DropBlock2d(batchwise=True)``): repeated rows in one
    pass would all see the same mask."""
    entry = foreign_layer(module)
    if entry is None:
        return False
    if entry.name == "StochasticDepth":
        return getattr(module, "mode", "row") == "batch"
    if entry.name == "DropBlock2d":
        return bool(getattr(module, "batchwise", False))
    return False


def describe(module: nn.Module) -> str:
    """How a plan names an existing stochastic layer, e.g. ``DropPath (timm)``."""
    entry = foreign_layer(module)
    if entry is not None:
        return f"{entry.name} ({entry.package})"
    if module in _FUNCTIONAL_HOSTS:
        return f"F.{_FUNCTIONAL_HOSTS[module][0]} in {type(module).__name__}.forward"
    return type(module).__name__


# --------------------------------------------------------------------------- functional dropout


def _functional_rate_attr(module: nn.Module) -> str | None:
    """The float attribute of a host that holds its functional call's rate, when exactly one
    attribute named like a rate (``p``, ``*drop*``) has that value."""
    p = _FUNCTIONAL_HOSTS[module][1]
    names = [k for k, v in vars(module).items()
             if (k == "p" or "drop" in k.lower()) and isinstance(v, float) and not isinstance(v, bool) and v == p]
    return names[0] if len(names) == 1 else None


class _FunctionalWatch(torch.overrides.TorchFunctionMode):
    def __init__(self, stack: list[nn.Module], found: dict[nn.Module, tuple[str, float]]) -> None:
        super().__init__()
        self.stack, self.found = stack, found

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        if name in FUNCTIONAL_NAMES and self.stack:
            host = self.stack[-1]
            p = kwargs.get("p", args[1] if len(args) > 1 else 0.5)
            if not isinstance(host, nn.modules.dropout._DropoutNd) and foreign_layer(host) is None:
                try:
                    rate = float(p)
                except (TypeError, ValueError):
                    rate = 0.0
                if rate > 0:
                    self.found.setdefault(host, (name, rate))
        return func(*args, **kwargs)


@contextlib.contextmanager
def watch_functional_dropout(model: nn.Module) -> Iterator[dict[nn.Module, tuple[str, float]]]:
    """While the block runs a forward pass of ``model``, record every module whose own ``forward``
    calls functional dropout with a rate > 0; yields the dict ``module -> (function name, rate)``
    filled on exit.

    The calls are seen in eval mode too (``F.dropout(x, p, self.training)`` is called with
    ``training=False``), so this works on the eval pass that planning or MC dropout runs anyway.
    The hosts are remembered (weakly) so that :func:`is_foreign_stochastic` and
    :func:`mc_train_modules` know them afterwards.
    """
    stack: list[nn.Module] = []
    found: dict[nn.Module, tuple[str, float]] = {}
    handles = []

    def enter(module: nn.Module, _args: Any) -> None:
        stack.append(module)

    def leave(_module: nn.Module, _args: Any, _out: Any) -> None:
        stack.pop()

    for m in model.modules():
        handles.append(m.register_forward_pre_hook(enter, prepend=True))
        handles.append(m.register_forward_hook(leave, always_call=True))
    global _generation
    try:
        with _FunctionalWatch(stack, found):
            yield found
    finally:
        for h in handles:
            h.remove()
        for host, value in found.items():
            if _FUNCTIONAL_HOSTS.get(host) != value:
                _FUNCTIONAL_HOSTS[host] = value
                _generation += 1
        _SCANNED[model] = _size(model)


def needs_scan(model: nn.Module, size: int | None = None) -> bool:
    """True unless :func:`watch_functional_dropout` has seen a forward of ``model`` as it is now.

    ``size``: the number of modules of ``model`` (``len(list(model.modules()))``) when the caller
    knows it, which saves a walk of the model."""
    return _SCANNED.get(model) != (_size(model) if size is None else size)


def _size(model: nn.Module) -> int:
    return sum(1 for _ in model.modules())


def functional_hosts(model: nn.Module) -> Iterator[tuple[str, nn.Module, str, float]]:
    """``(path, module, function name, rate)`` for every recorded functional-dropout host of ``model``."""
    for path, m in model.named_modules():
        if m in _FUNCTIONAL_HOSTS:
            name, p = _FUNCTIONAL_HOSTS[m]
            yield path, m, name, p


# --------------------------------------------------------------------------- MC training mode


def _positive(rate: float | None) -> bool:
    return rate is not None and rate > 0


def _needs_own_flag(module: nn.Module) -> bool:
    """True for a module that is random only while its own ``training`` flag is set."""
    if isinstance(module, (nn.TransformerEncoderLayer, nn.TransformerDecoderLayer)):
        # eval mode takes the fused fast path, which skips the dropout children
        return any(_positive(get_rate(m)) for m in module.modules()
                   if isinstance(m, (nn.modules.dropout._DropoutNd, nn.MultiheadAttention)))
    attn_drop = getattr(module, "attn_drop", None)
    if isinstance(attn_drop, nn.Module) and hasattr(module, "fused_attn"):
        # timm's Attention: dropout_p=self.attn_drop.p if self.training else 0.0 in fused attention
        return _positive(get_rate(attn_drop))
    if module in _FUNCTIONAL_HOSTS:
        return _positive(get_rate(module))
    return False


def mc_train_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """``(path, module)`` for every module that must be in training mode for Monte Carlo dropout
    besides the stochastic layers themselves: Transformer layers with a fused inference path,
    timm attention with fused attention dropout, and functional-dropout hosts (see the module
    docstring). A sampling strategy puts these in training mode with the stochastic modules."""
    return [(path, m) for path, m in model.named_modules() if _needs_own_flag(m)]
