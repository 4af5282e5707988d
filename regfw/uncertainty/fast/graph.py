"""Graph analysis on the traced nodes: evaluating a node, telling random ops, views and in-place
ops apart, dependency closures, and the memory bookkeeping of a node sequence."""
from __future__ import annotations

import operator
from collections.abc import Callable
from typing import Any

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from regfw.placement.tracing import FORWARD_ONLY as _FORWARD_ONLY
from regfw.uncertainty.sampling import is_stochastic

from .stand_in import stand_in


def _resolve(model: nn.Module, target: str) -> Any:
    """``m.a.b`` (a path under the tracing wrapper) to the object in ``model``."""
    obj: Any = model
    for part in target.split(".")[1:]:
        obj = getattr(obj, part)
    return obj


def _eval(node: fx.Node, env: dict, mods: dict, model: nn.Module, stand_ins: bool = False) -> Any:
    """The value of ``node`` from the values in ``env``; ``stand_ins``: a random operator of a
    captured graph gives its deterministic stand-in (:mod:`.stand_in`)."""
    args = fx.node.map_arg(node.args, env.__getitem__)
    kwargs = fx.node.map_arg(node.kwargs, env.__getitem__)
    op, target = node.op, node.target  # a str or, for call_function, the callable
    if stand_ins and op == "call_function" and _is_operator(target) and _random_operator(node):
        return stand_in(node, args, kwargs)
    if op == "call_module":
        mod = mods[target]
        if node.meta.get(_FORWARD_ONLY):
            return mod.forward(*args, **kwargs)
        return mod(*args, **kwargs)
    if op == "call_function":
        return target(*args, **kwargs)  # type: ignore[operator]
    if op == "call_method":
        return getattr(args[0], str(target))(*args[1:], **kwargs)
    if op == "get_attr":
        return _resolve(model, str(target))
    raise RuntimeError(f"unexpected node {node.op} {node.target}")  # pragma: no cover


def _describe_target(node: fx.Node) -> str:
    if node.op in ("call_module", "get_attr"):
        return str(node.target)
    if node.op == "call_method":
        return "." + str(node.target)
    if node.op == "call_function":
        return getattr(node.target, "__name__", type(node.target).__name__)
    return node.op


def _inputs(node: fx.Node) -> list[fx.Node]:
    return list(node.all_input_nodes)


_RANDOM_FUNCTIONS = {
    torch.rand, torch.rand_like, torch.randn, torch.randn_like, torch.randint, torch.randint_like,
    torch.randperm, torch.bernoulli, torch.multinomial, torch.normal, torch.poisson, F.gumbel_softmax,
}
#: dropout-like functions: (name of the training flag, its position, its default)
_DROPOUT_FUNCTIONS: dict[Callable, tuple[str, int, bool | None]] = {
    F.dropout: ("training", 2, True),
    F.dropout1d: ("training", 2, True),
    F.dropout2d: ("training", 2, True),
    F.dropout3d: ("training", 2, True),
    F.alpha_dropout: ("training", 2, False),
    F.feature_alpha_dropout: ("training", 2, False),
    F.rrelu: ("training", 3, False),
    torch.dropout: ("train", 2, None),
    torch.feature_dropout: ("train", 2, None),
    torch.alpha_dropout: ("train", 2, None),
    torch.feature_alpha_dropout: ("train", 2, None),
}
_RANDOM_METHODS = {
    "bernoulli", "bernoulli_", "uniform_", "normal_", "random_", "exponential_", "geometric_",
    "cauchy_", "log_normal_", "multinomial",
}


def _op_args(node: fx.Node) -> dict[str, Any]:
    """The arguments of a call of a torch operator (``torch.export``'s nodes), by schema name."""
    schema = node.target._schema  # type: ignore[union-attr]
    out: dict[str, Any] = {}
    for i, arg in enumerate(schema.arguments):
        if i < len(node.args):
            out[arg.name] = node.args[i]
        elif arg.name in node.kwargs:
            out[arg.name] = node.kwargs[arg.name]
        elif arg.has_default_value():
            out[arg.name] = arg.default_value
    return out


def _is_operator(target: Any) -> bool:
    return isinstance(target, torch._ops.OpOverload)


