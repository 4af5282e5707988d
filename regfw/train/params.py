"""Which parameters a weight penalty acts on: the decay / no-decay split, shared by weight penalties.

Public (listed in ``docs/plugins.md``): ``weight_decay`` and ``l1`` act on the same set, and a
third-party weight penalty (an orthogonality or spectral penalty, say) uses it the same way:
subclass :class:`DecaySetRegularizer` with a config subclassing :class:`DecaySetConfig`, and
:meth:`DecaySetRegularizer.decay_params` gives the parameters, cached per model.

The split follows timm's convention (``timm.optim.create_optimizer_v2``): biases, normalization
parameters (kind ``norm``, which plugins may extend), other 1-D parameters and the names of
``model.no_weight_decay()`` never decay; embeddings decay unless ``embeddings: false``.
"""
from __future__ import annotations

import fnmatch
import weakref
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from regfw.errors import ConfigError
from regfw.extend.regularizer import Regularizer
from regfw.placement import kinds as K
from regfw.placement.surgery import classify

__all__ = ["DecaySetConfig", "DecaySetRegularizer", "ParamSplit", "split_parameters"]

_EMBEDDINGS = (nn.Embedding, nn.EmbeddingBag)


@dataclass
class DecaySetConfig:
    """Which parameters a weight penalty acts on (shared by ``weight_decay`` and ``l1``)."""

    #: Also decay embedding tables (timm and nanoGPT do; minGPT does not).
    embeddings: bool = True
    #: Parameter names or fnmatch globs to leave out; a module path leaves out all under it.
    exclude: list[str] = field(default_factory=list)


@dataclass
class ParamSplit:
    """The parameters of a model sorted for weight decay.

    ``decay`` and ``no_decay`` hold ``(name, parameter, reason)``; ``frozen`` the names of
    parameters that are not trained and so belong to no optimizer group.
    """

    decay: list[tuple[str, nn.Parameter, str]]
    no_decay: list[tuple[str, nn.Parameter, str]]
    frozen: list[str]

    @property
    def decay_params(self) -> list[nn.Parameter]:
        return [p for _, p, _ in self.decay]

    @property
    def no_decay_params(self) -> list[nn.Parameter]:
        return [p for _, p, _ in self.no_decay]


def _matches(name: str, pattern: str) -> bool:
    """``pattern`` matches a parameter name as an fnmatch glob, or as a module path above it."""
    return fnmatch.fnmatchcase(name, pattern) or name.startswith(pattern + ".") or fnmatch.fnmatchcase(
        name, pattern + ".*")


def _no_weight_decay_names(model: nn.Module) -> list[str]:
    """Names from ``model.no_weight_decay()`` (timm's convention), or none."""
    method = getattr(model, "no_weight_decay", None)
    if not callable(method):
        return []
    return [str(n) for n in (method() or ())]


def split_parameters(model: nn.Module, *, embeddings: bool = True, exclude: Iterable[str] = (),
                     key: str = "regularizers.weight_decay") -> ParamSplit:
    """Sort the parameters of ``model`` into decay, no decay and frozen, with a reason each.

    The rules, in order: frozen parameters are left out; ``exclude`` patterns and the names
    of ``model.no_weight_decay()`` never decay; nor do biases, parameters of normalization
    layers (kind ``norm`` of :mod:`regfw.placement.kinds`, which plugins may extend), other 1-D
    parameters, and embeddings when ``embeddings`` is False. Everything else decays. A
    parameter shared between modules is sorted once, by all of its names (excluding any of
    them excludes it). A pattern of ``exclude`` that matches no parameter raises a
    :class:`~regfw.errors.ConfigError` naming ``key``.
    """
    exclude = list(exclude)
    names: dict[int, list[str]] = {}
    owners: dict[int, list[nn.Module]] = {}
    params: dict[int, nn.Parameter] = {}
    for path, module in model.named_modules(remove_duplicate=False):
        for pname, param in module.named_parameters(recurse=False):
            full = f"{path}.{pname}" if path else pname
            pid = id(param)
            params.setdefault(pid, param)
            names.setdefault(pid, [])
            if full not in names[pid]:
                names[pid].append(full)
            owners.setdefault(pid, [])
            if not any(o is module for o in owners[pid]):
                owners[pid].append(module)
    all_names = [n for ns in names.values() for n in ns]
    for i, pattern in enumerate(exclude):
        if not any(_matches(n, pattern) for n in all_names):
            shown = ", ".join(all_names[:8]) + (" ..." if len(all_names) > 8 else "")
            raise ConfigError(
                f"{key}.exclude[{i}]: pattern {pattern!r} matches no parameter of {type(model).__name__} "
                f"(parameters: {shown}). Use a parameter name, a module path or a glob such as 'head.*'."
            )
    timm_names = _no_weight_decay_names(model)
    norm_kind: dict[int, bool] = {}

    def is_norm(module: nn.Module) -> bool:
        if id(module) not in norm_kind:
            norm_kind[id(module)] = classify(module, "") == K.NORM
        return norm_kind[id(module)]

    split = ParamSplit([], [], [])
    for pid, param in params.items():
        pnames = names[pid]
        name = pnames[0]
        if not param.requires_grad:
            split.frozen.append(name)
            continue
        reason = None
        for pattern in exclude:
            if any(_matches(n, pattern) for n in pnames):
                reason = f"excluded by {pattern!r}"
                break
        if reason is None and any(_matches(n, p) for n in pnames for p in timm_names):
            reason = "model.no_weight_decay()"
        if reason is None:
            if any(n.rsplit(".", 1)[-1].endswith("bias") for n in pnames):
                reason = "bias"
            elif any(is_norm(m) for m in owners[pid]):
                reason = "norm"
            elif param.ndim <= 1:
                reason = "1-D"
            elif not embeddings and any(isinstance(m, _EMBEDDINGS) for m in owners[pid]):
                reason = "embedding"
        if reason is None:
            kind = "embedding" if any(isinstance(m, _EMBEDDINGS) for m in owners[pid]) else f"{param.ndim}-D"
            split.decay.append((name, param, kind))
        else:
            split.no_decay.append((name, param, reason))
    return split


class DecaySetRegularizer(Regularizer):
    """A regularizer acting on the decay set of :func:`split_parameters` (``weight_decay``, ``l1``).

    Its config subclasses :class:`DecaySetConfig`. The decay set is computed once per model
    and cached (a weak reference to the model), since penalties need it every step.
    """

    def __init__(self, config: Any = None) -> None:
        super().__init__(config)
        self._cache: tuple[Any, list[nn.Parameter]] | None = None

    def split(self, model: nn.Module) -> ParamSplit:
        """The decay / no-decay / frozen split of ``model`` under this config."""
        return split_parameters(model, embeddings=self.config.embeddings, exclude=self.config.exclude,
                                key=f"regularizers.{self.name}")

    def decay_params(self, model: nn.Module) -> list[nn.Parameter]:
        """The decaying parameters of ``model`` (cached per model)."""
        if self._cache is not None and self._cache[0]() is model:
            return self._cache[1]
        params = self.split(model).decay_params
        self._cache = (weakref.ref(model), params)
        return params

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_cache"] = None  # weak references do not pickle
        return state
