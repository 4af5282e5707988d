"""Gates from lineage: the units on the side of a product that the other side does not depend on.

A *gate* is a branch whose output multiplies another path (``x * sigmoid(fc2(relu(fc1(pool(x)))))`` of
squeeze-excitation, ``u * v`` of a gated linear unit, ``ctx * gates`` of focal modulation) or
softmax-weights it by a matrix product (``x @ softmax(conv_attn(x))``, global-context pooling). Dropout
on a gate lets the gate exceed its range, so no unit on one gets dropout after it.

The rule is one property of the graph, the same for a traced pass and a ``torch.fx`` graph:

* a **product** is an elementwise multiply of two operands that both depend on the model's input: ``x *
  gamma`` of a parameter, or ``deltas * widths`` of anchors computed from shapes only, is a scale;
* of a product ``a * b``, the *gating branch* of ``a`` is every unit ``a`` depends on that ``b`` does not,
  called inside the module that multiplies (so the gating branch starts where it leaves the main path,
  and a gate in block ``k`` never reaches back into block ``k - 1``);
* when exactly one operand comes out of a squashing function (``sigmoid``, ``hardsigmoid``, ``tanh``,
  ``softmax``, seen through shape functions, as a function or as a unit whose forward ends in one),
  only that operand's branch is a gate; otherwise (a gated MLP's ``u * v``, SwiGLU's ``silu(a) * b``)
  both branches are. ``h * sigmoid(h)`` (a swish written out) has no branch on either side;
* a matrix product one of whose operands comes out of a ``softmax`` is a softmax weighting: that
  operand's branch is a gate.

:class:`Lineage` records this during the example-input trace at the granularity of unit *calls*: each
tensor carries the set of unit calls it was last computed by (through any functions), each call the
calls its inputs came from. Factories that read only a tensor's shape or dtype (``torch.zeros_like``,
``x.new_ones``) and ``detach`` (a constant to training: a detector's proposals, decoded from detached
deltas) start a new lineage, and an index or mask only picks positions (``anchors[idx]`` of indices
``idx`` computed from the scores depends on the anchors alone). :func:`fx_gates` applies the
same rule to a ``torch.fx`` graph (where an index cannot be told from a value: no dtypes there).
"""
from __future__ import annotations

import operator
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from regfw.tensors import iter_tensors

#: Elementwise products, by the torch function or method name.
MUL = frozenset({"mul", "mul_", "__mul__", "__rmul__", "__imul__", "multiply"})
#: Matrix products (a softmax operand makes one a weighting).
MATMUL = frozenset({"matmul", "__matmul__", "__rmatmul__", "bmm", "mm"})
#: Functions that squash a value into a fixed range.
SQUASH = frozenset({"sigmoid", "sigmoid_", "hardsigmoid", "tanh", "tanh_", "softmax", "_softmax"})
SOFTMAX = frozenset({"softmax", "_softmax"})
#: Functions that pass a value on rearranged (a squashed value stays squashed through them).
_PASSING = frozenset({
    "view", "reshape", "flatten", "unflatten", "permute", "transpose", "swapaxes", "swapdims", "movedim",
    "contiguous", "squeeze", "unsqueeze", "t", "view_as", "reshape_as", "mT", "__getitem__", "expand",
    "expand_as", "split", "chunk", "unbind", "clone", "detach", "to", "repeat",
})
#: torch's own squashing modules, for the fx graph (no trace shows what a module's forward calls there).
_SQUASH_MODULES = (nn.Sigmoid, nn.Hardsigmoid, nn.Tanh, nn.Softmax)
#: The model's inputs: the lineage every computed tensor starts from.
INPUT = 0


#: Functions whose integer or bool operands (after the first, the indexed tensor) select positions.
_INDEXING = frozenset({
    "__getitem__", "__setitem__", "index_select", "gather", "take", "take_along_dim", "masked_select",
    "masked_fill", "masked_fill_", "index_put", "index_put_", "index_add", "index_copy", "index_fill", "scatter",
    "scatter_add", "scatter_reduce", "masked_scatter",
})


#: Functions whose output carries no gradient: a constant to training, as a parameter-free value is.
_DETACH = frozenset({"detach", "detach_"})


def tensors_in(value: Any) -> list[torch.Tensor]:
    """The tensors in ``value``: nested tuples, lists and dicts, and the attributes of a plain object
    holding them (torchvision's ``ImageList``: ``.tensors``)."""
    found = list(iter_tensors(value))
    if not found and hasattr(value, "__dict__") and not isinstance(value, (nn.Module, torch.Tensor)):
        found = list(iter_tensors(list(vars(value).values())))
    return found