#: Schema arguments that switch a random operator off: a training flag set to False, a rate of 0.
_OFF_FLAGS = ("train", "training")
_RATES = ("p", "dropout_p")


def _random_operator(node: fx.Node) -> bool:
    """A torch operator tagged ``nondeterministic_seeded`` (it draws from the random generator: every
    sampling op, dropout, attention with ``dropout_p``, custom ops such as regfw's masks), unless its
    arguments switch the randomness off (``train=False``, ``p=0``, ``dropout_p=0``)."""
    if torch.Tag.nondeterministic_seeded not in node.target.tags:  # type: ignore[union-attr]
        return False
    args = _op_args(node)
    if any(args.get(flag) is False for flag in _OFF_FLAGS):
        return False
    return not any(isinstance(args.get(r), (int, float)) and args.get(r) == 0 for r in _RATES)


def _random_op(node: fx.Node) -> bool:
    """True for a call of a random function or method (a stochastic source outside modules)."""
    if node.op == "call_method":
        return node.target in _RANDOM_METHODS
    if node.op != "call_function":
        return False
    if _is_operator(node.target):
        return _random_operator(node)
    if node.target in _RANDOM_FUNCTIONS:
        return True
    spec = _DROPOUT_FUNCTIONS.get(node.target)  # type: ignore[arg-type]
    if spec is None:
        return False
    name, pos, default = spec
    flag = node.kwargs.get(name, node.args[pos] if len(node.args) > pos else default)
    p = node.kwargs.get("p", node.args[1] if len(node.args) > 1 else 0.5)
    if flag is False or (isinstance(p, (int, float)) and p == 0):
        return False
    return True


_VIEW_METHODS = {
    "view", "view_as", "reshape", "reshape_as", "flatten", "unflatten", "squeeze", "unsqueeze",
    "transpose", "permute", "t", "expand", "expand_as", "narrow", "select", "unbind", "split",
    "chunk", "tensor_split", "split_with_sizes", "as_strided", "movedim", "moveaxis", "swapaxes",
    "swapdims", "diagonal", "unfold", "detach", "contiguous", "__getitem__", "view_as_real",
    "view_as_complex", "to", "type", "type_as", "float", "double", "half", "bfloat16", "cpu", "cuda",
    "requires_grad_",
}
_VIEW_FUNCTIONS = {
    operator.getitem, getattr, torch.flatten, torch.reshape, torch.squeeze, torch.unsqueeze,
    torch.transpose, torch.permute, torch.narrow, torch.select, torch.chunk, torch.split,
    torch.unbind, torch.t, torch.movedim, torch.swapaxes, torch.detach, torch.diagonal,
    torch.as_strided, torch.tensor_split,
}
_INPLACE_FUNCTIONS = {
    operator.setitem, operator.iadd, operator.isub, operator.imul, operator.itruediv,
    operator.ifloordiv, operator.imod, operator.ipow, operator.iand, operator.ior, operator.ixor,
    operator.ilshift, operator.irshift, operator.imatmul,
}


def _first_node(node: fx.Node) -> fx.Node | None:
    return node.args[0] if node.args and isinstance(node.args[0], fx.Node) else None


def _aliases_input(node: fx.Node, mods: dict, types: tuple) -> bool:
    """The node's output may share memory with its first input (a view or pass-through)."""
    if node.op == "call_method":
        return node.target in _VIEW_METHODS
    if node.op == "call_function" and _is_operator(node.target):  # the schema says it: ``Tensor(a)``
        returns = node.target._schema.returns  # type: ignore[union-attr]
        return bool(returns) and returns[0].alias_info is not None and not returns[0].alias_info.is_write
    if node.op == "call_function":
        return node.target in _VIEW_FUNCTIONS
    if node.op == "call_module":
        mod = mods[node.target]
        if isinstance(mod, (nn.Identity, nn.Flatten, nn.Unflatten)):
            return True
        return isinstance(mod, types) and not is_stochastic(mod, types)  # dropout with p = 0
    return False


