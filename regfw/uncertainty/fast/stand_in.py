"""Deterministic stand-ins for the random operators of a graph captured by ``torch.export``.

The probes of a split (:mod:`.probes`) need the graph's values without randomness: the batch layout
of each value is read off two runs at 2 and 3 rows, and the output is compared with the model's
eval output. A ``torch.fx`` graph gets that from eval mode, since its stochastic modules are calls
of modules; a captured graph holds the random operators themselves, drawn as in MC mode. Each is
run here as the deterministic operator that eval mode (weight scaling) stands for, by what its
schema says:

* a training flag (``train`` / ``training``: dropout, ``native_dropout``, ``rrelu``, recurrent
  layers) is set to False, and an attention ``dropout_p`` to 0;
* a sampling operator gives its distribution's mean (``bernoulli(p)``: p; ``rand``: 0.5;
  ``randn``: 0; ``normal_``, ``uniform_``, ``exponential_``: theirs; regfw's own mask operator:
  ``(1 - p) * scale``), which is what the inverted scaling of dropout-family layers divides by;
* any other random operator has none, and the split is not used (:class:`NoStandIn`).
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.fx as fx

from regfw.layers import masks  # noqa: F401 - defines regfw::word_mask, whose mean is given below

__all__ = ["NoStandIn", "stand_in"]

_aten = torch.ops.aten


class NoStandIn(Exception):
    """A random operator without a deterministic stand-in; the message names it."""


#: The mean of each sampling operator, from its arguments by schema name.
_MEANS: dict[Any, Callable[[dict], Any]] = {
    _aten.rand: lambda a: 0.5,
    _aten.rand_like: lambda a: 0.5,
    _aten.randn: lambda a: 0.0,
    _aten.randn_like: lambda a: 0.0,
    _aten.uniform: lambda a: (a["from"] + a["to"]) / 2,
    _aten.uniform_: lambda a: (a["from"] + a["to"]) / 2,
    _aten.normal_: lambda a: a["mean"],
    _aten.exponential_: lambda a: 1.0 / a["lambd"],
    _aten.bernoulli: lambda a: a.get("p", a["self"]),  # without p, the input holds the probabilities
    _aten.bernoulli_: lambda a: a["p"],
    torch.ops.regfw.word_mask: lambda a: (1.0 - a["p"]) * a["scale"],
}
_FLAGS = ("train", "training")


def _named(op: Any, args: tuple, kwargs: dict) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for i, arg in enumerate(op._schema.arguments):
        if i < len(args):
            out[arg.name] = args[i]
        elif arg.name in kwargs:
            out[arg.name] = kwargs[arg.name]
        elif arg.has_default_value():
            out[arg.name] = arg.default_value
    return out


def _with(op: Any, args: tuple, kwargs: dict, name: str, value: Any) -> tuple[tuple, dict]:
    """``(args, kwargs)`` with the argument ``name`` set to ``value``."""
    names = [a.name for a in op._schema.arguments]
    i = names.index(name)
    if i < len(args):
        return (*args[:i], value, *args[i + 1:]), kwargs
    return args, {**kwargs, name: value}


def stand_in(node: fx.Node, args: tuple, kwargs: dict) -> Any:
    """The deterministic value of the random operator ``node`` on evaluated ``args`` / ``kwargs``."""
    op = node.target
    names = {a.name for a in op._schema.arguments}  # type: ignore[union-attr]
    for flag in _FLAGS:
        if flag in names:
            args, kwargs = _with(op, args, kwargs, flag, False)
            return op(*args, **kwargs)  # type: ignore[operator]
    if "dropout_p" in names:
        args, kwargs = _with(op, args, kwargs, "dropout_p", 0.0)
        return op(*args, **kwargs)  # type: ignore[operator]
    mean = _MEANS.get(getattr(op, "overloadpacket", None))
    if mean is None:
        raise NoStandIn(f"the random operator {op} has no deterministic stand-in for the checks")
    out = op(*args, **kwargs)  # type: ignore[operator]
    return out.copy_(torch.as_tensor(mean(_named(op, args, kwargs))).to(out.dtype).expand_as(out))
