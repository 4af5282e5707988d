"""The data flow of one forward pass as it runs: every aten op, with the tensors it reads and writes.

The placement checks of the zoo and the registry sweep ask questions of what a model *does*, not of
what its modules are called: does an inserted dropout sit between a weight op and a normalisation,
on a branch that multiplies another path (a gate), on what feeds attention's query, key or value,
after the last weight op before an output, in series with another stochastic layer, and does it run
at all. :func:`record` answers them from one forward pass under a
:class:`~torch.utils._python_dispatch.TorchDispatchMode`: every aten op becomes a node whose inputs are
the nodes that produced its tensor arguments (tensors are matched by identity; all are kept alive
while recording). Stochastic modules without parameters (dropout, stochastic depth, regfw's layers)
are single opaque nodes, so their own masks and scalings are not mistaken for the model's gates.

Ops are classified by what they compute, never by module or attribute names:

* a **weight op** is a matrix product, convolution or embedding lookup one of whose operands is
  derived from a parameter of at least two dimensions only (``aten.t(weight)`` counts);
* a **normalisation** is a batch, layer, group, instance or RMS normalisation op;
* an **attention** is ``scaled_dot_product_attention`` (q, k, v are its first three operands), a
  softmax of scores (a product of two computed operands q and k) whose output multiplies a computed
  operand v by a matrix product, or a factorised one, ``q (softmax(k)ᵀ v)`` (:func:`attention_operands`);
  a softmax over one weight op's output weighting a value (attention pooling) is not one;
* a **gate** is an elementwise multiply of two computed paths with a common ancestor: every op since
  they forked, inside the module that multiplies, on the path that ends in a squashing op (sigmoid,
  hard sigmoid, tanh, softmax) is on the gate; where neither or both do (a gated MLP's ``u * v``),
  both paths are. Paths are followed through the *values* an op reads (:attr:`Node.values`): the
  index or mask operand of an indexing op only selects positions, and a factory (``zeros_like``,
  ``new_ones``) reads its operand's shape and dtype only, so neither makes two paths share an ancestor
  (a detection loss's ``regression[fg] * anchor_widths[fg]`` multiplies the image's features by values
  of the image size: the matched indices ``fg`` they share are no fork of one path). Both paths, and
  their common ancestor, must depend on the input's values (:meth:`Graph.computed`): a value made of
  parameters, constants or labels only scales a path, it does not gate it. An in-place write into a
  view writes its base: a batch made by ``images[0].new_full(shape, 0)`` and ``batch[i].copy_(img)``
  (torchvision's detection transform) depends on the images.
"""
from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

WEIGHT_OPS = frozenset({"mm", "addmm", "bmm", "baddbmm", "matmul", "linear", "convolution", "_convolution",
                        "conv2d", "conv1d", "conv3d", "embedding", "_embedding_bag", "einsum"})
NORM_OPS = frozenset({"native_batch_norm", "_native_batch_norm_legit", "_native_batch_norm_legit_no_training",
                      "_batch_norm_with_update", "_batch_norm_no_update", "native_layer_norm", "native_group_norm",
                      "instance_norm", "_fused_rms_norm", "rms_norm", "batch_norm", "layer_norm", "group_norm"})
#: Ops that only move or reshape values: a weight op's output seen through them is still its output.
SHAPE_OPS = frozenset({"view", "_unsafe_view", "reshape", "permute", "transpose", "t", "contiguous", "clone",
                       "flatten", "squeeze", "unsqueeze", "expand", "slice", "select", "split", "split_with_sizes",
                       "chunk", "unbind", "alias", "detach", "_to_copy", "as_strided", "unflatten", "copy_",
                       "constant_pad_nd", "movedim"})
SOFTMAX_OPS = frozenset({"_softmax", "softmax", "_safe_softmax", "_log_softmax"})
SDPA_PREFIX = "_scaled_dot_product"
MUL_OPS = frozenset({"mul", "mul_"})
#: Ops whose integer or bool operands (after the first, the indexed tensor) select positions.
INDEX_OPS = frozenset({"index", "_index_put_impl_", "index_put", "index_put_", "index_select", "gather", "take",
                       "masked_select", "masked_fill", "masked_fill_", "masked_scatter", "index_add",
                       "index_copy", "index_fill", "scatter", "scatter_add", "scatter_reduce", "_unsafe_index"})