def shape_only_factory(name: str) -> bool:
    """A function that reads only its tensor operand's shape, dtype and device (``zeros_like``,
    ``new_ones``): its output does not depend on the operand's values."""
    return name.endswith("_like") or (name.startswith("new_") and name != "new_tensor")


class Lineage:
    """Unit calls and the calls each tensor depends on, recorded during a traced forward pass (see the
    module docstring). Call 0 is the model's inputs."""

    def __init__(self) -> None:
        self.paths: list[str | None] = [None]
        self.preds: list[frozenset[int]] = [frozenset()]
        #: per call, whether it depends on the model's inputs (a call of constants only does not: an anchor
        #: generator that reads its inputs' shapes only)
        self.from_input: list[bool] = [True]
        #: tensor id -> the calls that last computed it
        self.of: dict[int, frozenset[int]] = {}
        #: tensor id -> the squashing function it comes out of
        self.squashed: dict[int, str] = {}
        #: the first call index inside each module running now (innermost last)
        self.scopes: list[int] = [1]
        #: the last function a unit's own forward called, and its output
        self.last_inner: tuple[str, object] | None = None
        #: tensors whose ids are recorded here and that nothing else keeps alive
        self.keep: list[torch.Tensor] = []

    def start(self, path: str) -> int:
        """A unit call begins: its index."""
        self.paths.append(path)
        self.preds.append(frozenset())
        self.from_input.append(False)
        return len(self.paths) - 1

    def finish(self, call: int, inputs: list[torch.Tensor], output: Any, given: set[int]) -> None:
        """A unit call ended: it read ``inputs`` and returned ``output`` (tensors in tuples, lists,
        dicts, or attributes of an object such as torchvision's ``ImageList``). An output that is one of its
        inputs (``given``) is the unit's own when the unit read it (an in-place ``ReLU``), and keeps its
        lineage when the unit only passed it on (FPN's extra block returns the list it got)."""
        preds = self._union(inputs)
        self.preds[call] = preds
        # an input of unknown origin (a parameter or buffer passed in, or a tensor no function returned
        # in sight) may depend on the model's inputs: counted so, as gating more only places less
        unknown = any(id(t) not in self.of for t in inputs)
        self.from_input[call] = unknown or any(self.from_input[p] for p in preds)
        read = {id(t) for t in inputs}
        last = self.last_inner
        for t in tensors_in(output):
            if id(t) in given and id(t) not in read:
                continue
            self.of[id(t)] = frozenset({call})
            if last is not None and last[1] is t and last[0] in SQUASH:
                self.squashed[id(t)] = last[0]
            else:
                self.squashed.pop(id(t), None)

    def follow(self, name: str, inputs: list[torch.Tensor], outputs: list[torch.Tensor]) -> None:
        """A function outside any unit read ``inputs`` and returned ``outputs``. The values it reads are
        those of every tensor operand except an index or mask (:data:`_INDEXING`: ``x[idx]`` depends on
        ``x``, not on the positions ``idx`` picks) and the operand of a factory that reads its shape only;
        ``x[idx] = v`` makes ``x`` depend on ``v`` too, and an in-place write into a view makes its base
        depend on what was written (torchvision's detection transform batches its images so). A detached
        value (``boxes.detach()``) is a constant to training: it depends on nothing, so multiplying by it
        scales a path and gates nothing."""
        if shape_only_factory(name) or name in _DETACH:
            source: frozenset[int] = frozenset()
        elif name in _INDEXING:
            source = self._union([t for k, t in enumerate(inputs)
                                  if k == 0 or t.is_floating_point() or t.is_complex()])
        else:
            source = self._union(inputs)
        if name == "__setitem__" and inputs:
            outputs = [inputs[0]]
        if inputs and (name == "__setitem__" or (name.endswith("_") and not name.startswith("_"))):
            base = inputs[0]._base  # an in-place write into a view (``batch[i].copy_(img)``) writes its base
            if base is not None:
                self.keep.append(base)
                self.of[id(base)] = self.of.get(id(base), frozenset()) | source
        squash = name if name in SQUASH else (
            self.squashed.get(id(inputs[0])) if name in _PASSING and len(inputs) == 1 else None)
        for t in outputs:
            self.of[id(t)] = source  # empty: a constant (a factory's, or of constants only)
            if squash:
                self.squashed[id(t)] = squash
            else:
                self.squashed.pop(id(t), None)

    def _union(self, tensors: Iterable[torch.Tensor]) -> frozenset[int]:
        return frozenset().union(*(self.of.get(id(t), frozenset()) for t in tensors))

    def _ancestors(self, frontier: frozenset[int], floor: int) -> set[int]:
        """The calls at index ``floor`` or later that ``frontier`` depends on (itself included): every
        predecessor has a lower index, so the walk never needs to go below ``floor``."""
        seen: set[int] = set()
        stack = [c for c in frontier if c >= floor]
        while stack:
            c = stack.pop()
            if c in seen:
                continue
            seen.add(c)
            stack.extend(p for p in self.preds[c] if p >= floor and p not in seen)
        return seen

    def gates(self, name: str, operands: list[torch.Tensor]) -> set[str]:
        """The units on a gating branch of the product ``name`` of ``operands`` (see the module docstring)."""
        if len(operands) != 2:
            return set()
        a, b = operands
        fa, fb = self.of.get(id(a)), self.of.get(id(b))
        if not fa or not fb or fa == fb:
            return set()
        if not any(self.from_input[c] for c in fa) or not any(self.from_input[c] for c in fb):
            return set()  # a value of constants or parameters only on one side: a scale
        squash = [self.squashed.get(id(a)), self.squashed.get(id(b))]
        if name in MATMUL:
            picked = [s in SOFTMAX for s in squash]
        else:
            picked = [s is not None for s in squash]
        if name in MATMUL and picked[0] == picked[1]:
            return set()
        floor = self.scopes[-1]
        anc_a, anc_b = self._ancestors(fa, floor), self._ancestors(fb, floor)
        sides = [anc_a - anc_b, anc_b - anc_a]
        if picked[0] != picked[1]:
            sides = [sides[0] if picked[0] else sides[1]]
        return {p for side in sides for c in side if (p := self.paths[c]) is not None}


