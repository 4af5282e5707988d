"""The split of each model, computed once per input signature and kept while the model lives and
its structure is unchanged."""
from __future__ import annotations

import weakref
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from regfw.uncertainty.modes import ModelIndex, mc_mode, model_index, stochastic_modules

from .analysis import _analyse
from .probes import _Fallback
from .split import Split

_MAX_SIGNATURES = 8  # cached splits per model (input shapes / dtypes / devices)


@dataclass
class _Entry:
    fingerprint: tuple
    index: ModelIndex  #: held so that its id in the fingerprint is not reused
    splits: dict = field(default_factory=dict)


_CACHE: weakref.WeakKeyDictionary[nn.Module, _Entry] = weakref.WeakKeyDictionary()


def _fingerprint(model: nn.Module, index: ModelIndex) -> tuple:
    """What a split depends on: the module tree, which modules are stochastic (both in ``index``,
    :func:`~regfw.uncertainty.modes.model_index`, rebuilt when either changes) and the hooks of
    every module.

    (Not the ``training`` flags: the split is always traced and run in ``mc_mode``.) Only the
    modules that have hooks add to it, so a model without hooks costs one pass over its modules.
    """
    hooks = tuple(
        (i, tuple(m._forward_pre_hooks), tuple(m._forward_hooks), tuple(m._backward_hooks))
        for i, m in enumerate((model, *index.modules))
        if m._forward_pre_hooks or m._forward_hooks or m._backward_hooks
    )
    return (id(index), hooks)


def _signature(inputs: Any) -> tuple:
    if isinstance(inputs, Tensor):
        return (tuple(inputs.shape[1:]), inputs.dtype, inputs.device, inputs.shape[0] >= 3)
    return (type(inputs),)


def invalidate(model: nn.Module) -> None:
    """Forget the cached split of ``model`` (needed only after changing a plain Python attribute
    that a traced ``forward`` reads; structural changes are detected)."""
    _CACHE.pop(model, None)


def split_model(model: nn.Module, inputs: Tensor, types: tuple | None = None) -> Split:
    """The (cached) split of ``model`` for inputs like ``inputs``; computes it on first use.

    The analysis runs in :func:`~regfw.uncertainty.mc_mode` (the modes sampling runs in; the
    trace follows the ``training`` flags of traced-through modules) and restores every flag.
    A split that cannot be used has ``fallback`` set to the reason.
    """
    index = model_index(model, types)
    fp = _fingerprint(model, index)
    entry = _CACHE.get(model)
    if entry is None or entry.fingerprint != fp:
        entry = _Entry(fp, index)
        _CACHE[model] = entry
    sig = _signature(inputs)
    split = entry.splits.get(sig)
    if split is None:
        types = index.types
        on = [m for _, m in stochastic_modules(model, index)]
        try:
            with torch.no_grad(), mc_mode(model, on, index=index):
                split = _analyse(model, inputs, types)
        except _Fallback as exc:
            split = Split(fallback=str(exc))
        except Exception as exc:  # noqa: BLE001 - e.g. the model fails on the probe rows
            split = Split(fallback=f"the analysis of the model failed ({type(exc).__name__}: {exc})")
        if len(entry.splits) >= _MAX_SIGNATURES:
            entry.splits.pop(next(iter(entry.splits)))
        entry.splits[sig] = split
    return split
