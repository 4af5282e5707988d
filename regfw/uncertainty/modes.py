"""Which modules are random, and the modes Monte Carlo dropout runs a model in.

:func:`stochastic_modules` finds every dropout-family module with a rate > 0 (torch's, regfw's,
torchvision's and timm's without importing them, and the types plugins declare through the
``regfw_stochastic_types`` hook); :func:`mc_mode` switches on exactly those (and the modules that
are random only through their own flag, :func:`regfw.placement.foreign.mc_train_modules`), every other
module staying in eval mode; :func:`eval_mode` is the deterministic counterpart. Both restore
every module's ``training`` flag on exit.
"""
from __future__ import annotations

import contextlib
import contextvars
import warnings
import weakref
from collections.abc import Iterable, Iterator

import torch
from torch import Tensor, nn

from regfw.layers.base import StochasticModule
from regfw.layers.torch_dropout import ROUTED_TYPES, word_forward
from regfw.placement import foreign
from regfw.registry.discovery import get_plugin_manager

__all__ = [
    "TORCH_STOCHASTIC_TYPES",
    "ModelIndex",
    "dropout_family",
    "eval_mode",
    "is_stochastic",
    "mc_mode",
    "checked_index",
    "excluded_ids",
    "excluding",
    "model_index",
    "require_stochastic",
    "stochastic_modules",
    "stochastic_types",
    "structure_signature",
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
    torchvision and timm (which are not imported) by class and package (:mod:`regfw.placement.foreign`).
    """
    types = stochastic_types() if types is None else types
    return (isinstance(module, types) or foreign.is_foreign_stochastic(module)) and not _rate_is_zero(module)


# --------------------------------------------------------------------------- the index of a model


class ModelIndex:
    """What Monte Carlo dropout needs to know of a model's modules, computed once per structure.

    :func:`model_index` returns it; it is rebuilt when the module tree (children, their names and
    types), a dropout-family module's rate being zero or not, the stochastic types or the recorded
    functional-dropout hosts change. The model itself is never referenced (``None`` stands for it
    in the lists), so the cache does not keep a model alive.
    """

    __slots__ = ("signature", "types", "functional", "modules", "family", "zero", "stochastic", "hosts", "routed")

    def __init__(self, model: nn.Module, signature: list, types: tuple[type, ...], functional: int) -> None:
        self.signature = signature
        self.types = types
        self.functional = functional
        named = list(model.named_modules())

        def ref(m: nn.Module) -> nn.Module | None:
            return None if m is model else m

        #: every module below the root, in ``model.modules()`` order
        self.modules: list[nn.Module] = [m for _, m in named[1:]]
        self.family: list[tuple[str, nn.Module | None]] = [
            (name, ref(m)) for name, m in named if isinstance(m, types) or foreign.is_foreign_stochastic(m)]
        self.zero = self._zero(model)
        self.stochastic = [entry for entry, z in zip(self.family, self.zero, strict=True) if not z]
        self.hosts = [(name, ref(m)) for name, m in foreign.mc_train_modules(model)]
        #: torch dropout modules whose masks MC mode draws from random words on CPU
        self.routed = [m for _, m in self.stochastic if m is not None and type(m) in ROUTED_TYPES]

    def _zero(self, model: nn.Module) -> tuple[bool, ...]:
        return tuple(_rate_is_zero(model if m is None else m) for _, m in self.family)

    def current(self, model: nn.Module) -> bool:
        """Whether the rates still agree with the index (the structure is checked by the caller)."""
        return self._zero(model) == self.zero

    @staticmethod
    def resolve(entries: list[tuple[str, nn.Module | None]], model: nn.Module) -> list[tuple[str, nn.Module]]:
        """``entries`` with the model put back where ``None`` stands for it."""
        return [(name, model if m is None else m) for name, m in entries]


_INDEX: weakref.WeakKeyDictionary[nn.Module, ModelIndex] = weakref.WeakKeyDictionary()


def structure_signature(model: nn.Module) -> list:
    """The module tree of ``model`` as a flat list: per module reached (depth first) its type, its
    number of children and its ``(name, child)`` pairs. Two calls give equal lists exactly when no
    child was added, removed, renamed, replaced or retyped anywhere in between.

    One walk over the ``_modules`` dicts, without building paths or a set of modules seen: about
    as cheap as a model walk gets (``model.modules()`` is about twice the cost), so it can run on
    every Monte Carlo call. A module shared by two parents is described twice; the tree must be
    acyclic, as torch's own recursive methods (``apply``, ``to``) need it to be.
    """
    sig: list = []
    append, extend = sig.append, sig.extend
    stack = [model]
    pop, push = stack.pop, stack.extend
    while stack:
        m = pop()
        children = m._modules
        append(type(m))
        append(len(children))
        if children:
            extend(children.items())
            push([c for c in children.values() if c is not None])
    return sig


#: ``(model, index)`` while :func:`checked_index` holds: the index was checked in this call.
_CHECKED: contextvars.ContextVar[tuple[nn.Module, ModelIndex] | None] = contextvars.ContextVar(
    "regfw_checked_index", default=None)


@contextlib.contextmanager
def checked_index(model: nn.Module, index: ModelIndex) -> Iterator[None]:
    """Within the block, :func:`model_index` returns ``index`` for ``model`` without checking it
    again: for one Monte Carlo call, which checks the index once at its start and changes no module
    (its strategy asks for the index again, e.g. to look up its cached split)."""
    token = _CHECKED.set((model, index))
    try:
        yield
    finally:
        _CHECKED.reset(token)


def model_index(model: nn.Module, types: tuple[type, ...] | None = None) -> ModelIndex:
    """The (cached) :class:`ModelIndex` of ``model``: checked against the model on every call (one
    cheap walk, :func:`structure_signature`, and the rates of its dropout-family modules), rebuilt
    only when something it depends on changed (inside :func:`checked_index`: the index it holds)."""
    types = stochastic_types() if types is None else types
    held = _CHECKED.get()
    if held is not None and held[0] is model and held[1].types == types:
        return held[1]
    sig = structure_signature(model)
    generation = foreign.functional_generation()
    index = _INDEX.get(model)
    if (index is None or index.functional != generation or index.types != types or index.signature != sig
            or not index.current(model)):
        index = ModelIndex(model, sig, types, generation)
        _INDEX[model] = index
    return index


def stochastic_modules(model: nn.Module, index: ModelIndex | None = None) -> list[tuple[str, nn.Module]]:
    """``(path, module)`` for every stochastic module of ``model`` with a rate > 0.

    ``model.named_modules()`` is searched (once per structure, :func:`model_index`), so regularizer
    layers attached as child modules (e.g. ``fc1.regfw_dropout``) are found as well as ordinary ones.
    """
    index = model_index(model) if index is None else index
    return ModelIndex.resolve(index.stochastic, model)


def dropout_family(model: nn.Module, index: ModelIndex | None = None) -> list[tuple[str, nn.Module]]:
    """``(path, module)`` for every dropout-family module of ``model``, whatever its rate."""
    index = model_index(model) if index is None else index
    return ModelIndex.resolve(index.family, model)


def require_stochastic(model: nn.Module, index: ModelIndex | None = None) -> list[nn.Module]:
    """The stochastic modules of ``model``; raises ``ValueError`` with the fix when there is none."""
    index = model_index(model) if index is None else index
    found = stochastic_modules(model, index)
    if found:
        return [m for _, m in found]
    family = dropout_family(model, index)
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


#: Ids of the modules Monte Carlo dropout leaves in eval mode during this call: the model's own stochastic
#: layers the ``sample_model_stochastic`` setting does not sample (:mod:`regfw.uncertainty.own_layers`).
_EXCLUDED: contextvars.ContextVar[frozenset[int]] = contextvars.ContextVar("regfw_mc_excluded", default=frozenset())


@contextlib.contextmanager
def excluding(modules: Iterable[nn.Module]) -> Iterator[None]:
    """Within the block, :func:`mc_mode` never switches ``modules`` on (and the ``auto`` strategy's split
    treats them as deterministic)."""
    token = _EXCLUDED.set(frozenset(id(m) for m in modules))
    try:
        yield
    finally:
        _EXCLUDED.reset(token)


def excluded_ids() -> frozenset[int]:
    """The ids :func:`excluding` holds now (empty outside it)."""
    return _EXCLUDED.get()


@contextlib.contextmanager
def mc_mode(
    model: nn.Module, modules: Iterable[nn.Module] | None = None, *, index: ModelIndex | None = None,
) -> Iterator[list[nn.Module]]:
    """Put only the stochastic modules of ``model`` in training mode, all others in eval.

    BatchNorm and every other non-stochastic module stay in eval mode (running statistics
    used, never updated). Modules that are random only through their own flag
    (:func:`regfw.placement.foreign.mc_train_modules`: ``nn.TransformerEncoderLayer``'s fused fast path,
    timm's fused attention, functional-dropout hosts) are put in training mode as well, whatever
    ``modules`` says, so every strategy samples them. torch's own dropout modules draw their
    masks from regfw's random words while on CPU (:mod:`regfw.layers.torch_dropout`; other
    devices keep torch's kernels). On exit -- also when an exception is raised -- every module's
    previous ``training`` flag is restored exactly, and the routed modules have their own forward
    again. ``modules`` overrides the set switched on (default :func:`stochastic_modules`).
    Yields the list of modules switched on.

    Only flags that differ are written: which modules are stochastic comes from the cached
    :func:`model_index`, so a model already in eval mode costs a few attribute writes, not a walk
    through ``train()`` of every module.
    """
    index = model_index(model) if index is None else index
    everything = [model, *index.modules]
    saved = [m.training for m in everything]
    routed: list[nn.Module] = []
    outside: list[tuple[nn.Module, bool]] = []  # modules passed in that are not the model's
    try:
        stoch = [m for _, m in stochastic_modules(model, index)] if modules is None else list(modules)
        on = {id(m): m for m in stoch}
        for _, host in ModelIndex.resolve(index.hosts, model):
            on[id(host)] = host
        for i in _EXCLUDED.get():  # own stochastic layers the call does not sample
            on.pop(i, None)
        if modules is not None:
            mine = {id(m) for m in everything}
            outside = [(m, m.training) for m in on.values() if id(m) not in mine]
        for m, flag in zip(everything, saved, strict=True):
            if flag and id(m) not in on:
                m.training = False
        for m in on.values():
            if not m.training:
                m.training = True
        for m in index.routed:
            if id(m) in on:
                fn = word_forward(m)
                if fn is not None:
                    m.forward = fn
                    routed.append(m)
        yield stoch
    finally:
        for m in routed:
            m.__dict__.pop("forward", None)
        for m, flag in (*zip(everything, saved, strict=True), *outside):
            if m.training is not flag:
                m.training = flag


@contextlib.contextmanager
def eval_mode(model: nn.Module, *, index: ModelIndex | None = None) -> Iterator[nn.Module]:
    """Put the whole model in eval mode, restoring every module's flag on exit (only the flags
    that are set are written; the modules come from the cached :func:`model_index`)."""
    index = model_index(model) if index is None else index
    everything = [model, *index.modules]
    saved = [m.training for m in everything]
    try:
        for m, flag in zip(everything, saved, strict=True):
            if flag:
                m.training = False
        yield model
    finally:
        for m, flag in zip(everything, saved, strict=True):
            if m.training is not flag:
                m.training = flag