# --------------------------------------------------------------------------- torch.fx


def _name(node: torch.fx.Node) -> str:
    if node.op in ("call_method", "call_function"):
        return node.target if isinstance(node.target, str) else getattr(node.target, "__name__", "")
    return ""


def _squash_of(node: torch.fx.Node, modules: dict[str, nn.Module]) -> str | None:
    """The squashing function ``node``'s value comes out of, seen through shape functions."""
    while True:
        name = _name(node)
        if name in SQUASH:
            return name
        if node.op == "call_module" and isinstance(modules.get(str(node.target)), _SQUASH_MODULES):
            return "softmax" if isinstance(modules[str(node.target)], nn.Softmax) else "sigmoid"
        if name in _PASSING and node.args and isinstance(node.args[0], torch.fx.Node):
            node = node.args[0]
            continue
        return None


def _scope(node: torch.fx.Node) -> str:
    """The path of the innermost module whose forward contains ``node`` ('' for the model's own)."""
    stack = node.meta.get("nn_module_stack") or {}
    return str(list(stack.values())[-1][0]) if stack else ""


def _inputs(values: frozenset) -> set:
    """The model inputs (placeholders) among ``values``."""
    return {n for n in values if n.op == "placeholder"}


def fx_gates(graph: torch.fx.Graph, units: dict[str, nn.Module], modules: dict[str, nn.Module]) -> set[str]:
    """The units on gating branches of a ``torch.fx`` graph (the rule of the module docstring; a unit is
    in the multiplying module's scope when its path lies under that module's path)."""
    cache: dict = {}
    found: set[str] = set()
    for node in graph.nodes:
        name = _name(node)  # ``operator.mul`` / ``operator.matmul`` are named ``mul`` / ``matmul``
        mul = name in MUL or node.target is operator.imul
        if not (mul or name in MATMUL) or len(node.args) < 2:
            continue
        a, b = node.args[0], node.args[1]
        if not isinstance(a, torch.fx.Node) or not isinstance(b, torch.fx.Node):
            continue
        anc_a, anc_b = ancestors(a, cache) | {a}, ancestors(b, cache) | {b}
        inputs_a, inputs_b = _inputs(anc_a), _inputs(anc_b)
        if not inputs_a & inputs_b:
            continue  # a parameter or a constant on one side: a scale, not a gate
        squash = [_squash_of(a, modules), _squash_of(b, modules)]
        picked = [s is not None for s in squash] if mul else [s in SOFTMAX for s in squash]
        if not mul and picked[0] == picked[1]:
            continue
        sides = [anc_a - anc_b, anc_b - anc_a]
        if picked[0] != picked[1]:
            sides = [sides[0] if picked[0] else sides[1]]
        scope = _scope(node)
        prefix = f"{scope}." if scope else ""
        for side in sides:
            for n in side:
                path = str(n.target)
                if n.op == "call_module" and path in units and path.startswith(prefix):
                    found.add(path)
    return found


def ancestors(node: torch.fx.Node, cache: dict) -> frozenset:
    """Every node ``node`` depends on (memoised in ``cache``)."""
    if node in cache:
        return cache[node]
    out: set = set()
    stack = list(node.all_input_nodes)
    while stack:
        n = stack.pop()
        if n in out:
            continue
        out.add(n)
        if n in cache:
            out |= cache[n]
            continue
        stack.extend(n.all_input_nodes)
    cache[node] = frozenset(out)
    return cache[node]
