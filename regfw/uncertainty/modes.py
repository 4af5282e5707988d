"""Which modules are random, and the modes Monte Carlo dropout runs a model in.

:func:`stochastic_modules` finds every dropout-family module with a rate > 0 (torch's, regfw's,
torchvision's and timm's without importing them, and the types plugins declare through the
``regfw_stochastic_types`` hook); :func:`mc_mode` switches on exactly those (and the modules that
are random only through their own flag, :func:`regfw.foreign.mc_train_modules`), every other
module staying in eval mode; :func:`eval_mode` is the deterministic counterpart. Both restore
every module's ``training`` flag on exit.
"""
from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterable, Iterator

import torch
from torch import Tensor, nn

from regfw import foreign
from regfw.layers.base import StochasticModule

__all__ = [
    "TORCH_STOCHASTIC_TYPES",
    "dropout_family",
    "eval_mode",
    "is_stochastic",
    "mc_mode",
    "require_stochastic",
    "stochastic_modules",
    "stochastic_types",
]

#: torch's own dropout modules (all subclass ``nn.modules.dropout._DropoutNd``), and
#: ``nn.MultiheadAttention``, whose attention-weight dropout (rate ``.dropout``) acts in training mode.
TORCH_STOCHASTIC_TYPES: tuple[type, ...] = (
    nn.Dropout,
    nn.Dropout1d,
    nn.Dropout2d,
    nn.Dropout3d,
    nn.AlphaDropout,
    nn.FeatureAlphaDropout,
    nn.MultiheadAttention,
)


_warned: set[str] = set()


def _plugin_stochastic_types() -> tuple[type, ...]:
    """The module types plugins declare through the ``regfw_stochastic_types`` hook."""
    try:
        from regfw.plugins import get_plugin_manager
    except ImportError:
        return ()
    try:
        answers = get_plugin_manager().hook.regfw_stochastic_types()
    except Exception as exc:  # noqa: BLE001 - a broken plugin must not stop MC dropout
        message = (
            f"regfw_stochastic_types could not be asked ({type(exc).__name__}: {exc}); Monte Carlo "
            "dropout uses the built-in stochastic types only"
        )
        if message not in _warned:
            _warned.add(message)
            warnings.warn(message, RuntimeWarning, stacklevel=3)
        return ()
    found: list[type] = []
    for answer in answers:
        if answer is None:
            continue
        if isinstance(answer, type):
            answer = [answer]
        for t in answer:
            if not isinstance(t, type):
                raise TypeError(
                    f"regfw_stochastic_types must return module types, got {t!r} of type {type(t).__name__}"
                )
            found.append(t)
    return tuple(found)


def stochastic_types() -> tuple[type, ...]:
    """Every module type MC dropout switches on: torch's dropout modules,
    :class:`regfw.layers.base.StochasticModule` and the types plugins declare."""
    return (*TORCH_STOCHASTIC_TYPES, StochasticModule, *_plugin_stochastic_types())


def _rate_is_zero(module: nn.Module) -> bool:
    """True when the module has a rate attribute (``p``, timm's ``drop_prob``, ...) and every rate
    in it is 0."""
    attr = foreign.rate_attr(module)
    p = foreign.get_rate(module) if attr is None else getattr(module, attr, None)
    if p is None:
        return False
    if isinstance(p, Tensor):
        return bool(p.numel() > 0 and torch.all(p == 0))
    if isinstance(p, (list, tuple)):
        return len(p) > 0 and all(float(v) == 0.0 for v in p)
    try:
        return float(p) == 0.0
    except (TypeError, ValueError):
        return False


def is_stochastic(module: nn.Module, types: tuple[type, ...] | None = None) -> bool:
    """Whether ``module`` is random in training mode: a dropout-family type with a rate > 0.

    ``types`` defaults to :func:`stochastic_types` (pass it when testing many modules, to ask
    the plugins once). Matching is by type (``isinstance``), and for the stochastic layers of
    torchvision and timm (which are not imported) by class and package (:mod:`regfw.foreign`).
    """
    types = stochastic_types() if types is None else types
    return (isinstance(module, types) or foreign.is_foreign_stochastic(module)) and not _rate_is_zero(module)


def stochastic_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """``(path, module)`` for every stochastic module of ``model`` with a rate > 0.

    ``model.named_modules()`` is searched, so regularizer layers attached as child modules
    (e.g. ``fc1.regfw_dropout``) are found as well as ordinary ones.
    """
    types = stochastic_types()
    return [(name, m) for name, m in model.named_modules() if is_stochastic(m, types)]


def dropout_family(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """``(path, module)`` for every dropout-family module of ``model``, whatever its rate."""
    types = stochastic_types()
    return [(name, m) for name, m in model.named_modules()
            if isinstance(m, types) or foreign.is_foreign_stochastic(m)]


def require_stochastic(model: nn.Module) -> list[nn.Module]:
    """The stochastic modules of ``model``; raises ``ValueError`` with the fix when there is none."""
    found = stochastic_modules(model)
    if found:
        return [m for _, m in found]
    family = dropout_family(model)
    if family:
        names = ", ".join(n or "<root>" for n, _ in family[:5]) + (" ..." if len(family) > 5 else "")
        what = (
            f"the model's {len(family)} dropout-family module(s) ({names}) all have rate p = 0"
        )
    else:
        what = "the model has no dropout-family module"
    raise ValueError(
        f"Monte Carlo dropout needs a stochastic module with a rate > 0, but {what}, so every "
        "sample would be identical. Fix: select a dropout regularizer in the config, e.g. "
        "`regularizers: {dropout: {}}`, or add an nn.Dropout(p > 0) to the model "
        "(a custom stochastic layer should subclass regfw.layers.base.StochasticModule or be "
        "declared through the regfw_stochastic_types hook)."
    )


@contextlib.contextmanager
def mc_mode(model: nn.Module, modules: Iterable[nn.Module] | None = None) -> Iterator[list[nn.Module]]:
    """Put only the stochastic modules of ``model`` in training mode, all others in eval.

    BatchNorm and every other non-stochastic module stay in eval mode (running statistics
    used, never updated). Modules that are random only through their own flag
    (:func:`regfw.foreign.mc_train_modules`: ``nn.TransformerEncoderLayer``'s fused fast path,
    timm's fused attention, functional-dropout hosts) are put in training mode as well, whatever
    ``modules`` says, so every strategy samples them. On exit -- also when an exception is raised -- every module's
    previous ``training`` flag is restored exactly. ``modules`` overrides the set switched on
    (default :func:`stochastic_modules`). Yields the list of modules switched on.
    """
    saved = [(m, m.training) for m in model.modules()]
    try:
        stoch = [m for _, m in stochastic_modules(model)] if modules is None else list(modules)
        hosts = [m for _, m in foreign.mc_train_modules(model)]
        on = {id(m) for m in (*stoch, *hosts)}
        model.eval()
        for m in (*stoch, *hosts):
            m.train(True)
        for m in model.modules():  # undo train(True) reaching non-stochastic children
            if m.training and id(m) not in on:
                m.training = False
        yield stoch
    finally:
        for m, flag in saved:
            m.training = flag


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Put the whole model in eval mode, restoring every module's flag on exit."""
    saved = [(m, m.training) for m in model.modules()]
    try:
        model.eval()
        yield model
    finally:
        for m, flag in saved:
            m.training = flag