def _mutates_input(node: fx.Node, mods: dict) -> bool:
    """The node may change its first input in place."""
    if node.op == "call_method":
        name = str(node.target)
        return name.endswith("_") and not name.startswith("__")
    if node.op == "call_function" and _is_operator(node.target):  # the schema says it: ``Tensor(a!)``
        arguments = node.target._schema.arguments  # type: ignore[union-attr]
        return bool(arguments) and arguments[0].alias_info is not None and arguments[0].alias_info.is_write
    if node.op == "call_function":
        if node.target in _INPLACE_FUNCTIONS or node.kwargs.get("inplace") is True:
            return True
        name = getattr(node.target, "__name__", "")
        return name.endswith("_") and not name.startswith("__")
    if node.op == "call_module":
        return getattr(mods[node.target], "inplace", False) is True
    return False


def _closure(seeds: set, nodes: list) -> set:
    """Seeds plus every node with an input in the set (nodes in graph order)."""
    out = set(seeds)
    for node in nodes:
        if node not in out and any(i in out for i in _inputs(node)):
            out.add(node)
    return out


def _fix_inplace(nodes: list, stoch: set, mods: dict, types: tuple) -> set:
    """Grow the stochastic set until the split is blind to in-place ops.

    The split runs every deterministic node before every replayed node. Data dependencies allow
    that; in-place ops can observe it. Per group of values sharing memory (views, in-place
    results): a deterministic in-place op after a replayed reader would change what the reader
    saw, so it joins the replay; once a replayed op writes to the group, every later reader must
    see the write, so the readers after it and the group's views join the replay too (the root
    value is gathered per chunk and the views recomputed from it).
    """
    order = {n: i for i, n in enumerate(nodes)}
    parent: dict = {}

    def find(n: fx.Node) -> fx.Node:
        while parent.get(n, n) is not n:
            n = parent[n]
        return n

    inplace = []
    for node in nodes:
        if node.op not in ("call_module", "call_function", "call_method"):
            continue
        base = _first_node(node)
        if base is None:
            continue
        mut = _mutates_input(node, mods)
        if mut:
            inplace.append(node)
        if mut or _aliases_input(node, mods, types):
            parent[find(node)] = find(base)
    if not inplace:
        return stoch
    groups: dict = {}
    for node in nodes:
        groups.setdefault(find(node), []).append(node)
    mutating_groups = {find(n) for n in inplace}
    stoch = set(stoch)
    changed = True
    while changed:
        changed = False
        for root in mutating_groups:
            members = groups[root]
            member_set = set(members)
            writers = [n for n in members if n in inplace]
            readers = [u for m in members for u in m.users if u not in member_set or u in inplace]
            for w in writers:
                if w not in stoch and any(r in stoch and order[r] < order[w] for r in readers if r is not w):
                    stoch.add(w)
                    changed = True
            first = min((order[w] for w in writers if w in stoch), default=None)
            if first is None:
                continue
            for n in [*members[1:], *readers]:
                if n not in stoch and (n in member_set or order[n] > first):
                    stoch.add(n)
                    changed = True
        if changed:
            stoch = _closure(stoch, nodes)
    return stoch


def _cost(nodes: list, free_after: dict, keep: set, per_node: dict) -> tuple[int, int]:
    """(constant, per-row) bytes at the peak of running ``nodes`` with values freed after last use.

    The node being computed is counted twice (its output and, e.g., a mask of the same size).
    """
    live: dict = {}
    peak_c = peak_r = 0
    for i, node in enumerate(nodes):
        c, r = per_node.get(node, (0, 0))
        live[node] = (c, r)
        cur_c = sum(v[0] for v in live.values()) + c
        cur_r = sum(v[1] for v in live.values()) + r
        peak_c, peak_r = max(peak_c, cur_c), max(peak_r, cur_r)
        for dead in free_after.get(i, ()):
            if dead not in keep:
                live.pop(dead, None)
    return peak_c, peak_r


def _last_uses(nodes: list, scope: set) -> dict[int, list]:
    """``{i: [values whose last reader in nodes is nodes[i]]}`` for values in ``scope``."""
    last: dict = {}
    for i, node in enumerate(nodes):
        for inp in _inputs(node):
            if inp in scope:
                last[inp] = i
    for i, node in enumerate(nodes):  # values nobody reads die at once
        if node in scope and node not in last:
            last[node] = i
    out: dict[int, list] = {}
    for value, i in last.items():
        out.setdefault(i, []).append(value)
    return out