#: Ops that squash a value into a fixed range: the branch ending in one is the gate of a multiply.
SQUASH_OPS = frozenset({"sigmoid", "sigmoid_", "hardsigmoid", "hardsigmoid_", "tanh", "tanh_", *SOFTMAX_OPS})


def op_name(func: Any) -> str:
    """``aten.addmm.default`` -> ``addmm``."""
    name = getattr(func, "__name__", str(func))
    return name.split(".")[0]


@dataclass
class Node:
    """One op (``kind="op"``), one opaque stochastic module (``kind="module"``) or the inputs (``"input"``)."""

    index: int
    kind: str
    name: str  #: aten op name, or the module's path
    inputs: list[int]  #: producing nodes of the tensor operands, in order (-1: not produced here)
    scope: int  #: index of the first node recorded in the innermost module running this op
    weight: bool = False
    param_derived: bool = False
    operands: list[int] = field(default_factory=list)  #: the producer per tensor operand, -1 for none
    #: the producers of the operands whose values the op reads: not an index or mask of an indexing op
    #: (:data:`INDEX_OPS`), nothing of a factory that reads its operand's shape only (:func:`shape_only`)
    values: list[int] = field(default_factory=list)


@dataclass
class Graph:
    """The recorded pass: nodes in execution order, the nodes producing the output, module nodes by path."""

    nodes: list[Node]
    outputs: set[int]
    modules: dict[str, list[int]]  #: opaque module path -> its node(s) (one per call)
    calls: dict[str, int]  #: every module path -> how many times its forward ran

    def consumers(self) -> dict[int, list[int]]:
        out: dict[int, list[int]] = {}
        for node in self.nodes:
            for i in node.inputs:
                if i >= 0:
                    out.setdefault(i, []).append(node.index)
        return out

    def ancestors(self, start: int, values: bool = False) -> set[int]:
        """``start`` and every node it depends on; with ``values``, through the operands whose values
        each op reads only (:attr:`Node.values`)."""
        seen: set[int] = set()
        stack = [start]
        while stack:
            i = stack.pop()
            if i < 0 or i in seen:
                continue
            seen.add(i)
            stack.extend(self.nodes[i].values if values else self.nodes[i].inputs)
        return seen


    def computed(self) -> set[int]:
        """The nodes whose values depend on the input's (through :attr:`Node.values`): the paths of the
        forward pass. A value made of parameters, constants or labels only is none (a loss's class
        weights ``alpha * t + (1 - alpha) * (1 - t)`` of a target ``t`` scattered into ``zeros_like(logits)``)."""
        out: set[int] = set()
        for node in self.nodes:  # in execution order: every operand comes first
            if node.kind == "input" or any(i in out for i in node.values):
                out.add(node.index)
        return out


def shape_only(name: str) -> bool:
    """An op that reads only its tensor operand's shape, dtype and device (``zeros_like``, ``new_ones``)."""
    return name.endswith("_like") or name.startswith("new_")


def _value_operands(name: str, args: list[Tensor], operands: list[int]) -> list[int]:
    if shape_only(name):
        return []
    if name in INDEX_OPS:
        return [i for k, (a, i) in enumerate(zip(args, operands, strict=True))
                if i >= 0 and (k == 0 or a.is_floating_point() or a.is_complex())]
    return [i for i in operands if i >= 0]


