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
flag. Hugging Face attention goes one step further: it reads ``self.training`` only to choose its
dropout (``dropout=0.0 if not self.training else self.dropout.p``, passed to ``F.dropout`` or as
``dropout_p`` to fused attention), so in eval mode nothing shows a rate. Such a *training host* is
found by behaviour (:func:`watch_functional_dropout`): a module whose own forward calls a dropout
that is off in eval mode is run once more, alone, in training mode; it is a host when its own calls
are the same but for that dropout's rate, and the attributes holding the rate (a float attribute, a
dropout child's ``p`` or a config field, whatever their names) are those whose change changes the
rate it passes. :func:`mc_train_modules` lists those hosts; :func:`regfw.uncertainty.mc_mode` puts them in
training mode too (their other children keep their own flags, so BatchNorm stays in eval).
"""
from __future__ import annotations

import contextlib
import copy
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
#: The attribute of a host that held its functional call's rate when the host was found (:func:`_remember_rate_attr`).
_RATE_ATTR: weakref.WeakKeyDictionary[nn.Module, str] = weakref.WeakKeyDictionary()
#: Models whose forward has been watched, with their module count then (a changed model is watched again).
_SCANNED: weakref.WeakKeyDictionary[nn.Module, int] = weakref.WeakKeyDictionary()
#: Bumped whenever ``_FUNCTIONAL_HOSTS`` gains a host or a host's rate changes, so that what is
#: computed from it (:func:`regfw.uncertainty.modes.model_index`) knows when to look again.
_generation = 0
#: Training hosts: module -> where its dropout rate lives, as ``(owner, attribute)`` pairs whose
#: owner is ``""`` (the module), ``"child:NAME"`` (a child module) or ``"attr:NAME"`` (an object the
#: module holds, such as a config).
_RATE_SOURCES: weakref.WeakKeyDictionary[nn.Module, tuple[tuple[str, str], ...]] = weakref.WeakKeyDictionary()


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
    if module in _RATE_SOURCES:
        return None
    if module in _FUNCTIONAL_HOSTS:
        return _functional_rate_attr(module)
    return "p" if hasattr(module, "p") else None


def get_rate(module: nn.Module) -> float | None:
    """The rate of a dropout-family module (a functional call's ``p`` for a host), or None."""
    sources = _RATE_SOURCES.get(module)
    if sources:
        return _read_source(module, sources[0])
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
    rate attribute regfw can set (a functional call whose rate is a constant in the code).

    A module that drops in place (``nn.Dropout(inplace=True)``) is made to drop out of place when it gets a
    rate above 0: the same values, but its input may be a value autograd saved for the backward pass (timm's
    TNT drops its attention probabilities, a softmax's output, in place; at the rate 0 it was built with
    that never ran), and masking it in place would make the training step fail."""
    global _generation
    sources = _RATE_SOURCES.get(module)
    if sources:
        for source in sources:
            _write_source(module, source, float(rate))
        _FUNCTIONAL_HOSTS[module] = (_FUNCTIONAL_HOSTS[module][0], float(rate))
        _generation += 1
        return
    attr = rate_attr(module)
    if attr is None:
        raise ValueError(f"{type(module).__name__} has no rate attribute regfw can set (its dropout rate is fixed "
                         f"in its forward); use existing: keep for this model")
    setattr(module, attr, float(rate))
    if rate > 0 and getattr(module, "inplace", False) is True:
        setattr(module, "inplace", False)  # noqa: B010 - not every dropout-family module declares it
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
    """The float attribute of a host that holds its functional call's rate: the one remembered when the host
    was found (:func:`_remember_rate_attr`), else the one attribute named like a rate that has it now."""
    known = _RATE_ATTR.get(module)
    if known is not None and isinstance(vars(module).get(known), float):
        return known
    return _rate_attr_by_value(module)


def _rate_attr_by_value(module: nn.Module) -> str | None:
    """The one float attribute named like a rate (``p``, ``*drop*``) whose value is the host's recorded rate."""
    p = _FUNCTIONAL_HOSTS[module][1]
    names = [k for k, v in vars(module).items()
             if (k == "p" or "drop" in k.lower()) and isinstance(v, float) and not isinstance(v, bool) and v == p]
    return names[0] if len(names) == 1 else None


def _remember_rate_attr(host: nn.Module) -> None:
    """Remember the attribute holding a host's rate while it still has the rate its call passed, so the rate
    follows a later assignment to it (``model.drop_rate = 0.7``)."""
    if host not in _RATE_ATTR:
        name = _rate_attr_by_value(host)
        if name is not None:
            _RATE_ATTR[host] = name


#: Fused attention functions whose ``dropout_p`` is a dropout of the attention probabilities.
FUSED_DROPOUT = frozenset({"scaled_dot_product_attention"})
#: Scalar argument types a call's signature keeps (shapes, dims, flags, scales).
_SCALARS = (bool, int, float, str, type(None))


def _dropout_rate(name: str, args: tuple, kwargs: dict) -> float | None:
    """The rate a dropout call acts with (0 when it is off: ``training=False``), or None for a call
    that is no dropout."""
    try:
        if name in FUNCTIONAL_NAMES:
            p = kwargs.get("p", args[1] if len(args) > 1 else 0.5)
            training = kwargs.get("training", args[2] if len(args) > 2 else True)
            return float(p) if training else 0.0
        if name in FUSED_DROPOUT:
            return float(kwargs.get("dropout_p", args[4] if len(args) > 4 else 0.0))
    except (TypeError, ValueError):
        return None
    return None


def _signature(name: str, args: tuple, kwargs: dict) -> tuple:
    """A call as its own forward makes it, less its tensors and a dropout's rate and flag: two
    passes that differ only in their dropout give equal signatures."""
    if name in FUNCTIONAL_NAMES or name in FUSED_DROPOUT:
        drop = {"p", "training", "dropout_p"}
        kw = tuple(sorted((k, v) for k, v in kwargs.items() if k not in drop and isinstance(v, _SCALARS)))
        return name, kw
    pos = tuple(a for a in args if isinstance(a, _SCALARS))
    kw = tuple(sorted((k, v) for k, v in kwargs.items() if isinstance(v, _SCALARS)))
    return name, pos, kw


class _FunctionalWatch(torch.overrides.TorchFunctionMode):
    def __init__(self, stack: list[nn.Module], found: dict[nn.Module, tuple[str, float]],
                 own: dict[int, list]) -> None:
        super().__init__()
        self.stack, self.found, self.own = stack, found, own

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        calls = self.own.get(id(self.stack[-1])) if self.stack else None
        if calls is not None:
            out = func(*args, **kwargs)
            # a call that returns no tensor reads metadata (also on behalf of another mode watching the pass)
            if isinstance(out, torch.Tensor) or (isinstance(out, (tuple, list)) and any(
                    isinstance(t, torch.Tensor) for t in out)):
                calls.append((_signature(name, args, kwargs), name, _dropout_rate(name, args, kwargs)))
            self._functional(name, args, kwargs)
            return out
        self._functional(name, args, kwargs)
        return func(*args, **kwargs)

    def _functional(self, name: str, args: tuple, kwargs: dict) -> None:
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


@contextlib.contextmanager
def watch_functional_dropout(model: nn.Module) -> Iterator[dict[nn.Module, tuple[str, float]]]:
    """While the block runs a forward pass of ``model``, record every module whose own ``forward``
    calls functional dropout with a rate > 0, and every *training host* (a module that reads its
    ``training`` flag only to choose its dropout, see the module docstring); yields the dict
    ``module -> (function name, rate)`` filled on exit.

    The calls are seen in eval mode too (``F.dropout(x, p, self.training)`` is called with
    ``training=False``), so this works on the eval pass that planning or MC dropout runs anyway.
    A module whose dropout is off in eval mode (``p=0.0 if not self.training``) is run once more,
    alone, in training mode, on the arguments it got (random state, flags and rates restored
    after). The hosts are remembered (weakly) so that :func:`is_foreign_stochastic` and
    :func:`mc_train_modules` know them afterwards.
    """
    stack: list[nn.Module] = []
    found: dict[nn.Module, tuple[str, float]] = {}
    own: dict[int, list] = {}  # id(module) -> its own calls, while its first call runs
    given: dict[int, tuple[tuple, dict]] = {}  # id(module) -> the arguments of that call
    candidates: dict[nn.Module, tuple[tuple, dict, list]] = {}
    probing: list[bool] = [False]
    handles = []

    def enter(module: nn.Module, args: Any, kwargs: dict) -> None:
        stack.append(module)
        if not probing[0] and id(module) not in own and module not in candidates and _may_host(module):
            given[id(module)] = _as_given(args, kwargs)  # before its calls are recorded: copying calls torch too
            own[id(module)] = []

    def leave(module: nn.Module, _args: Any, _kwargs: dict, _out: Any) -> None:
        stack.pop()
        if probing[0]:
            return
        calls = own.pop(id(module), None)
        args = given.pop(id(module), None)
        if calls and args is not None and any(rate == 0.0 for _, _, rate in calls):
            candidates[module] = (*args, calls)

    for m in model.modules():
        handles.append(m.register_forward_pre_hook(enter, prepend=True, with_kwargs=True))
        handles.append(m.register_forward_hook(leave, always_call=True, with_kwargs=True))
    global _generation
    try:
        watch = _FunctionalWatch(stack, found, own)
        with watch:
            yield found
        probing[0] = True
        for module, (args, kwargs, calls) in candidates.items():
            if module in found:
                continue
            proven = _training_host(module, args, kwargs, calls, watch, own)
            if proven is not None:
                found[module] = proven[0]
                _RATE_SOURCES[module] = proven[1]
    finally:
        for h in handles:
            h.remove()
        for host, value in found.items():
            if _FUNCTIONAL_HOSTS.get(host) != value:
                _FUNCTIONAL_HOSTS[host] = value
                _generation += 1
            _remember_rate_attr(host)
        _SCANNED[model] = _size(model)


def _as_given(args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    """The arguments of a call as they were given: objects a forward may change in place (a
    key/value cache it appends to) are copied, tensors and plain values shared."""
    def keep(v: Any) -> Any:
        if isinstance(v, (torch.Tensor, bool, int, float, str, type(None), nn.Module)):
            return v
        if isinstance(v, (tuple, list)):
            return type(v)(keep(x) for x in v)
        if isinstance(v, dict):
            return {k: keep(x) for k, x in v.items()}
        try:
            return copy.deepcopy(v)
        except Exception:  # noqa: BLE001 - an object that cannot be copied is passed as it is
            return v
    return keep(args), keep(kwargs)


def _may_host(module: nn.Module) -> bool:
    return not isinstance(module, nn.modules.dropout._DropoutNd) and foreign_layer(module) is None


_HOOK_DICTS = ("_forward_pre_hooks", "_forward_pre_hooks_with_kwargs", "_forward_hooks", "_forward_hooks_with_kwargs",
               "_forward_hooks_always_called")


@contextlib.contextmanager
def _alone(module: nn.Module, stack: list[nn.Module]) -> Iterator[None]:
    """Within the block, ``module`` and its submodules run without the hooks they have (whoever
    watches the pass around the probe does not see it) and with only a hook keeping ``stack``."""
    saved = [(m, name, getattr(m, name)) for m in module.modules() for name in _HOOK_DICTS if hasattr(m, name)]
    try:
        for m, name, value in saved:
            setattr(m, name, type(value)())
        def enter(m: nn.Module, _args: Any) -> None:
            stack.append(m)

        def leave(_m: nn.Module, _args: Any, _out: Any) -> None:
            stack.pop()

        for m in module.modules():
            m.register_forward_pre_hook(enter)
            m.register_forward_hook(leave, always_call=True)
        yield
    finally:
        for m, name, value in saved:
            setattr(m, name, value)


def _train_calls(module: nn.Module, args: tuple, kwargs: dict, watch: _FunctionalWatch,
                 own: dict[int, list]) -> list:
    """The own calls of one training-mode call of ``module`` alone (its children keep their flags),
    random state and flag restored after."""
    flag = module.training
    own[id(module)] = []
    devices = [torch.cuda.current_device()] if torch.cuda.is_available() and torch.cuda.is_initialized() else []
    try:
        module.training = True
        with torch.no_grad(), torch.random.fork_rng(devices=devices), _alone(module, watch.stack), watch:
            module(*args, **kwargs)
        return own[id(module)]
    finally:
        own.pop(id(module), None)
        module.training = flag


def _training_host(module: nn.Module, args: tuple, kwargs: dict, calls: list, watch: _FunctionalWatch,
                   own: dict[int, list]) -> tuple[tuple[str, float], tuple[tuple[str, str], ...]] | None:
    """``((function name, rate), rate sources)`` when ``module`` reads ``training`` only to choose its
    dropout (see the module docstring), else None."""
    try:
        train = _train_calls(module, args, kwargs, watch, own)
    except Exception:  # noqa: BLE001 - a module that cannot run alone is no host we can prove
        return None
    if [c[0] for c in train] != [c[0] for c in calls]:
        return None  # training mode changes more than a dropout rate (BatchNorm statistics, noise, ...)
    rates = {rate for _, _, rate in train if rate is not None}
    if len(rates) != 1:
        return None
    (p,) = rates
    name = next(n for _, n, rate in train if rate is not None)
    sources = []
    for source in _rate_candidates(module, p):
        probe = round(p / 2 + 0.0137, 6)
        _write_source(module, source, probe)
        try:
            seen = {rate for _, _, rate in _train_calls(module, args, kwargs, watch, own) if rate is not None}
        except Exception:  # noqa: BLE001 - the probe value broke the module: not its rate
            seen = set()
        finally:
            _write_source(module, source, p)
        if seen == {probe}:
            sources.append(source)
    if p == 0 and not sources:
        return None  # no dropout at all: nothing to sample or set
    return (name, p), tuple(sources)


def _rate_candidates(module: nn.Module, p: float) -> Iterator[tuple[str, str]]:
    """Attributes that may hold a host's rate ``p``: its own float attributes, its children's ``p``,
    and float fields of objects it holds (a config), each equal to ``p``."""
    def floats(obj: Any) -> Iterator[str]:
        for k, v in vars(obj).items():
            if isinstance(v, float) and v == p:
                yield k

    for k in floats(module):
        yield "", k
    for name, child in module._modules.items():
        if child is not None and isinstance(getattr(child, "p", None), float) and child.p == p:
            yield f"child:{name}", "p"
    for name, obj in vars(module).items():
        if (not name.startswith("_") and hasattr(obj, "__dict__") and not isinstance(obj, (nn.Module, torch.Tensor))
                and not callable(obj) and not isinstance(obj, type)):
            for k in floats(obj):
                yield f"attr:{name}", k


def _owner(module: nn.Module, owner: str) -> Any:
    if not owner:
        return module
    kind, name = owner.split(":", 1)
    return module._modules[name] if kind == "child" else getattr(module, name)


def _read_source(module: nn.Module, source: tuple[str, str]) -> float | None:
    try:
        return float(getattr(_owner(module, source[0]), source[1]))
    except (AttributeError, KeyError, TypeError, ValueError):
        return None


def _write_source(module: nn.Module, source: tuple[str, str], rate: float) -> None:
    setattr(_owner(module, source[0]), source[1], rate)


def rate_sources(module: nn.Module) -> tuple[str, ...]:
    """Where a training host keeps its dropout rate, as ``regfw plan`` names it (``dropout.p``,
    ``attention_dropout``, ``config.attention_dropout``); empty for any other module."""
    return tuple(".".join(x for x in (owner.split(":", 1)[-1], attr) if x)
                 for owner, attr in _RATE_SOURCES.get(module, ()))


def needs_scan(model: nn.Module, size: int | None = None) -> bool:
    """True unless :func:`watch_functional_dropout` has seen a forward of ``model`` as it is now.

    ``size``: the number of modules of ``model`` (``len(list(model.modules()))``) when the caller
    knows it, which saves a walk of the model."""
    return _SCANNED.get(model) != (_size(model) if size is None else size)


def _size(model: nn.Module) -> int:
    return sum(1 for _ in model.modules())


def functional_hosts(model: nn.Module) -> Iterator[tuple[str, nn.Module, str, float]]:
    """``(path, module, function name, rate)`` for every recorded functional-dropout host of ``model``
    (a module calling ``F.dropout`` and its relatives on a tensor; a host whose dropout is fused attention's
    ``dropout_p`` drops attention probabilities, not a layer's output, and is not listed)."""
    for path, m in model.named_modules():
        if m in _FUNCTIONAL_HOSTS:
            name, p = _FUNCTIONAL_HOSTS[m]
            if name in FUNCTIONAL_NAMES:
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
