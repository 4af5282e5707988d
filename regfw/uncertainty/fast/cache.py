"""The split of each model, computed once per input signature and kept while the model lives and
its structure is unchanged."""
from __future__ import annotations

import weakref
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from regfw.model_io import OutputKey
from regfw.placement import foreign
from regfw.uncertainty.modes import ModelIndex, excluded_ids, mc_mode, model_index, stochastic_modules

from . import analysis
from .analysis import _analyse
from .inputs import pack
from .probes import _Fallback
from .split import Split

_MAX_SIGNATURES = 8  # cached splits per model (input shapes / dtypes / devices)


@dataclass
class _Entry:
    index: ModelIndex  #: the module tree and its stochastic modules the splits were made for
    hooks: tuple  #: :func:`_hooks` then
    hook_id: int  #: ``RemovableHandle.next_id`` when ``hooks`` was last checked in full
    splits: dict = field(default_factory=dict)
    captures: int = 0  #: ``torch.export`` captures made for these splits


_CACHE: weakref.WeakKeyDictionary[nn.Module, _Entry] = weakref.WeakKeyDictionary()


def _hook_id() -> int:
    """torch's global hook counter: every ``register_*_hook`` call takes the next number."""
    return int(getattr(RemovableHandle, "next_id", -1))


def _hooks(model: nn.Module, index: ModelIndex) -> tuple:
    """The hooks of every module that has any: ``(position, pre, forward, backward hook ids)``."""
    return tuple(
        (i, tuple(m._forward_pre_hooks), tuple(m._forward_hooks), tuple(m._backward_hooks))
        for i, m in enumerate((model, *index.modules))
        if m._forward_pre_hooks or m._forward_hooks or m._backward_hooks
    )


def _current(entry: _Entry, model: nn.Module, index: ModelIndex) -> bool:
    """Whether the splits of ``entry`` still fit ``model``: what a split depends on is the module
    tree, which modules are stochastic (both in ``index``, :func:`~regfw.uncertainty.modes.model_index`,
    a new object when either changes) and the hooks of every module. (Not the ``training`` flags:
    the split is always traced and run in ``mc_mode``.)

    Hooks are compared in full only when a hook was registered somewhere since the last check
    (torch numbers every hook from one counter); otherwise only the modules that had hooks are
    looked at, for removals.
    """
    if entry.index is not index:
        return False
    if entry.hook_id >= 0 and _hook_id() == entry.hook_id:
        modules = (model, *index.modules)
        for hooked in entry.hooks:
            m = modules[hooked[0]]
            if (hooked[0], tuple(m._forward_pre_hooks), tuple(m._forward_hooks), tuple(m._backward_hooks)) != hooked:
                return False
        return True
    if _hooks(model, index) != entry.hooks:
        return False
    entry.hook_id = _hook_id()
    return True


def _signature(inputs: Any, output_key: Any) -> tuple:
    """What a split depends on besides the model: the inputs' structure, shapes past the batch
    dimension, dtypes and devices, whether the batch has 3 rows to probe, and the output selector."""
    try:
        packed = pack(inputs)
    except TypeError:
        return (type(inputs),)
    try:
        hash(output_key)
    except TypeError:
        output_key = id(output_key)
    return (packed.signature(), packed.rows >= 3, output_key)


def _rates(model: nn.Module, index: ModelIndex) -> tuple:
    """The rates of the sampled stochastic modules (a captured graph holds them as numbers)."""
    off = excluded_ids()
    return tuple(foreign.get_rate(m) for _, m in stochastic_modules(model, index) if id(m) not in off)


def invalidate(model: nn.Module) -> None:
    """Forget the cached split of ``model`` (needed only after changing a plain Python attribute
    that a traced ``forward`` reads; structural changes are detected)."""
    _CACHE.pop(model, None)


def split_model(model: nn.Module, inputs: Any, types: tuple | None = None, output_key: OutputKey = None) -> Split:
    """The (cached) split of ``model`` for inputs like ``inputs`` (a tensor, or a dict / tuple of
    arguments) and the output ``output_key`` selects; computes it on first use.

    The analysis runs in :func:`~regfw.uncertainty.mc_mode` (the modes sampling runs in; the
    trace follows the ``training`` flags of traced-through modules) and restores every flag.
    A split that cannot be used has ``fallback`` set to the reason.
    """
    index = model_index(model, types)
    entry = _CACHE.get(model)
    if entry is None or not _current(entry, model, index):
        entry = _Entry(index, _hooks(model, index), _hook_id())
        _CACHE[model] = entry
    sig = (_signature(inputs, output_key), excluded_ids())
    split = entry.splits.get(sig)
    if split is not None and split.holds_rates and (split.rates != _rates(model, index) or split.hosts_changed(model)):
        split = None  # a rate the graph holds changed
    if split is None:
        types = index.types
        off = excluded_ids()
        on = [m for _, m in stochastic_modules(model, index) if id(m) not in off]
        try:
            with torch.no_grad(), mc_mode(model, on, index=index):
                split = _analyse(model, inputs, types, output_key, may_capture=entry.captures < analysis.MAX_CAPTURES)
            split.rates = _rates(model, index)
            entry.captures += split.capture == "torch.export"
        except _Fallback as exc:
            split = Split(fallback=str(exc))
        except Exception as exc:  # noqa: BLE001 - e.g. the model fails on the probe rows
            split = Split(fallback=f"the analysis of the model failed ({type(exc).__name__}: {exc})")
        if len(entry.splits) >= _MAX_SIGNATURES and sig not in entry.splits:
            entry.splits.pop(next(iter(entry.splits)))
        entry.splits[sig] = split
    return split