class _Recorder(TorchDispatchMode):
    def __init__(self, params: set[int]) -> None:
        super().__init__()
        self.params = params
        self.nodes: list[Node] = []
        self.producer: dict[int, int] = {}
        self.keep: list[Tensor] = []
        self.opaque = 0
        self.scopes: list[int] = [0]

    def producer_of(self, t: Tensor) -> int:
        return self.producer.get(id(t), -1)

    def add(self, kind: str, name: str, args: list[Tensor], outs: list[Tensor]) -> Node:
        operands = [self.producer_of(a) for a in args]
        node_inputs = [i for i in operands if i >= 0]
        node = Node(len(self.nodes), kind, name, node_inputs, self.scopes[-1], operands=operands,
                    values=_value_operands(name, args, operands) if kind == "op" else node_inputs)
        self.nodes.append(node)
        for t in outs:
            self.producer[id(t)] = node.index
            self.keep.append(t)
        for a in args:
            self.keep.append(a)
        return node

    def derived(self, t: Tensor) -> bool:
        if id(t) in self.params:
            return t.dim() >= 2
        i = self.producer_of(t)
        return i >= 0 and self.nodes[i].param_derived

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        out = func(*args, **(kwargs or {}))
        if self.opaque:
            return out
        flat_in = [a for a in tree_flatten((args, kwargs or {}))[0] if isinstance(a, Tensor)]
        flat_out = [o for o in tree_flatten(out)[0] if isinstance(o, Tensor)]
        name = op_name(func)
        node = self.add("op", name, flat_in, flat_out)
        derived = [self.derived(a) for a in flat_in]
        node.param_derived = bool(flat_in) and all(d or id(a) in self.params for a, d in zip(flat_in, derived,
                                                                                                strict=True))
        node.weight = name in WEIGHT_OPS and any(derived) and not node.param_derived
        base = flat_in[0]._base if name.endswith("_") and flat_in else None
        if base is not None:  # an in-place write into a view (``batch[i].copy_(img)``) writes its base too
            self.producer[id(base)] = node.index
            self.keep.append(base)
        return out


def _opaque(module: nn.Module, stochastic: Callable[[nn.Module], bool]) -> bool:
    return stochastic(module) and next(module.parameters(recurse=True), None) is None


@contextlib.contextmanager
def _module_hooks(model: nn.Module, rec: _Recorder, stochastic: Callable[[nn.Module], bool],
                  graph_modules: dict[str, list[int]], calls: dict[str, int]) -> Iterator[None]:
    handles = []
    for path, module in model.named_modules():
        opaque = _opaque(module, stochastic)

        def pre(_m: nn.Module, args: Any, path: str = path, opaque: bool = opaque) -> None:
            calls[path] = calls.get(path, 0) + 1
            if opaque:
                rec.opaque += 1
                rec.pending = getattr(rec, "pending", [])
                rec.pending.append([a for a in tree_flatten(args)[0] if isinstance(a, Tensor)])
            else:
                rec.scopes.append(len(rec.nodes))

        def post(_m: nn.Module, _args: Any, out: Any, path: str = path, opaque: bool = opaque) -> None:
            if opaque:
                rec.opaque -= 1
                args = rec.pending.pop()
                if not rec.opaque:
                    node = rec.add("module", path, args, [o for o in tree_flatten(out)[0] if isinstance(o, Tensor)])
                    graph_modules.setdefault(path, []).append(node.index)
            else:
                rec.scopes.pop()

        handles.append(module.register_forward_pre_hook(pre))
        handles.append(module.register_forward_hook(post, always_call=True))
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def record(model: nn.Module, inputs: Any, stochastic: Callable[[nn.Module], bool],
           run: Callable[[nn.Module, Any], Any] | None = None) -> Graph:
    """Run ``run(model, inputs)`` (default ``model(inputs)``) once, without gradients, and return its
    :class:`Graph`. ``stochastic(module)`` says which modules are random (opaque nodes when they hold no
    parameters). The hooks are removed afterwards; the model is otherwise untouched."""
    params = {id(p) for p in model.parameters()}
    rec = _Recorder(params)
    modules: dict[str, list[int]] = {}
    calls: dict[str, int] = {}
    run = run or (lambda m, x: m(x))
    rec.add("input", "input", [], [t for t in tree_flatten(inputs)[0] if isinstance(t, Tensor)])
    with torch.no_grad(), _module_hooks(model, rec, stochastic, modules, calls), rec:
        out = run(model, inputs)
    outputs = {rec.producer_of(t) for t in tree_flatten(out)[0] if isinstance(t, Tensor)} - {-1}
    return Graph(rec.nodes, outputs, modules, calls)


# --------------------------------------------------------------------------- questions


def _walk(graph: Graph, start: int, forward: bool, through: Callable[[Node], bool],
          consumers: dict[int, list[int]]) -> Iterator[Node]:
    """Nodes reached from ``start`` (not included) forward or backward: every node ``through`` lets
    the walk pass, and every node where it stops (a weight op, say), which the caller must tell apart."""
    seen = {start}
    stack = [start]
    while stack:
        i = stack.pop()
        nxt = consumers.get(i, []) if forward else graph.nodes[i].inputs
        for j in nxt:
            if j in seen:
                continue
            seen.add(j)
            node = graph.nodes[j]
            yield node
            if through(node):
                stack.append(j)


def _is_shape(node: Node) -> bool:
    return node.kind == "op" and node.name in SHAPE_OPS


def between_weight_and_norm(graph: Graph, node: int, consumers: dict[int, list[int]]) -> str | None:
    """The normalisation the module node feeds through shape ops only, when a weight op reaches its
    input through shape ops only; None otherwise."""
    weight = any(n.weight for n in _walk(graph, node, False, _is_shape, consumers))
    if not weight:
        return None
    for n in _walk(graph, node, True, _is_shape, consumers):
        if n.kind == "op" and n.name in NORM_OPS:
            return n.name
    return None


def reaches_output(graph: Graph, node: int, consumers: dict[int, list[int]]) -> bool:
    """Whether the node's output reaches a model output with no weight op between."""
    if node in graph.outputs:
        return True
    return any(n.index in graph.outputs and not n.weight
               for n in _walk(graph, node, True, lambda n: not n.weight, consumers))


@dataclass
class _Weighting:
    """A softmax's output on its way to the value: the operand nodes seen so far (q and k of the scores,
    or k alone for a factorised softmax) and whether the query is still to come (factorised)."""

    operands: list[int]
    factorised: bool


def _product(node: Node) -> tuple[int, int] | None:
    """The two operand producers of a matrix product of computed values (not a weight op), else None."""
    if not _is_matmul(node) or node.weight or node.param_derived:
        return None
    ops = node.operands[-2:] if node.name == "baddbmm" else node.operands[:2]
    return (ops[0], ops[1]) if len(ops) == 2 else None


def attention_operands(graph: Graph, consumers: dict[int, list[int]]) -> list[int]:
    """The producing nodes of every attention's query, key and value operands (and of the probabilities
    the value is weighted by), labelling values forward in execution order:

    * a product of two computed operands is *scores*; scores stay scores through every op that is not
      a product (reshapes, scaling, masks, biases, a weight op mixing heads);
    * the softmax of scores is a weighting (q, k: the product's operands); its product with a computed
      operand ``v`` completes an attention;
    * the softmax of a computed value that is not scores (``softmax(k)``) is a factorised weighting: its
      product with ``v`` is a *context*, and the context's product with a third operand ``q`` (no weight
      op between) completes an attention. Weightings combined elementwise (ConViT's gated sum of
      ``softmax(q kᵀ)`` and a positional softmax) are one weighting. A context that meets a weight op
      first is attention pooling (a global-context block's ``softmax(conv(x))`` weighting ``x``), not attention.

    Walking back from a softmax through weight ops instead (as an earlier version did) reached the
    product of an earlier block (an attention-pooling product, a factorised attention's output) and called
    any later softmax attention, with that product's operands as its q and k."""
    del consumers  # the labels follow execution order
    found: list[int] = []
    scores: dict[int, tuple[int, int]] = {}
    weighting: dict[int, _Weighting] = {}
    context: dict[int, list[int]] = {}
    for node in graph.nodes:
        if node.kind == "op" and node.name.startswith(SDPA_PREFIX):
            found.extend(i for i in node.operands[:3] if i >= 0)
            continue
        product = _product(node) if node.kind == "op" else None
        if product is not None:
            a, b = product
            side = a if a in weighting else b if b in weighting else None
            ctx = a if a in context else b if b in context else None
            if side is not None:
                w, other = weighting[side], b if side == a else a
                if w.factorised:
                    context[node.index] = [*w.operands, side, other]
                else:
                    found.extend(i for i in (*w.operands, side, other) if i >= 0)
            elif ctx is not None:
                other = b if ctx == a else a
                found.extend(i for i in (*context[ctx], ctx, other) if i >= 0)
            else:
                scores[node.index] = (a, b)
            continue
        if node.kind == "op" and node.name in SOFTMAX_OPS and node.operands:
            source = node.operands[0]
            if source in scores:
                weighting[node.index] = _Weighting(list(scores[source]), factorised=False)
            elif source not in weighting and source not in context:
                weighting[node.index] = _Weighting([source], factorised=True)
            continue
        labels_s = {scores[i] for i in node.inputs if i in scores}
        labels_w = list({id(weighting[i]): weighting[i] for i in node.inputs if i in weighting}.values())
        if node.weight:  # a factorised weighting waits for its value and query with no weight op between
            labels_w = [w for w in labels_w if not w.factorised]
        labels_c = list({id(context[i]): context[i] for i in node.inputs if i in context}.values())
        if len(labels_s) == 1 and not labels_w:
            scores[node.index] = labels_s.pop()
        elif labels_w and not labels_s:  # several weightings summed (a gated mix) make one
            weighting[node.index] = labels_w[0] if len(labels_w) == 1 else _Weighting(
                [i for w in labels_w for i in w.operands], all(w.factorised for w in labels_w))
        if len(labels_c) == 1 and not node.weight:
            context[node.index] = labels_c[0]
    return found


def _is_matmul(node: Node) -> bool:
    return node.kind == "op" and node.name in ("mm", "bmm", "matmul", "baddbmm", "einsum")


def feeds_qkv(graph: Graph, node: int, qkv: list[int], consumers: dict[int, list[int]]) -> bool:
    """Whether the module node's output reaches a q/k/v operand with no weight op between."""
    targets = set(qkv)
    if node in targets:
        return True
    return any(n.index in targets and not n.weight
               for n in _walk(graph, node, True, lambda n: not n.weight and not _is_matmul(n)
                              and n.name not in SOFTMAX_OPS, consumers))


def gate_nodes(graph: Graph) -> set[int]:
    """Every node on a gate (see the module docstring)."""
    on_gate: set[int] = set()
    computed = graph.computed()
    for node in graph.nodes:
        if node.kind != "op" or node.name not in MUL_OPS or len(node.operands) < 2:
            continue
        a, b = node.operands[0], node.operands[1]
        if a < 0 or b < 0 or graph.nodes[a].param_derived or graph.nodes[b].param_derived:
            continue
        if a not in computed or b not in computed:
            continue
        left, right = graph.ancestors(a, values=True), graph.ancestors(b, values=True)
        common = {i for i in left & right if i in computed}
        if not common:
            continue
        squashed = [_squashed(graph, a), _squashed(graph, b)]
        sides = [left - right, right - left]
        if squashed[0] != squashed[1]:
            sides = [sides[0] if squashed[0] else sides[1]]
        on_gate |= {i for side in sides for i in side if i >= node.scope}
    return on_gate


def _squashed(graph: Graph, index: int) -> bool:
    """Whether the value comes out of a squashing op, seen through shape ops."""
    node = graph.nodes[index]
    while _is_shape(node) and node.inputs:
        node = graph.nodes[node.inputs[0]]
    return node.kind == "op" and node.name in SQUASH_OPS


def in_series(graph: Graph, node: int, others: set[int], consumers: dict[int, list[int]]) -> int | None:
    """Another stochastic module node the module node's output reaches (or is reached from) through
    shape ops and elementwise activations only (no weight op, normalisation or join between)."""
    def through(n: Node) -> bool:
        return n.kind == "op" and not n.weight and n.name not in NORM_OPS and len(n.inputs) <= 1
    for forward in (True, False):
        for n in _walk(graph, node, forward, through, consumers):
            if n.index in others:
                return n.index
    return None
