"""What feeds what inside a model: the module-to-module dataflow and the residual adds.

Surgery needs two facts a module tree does not tell: which module consumes a layer's output
(to place dropout after the activation that follows a layer, never between a layer and its
BatchNorm), and where a residual branch joins its shortcut (to put DropPath on the branch).

:class:`Dataflow` records module-to-module links between *units* (leaf modules, and the
attention and recurrent layers and norms as wholes). It is built from the best source available:

``trace``
    one forward pass of an example input in eval mode: a link ``a -> b`` is recorded when the
    tensor ``a`` returned is the very tensor object ``b`` receives, and a torch function mode
    sees every function that consumes ``a`` outside any unit (``x + a``, ``F.relu(a)``). A unit's
    output passed through shape functions (:data:`SHAPE_OPS`: ``flatten``, ``permute``, ...) or a
    functional elementwise nonlinearity (``F.relu``) stays that unit's output. When the eval pass
    leaves units uncalled, a training-mode pass adds the units that run only in training (an
    auxiliary head) and their outputs. Both passes run inside :func:`regfw.placement.untouched.untouched`, so the model
    keeps no cache entry, attribute or statistic from them. Works for every model.
``fx``
    without an example input, ``torch.fx`` symbolic tracing, when the model can be traced; the
    graph shows the same links and functional consumers.
``sequential``
    otherwise only the order of the children of each ``nn.Sequential``.

A unit whose output also goes to a function (the residual stream ``x`` of ``x + f(norm(x))``)
has no single successor, so nothing is placed past it: dropout after ``norm`` would drop only the
branch, not ``x``. Reading a tensor's shape, size or dtype does not count as consuming it.

Residual adds come from a captured graph (:func:`find_residuals`: ``torch.fx``, else ``torch.export``; where
neither takes the whole model, the submodules ``torch.fx`` can trace, :func:`residuals_by_parts`): an add is
invisible to module hooks. The add ``a + b`` is residual when one operand is computed from the other or both
from a common tensor, and one of them (the *branch*) runs more parameterised modules than the
other (the *shortcut*). DropPath then hangs, as a forward hook, on the module that produces the
branch operand, so the model object, its class and its parameter names stay as they are.
"""
from __future__ import annotations

import operator
from collections.abc import Iterable
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

import torch
from torch import nn

from regfw.placement import foreign, gating, tracing
from regfw.placement import kinds as K
from regfw.placement.untouched import untouched
from regfw.tensors import iter_tensors

#: The name prefix of the modules regfw inserts (every part of regfw reads it from here).
INJECTED_PREFIX = "regfw_"

#: Activations that commute with multiplying a sample by a non-negative factor
#: (``f(m * x) = m * f(x)`` for ``m >= 0``): a per-sample or per-element non-negative mask may be
#: applied before them instead of after, with the same result.
POSITIVELY_HOMOGENEOUS = (nn.ReLU, nn.LeakyReLU, nn.Identity)

_ADD_FUNCTIONS = {operator.add, operator.iadd, torch.add, torch.ops.aten.add.Tensor, torch.ops.aten.add_.Tensor}
_ADD_METHODS = {"add", "add_"}
#: The successor recorded for a unit whose output a function (not a unit) consumes.
FUNCTION = "<function>"
#: Tensor methods and attributes that read metadata only: not a use of the values.
_METADATA = {"size", "dim", "numel", "__len__", "stride", "is_contiguous", "element_size", "shape",
             "dtype", "device", "ndim", "is_cuda", "requires_grad", "__get__", "data_ptr", "nelement",
             "get_device", "__format__", "__repr__"}


@dataclass
class Dataflow:
    """Module-to-module links between the units of a model (paths as in ``named_modules``)."""

    source: str
    successors: dict[str, list[str]] = field(default_factory=dict)
    predecessors: dict[str, list[str]] = field(default_factory=dict)
    calls: dict[str, int] = field(default_factory=dict)
    #: Rank of each unit's (first) output tensor, when traced with an example input.
    out_dims: dict[str, int] = field(default_factory=dict)
    #: Units in the order a forward pass first calls them (trace and fx only).
    order: list[str] = field(default_factory=list)
    #: Units on a *gating branch* (:mod:`regfw.placement.gating`): those one operand of a product depends on
    #: and the other does not, inside the module that multiplies (the whole ``fc1 -> relu -> fc2 -> sigmoid``
    #: branch of a squeeze-excitation ``x * s``, both branches of a gated linear unit ``u * v``).
    gates: set[str] = field(default_factory=set)
    #: Units whose output reaches a model output with no unit with parameters in between (trace only;
    #: parameterless units and norms pass their sources on).
    output_sources: set[str] = field(default_factory=set)
    #: Names of the torch functions each unit's own forward called (trace only).
    inner_calls: dict[str, set[str]] = field(default_factory=dict)
    #: Units whose output has the shape of their input (trace only).
    same_shape: set[str] = field(default_factory=set)
    #: Names of the functions (outside any unit) that consume each unit's output.
    function_users: dict[str, set[str]] = field(default_factory=dict)
    #: Units whose forward only rearranges its input (a ``Permute`` or ``Flatten`` module): their
    #: forward calls shape functions only (:data:`SHAPE_OPS`) and keeps the number of elements (trace only).
    reshapes: set[str] = field(default_factory=set)
    #: Units that run only in training mode (an auxiliary head), seen by a second, training-mode pass
    #: made when the eval pass left units uncalled (trace only).
    training_only: set[str] = field(default_factory=set)
    #: Units whose forward only pools its input (:func:`is_pool_op` functions, and shape functions), with no
    #: parameters: a ``MaxPool2d``, an ``AdaptiveAvgPool2d``, a global pool of any library (trace only).
    pools: set[str] = field(default_factory=set)
    #: ``a -> [b, ...]``: unit ``b`` receives ``a``'s output through a pooling function (``F.adaptive_avg_pool2d``,
    #: ``x.mean((2, 3))``, then shape functions); such a link is kept apart from :attr:`successors`, where the
    #: pooling function is a :data:`FUNCTION` user of ``a`` (trace only).
    pooled: dict[str, list[str]] = field(default_factory=dict)
    #: True when every unit the forward can call was seen (an example-input trace whose eval pass called
    #: every unit, or whose training pass ran too): a unit absent from ``calls`` is then dead (its weights
    #: are used functionally, or it is never reached). Never set for the fx and sequential sources.
    complete: bool = False
    #: ``(a, b) -> n``: how many calls of unit ``b`` received the output of a call of unit ``a`` as their
    #: input (trace and fx; :attr:`successors` records each link once).
    feeds: dict[tuple[str, str], int] = field(default_factory=dict)

    def link(self, a: str, b: str, function: str = "") -> None:
        """Record that ``b`` (a unit, or :data:`FUNCTION` named ``function``) consumes the output of
        unit ``a``."""
        if b != FUNCTION:
            self.feeds[(a, b)] = self.feeds.get((a, b), 0) + 1
        if b == FUNCTION and function:
            self.function_users.setdefault(a, set()).add(function)
        if b not in self.successors.setdefault(a, []):
            self.successors[a].append(b)
        if b != FUNCTION and a not in self.predecessors.setdefault(b, []):
            self.predecessors[b].append(a)

    def next(self, path: str) -> str | None:
        """The one unit that consumes ``path``'s output, or None (none, several, a function, or
        unknown)."""
        succ = self.successors.get(path, [])
        return succ[0] if len(succ) == 1 and succ[0] != FUNCTION else None

    def next_through_pool(self, path: str) -> str | None:
        """The one unit that receives ``path``'s output through pooling functions only (``x.mean((2, 3))``
        then ``flatten``), and nothing else from anywhere; None otherwise."""
        users = self.function_users.get(path, set())
        if self.successors.get(path) != [FUNCTION] or not users or not all(
                n in SHAPE_OPS or is_pool_op(n) for n in users):
            return None
        succ = self.pooled.get(path, [])
        if len(succ) != 1 or self.predecessors.get(succ[0]):
            return None
        feeders = [a for a, bs in self.pooled.items() if succ[0] in bs]
        return succ[0] if feeders == [path] else None

    def prev(self, path: str) -> str | None:
        """The one unit whose output ``path`` consumes, or None."""
        pred = self.predecessors.get(path, [])
        return pred[0] if len(pred) == 1 else None

    def called_once(self, path: str) -> bool:
        """True unless the unit is known to run more than once per forward pass (a shared
        module, such as the one ``nn.ReLU`` a torchvision ResNet block calls twice): a hook on
        such a module would act at every call."""
        return self.calls.get(path, 1) == 1

    def paired(self, a: str, b: str) -> bool:
        """True when every call of unit ``b`` consumes the output of one call of unit ``a`` and every call of
        ``a`` feeds one call of ``b``: both run once, or equally often with each of ``b``'s calls fed by ``a``
        (a detection head's ``conv -> GroupNorm -> ReLU`` applied once per feature level). A hook on ``b`` then
        acts exactly where a hook on ``a`` would; a shared module (the one ``nn.ReLU`` a ResNet block calls
        twice, once on another path) is not paired."""
        if self.called_once(a) and self.called_once(b):
            return True
        n = self.calls.get(b, 0)
        return n > 0 and self.calls.get(a) == n == self.feeds.get((a, b))


def _first_tensor(value: Any) -> torch.Tensor | None:
    if isinstance(value, torch.Tensor):
        return value
    if isinstance(value, (tuple, list)) and value and isinstance(value[0], torch.Tensor):
        return value[0]
    return None


def is_pool_op(name: str) -> bool:
    """A torch function that pools over positions: every ``*pool*`` function (max, average, adaptive, Lp)
    and the reductions ``mean`` / ``amax`` a global pool is written with."""
    return "pool" in name or name in ("mean", "amax")


#: Functions that only rearrange a tensor's elements: a unit's output passed through them (``x.flatten(0, 1)``,
#: ``x.permute(0, 2, 3, 1)``, ``x.transpose(-1, -2)``) is still that unit's output to whatever consumes it, so a
#: norm after a reshape still directly follows its layer, and a gate stays a gate after a transpose.
SHAPE_OPS = frozenset({
    "view", "reshape", "flatten", "unflatten", "permute", "transpose", "swapaxes", "swapdims", "movedim",
    "contiguous", "squeeze", "unsqueeze", "t", "view_as", "reshape_as", "mT",
})
#: Methods whose second tensor operand gives a shape only (``y.reshape_as(x)`` reads the shape of ``x``).
_SHAPE_OF_SECOND = frozenset({"view_as", "reshape_as", "expand_as", "type_as"})


class _FunctionWatch(torch.overrides.TorchFunctionMode):
    """Sees every torch function called outside a unit and marks the units whose outputs it
    consumes (``x + a``, ``F.relu(a)``, ``a.flatten(1)``); records the functions a unit calls
    itself, the gating branches of products (by the lineage of unit calls, :class:`gating.Lineage`), and
    which units each tensor comes from without a unit with parameters in between (``sources``)."""

    def __init__(self, flow: Dataflow, producer: dict[int, str], depth: list[int], current: list[str],
                 sources: dict[int, frozenset], keep: list, unit_inputs: list[tuple[set[int], set[int]]],
                 silent: list[int], pooled: dict[int, str], lineage: gating.Lineage) -> None:
        super().__init__()
        self.lineage = lineage
        #: tensor id -> the unit whose output it is, pooled (then reshaped): see :attr:`Dataflow.pooled`
        self.pooled = pooled
        self.flow, self.producer, self.depth, self.current = flow, producer, depth, current
        self.sources, self.keep = sources, keep
        #: per running unit call: (ids of its input tensors, ids of those whose values it used)
        self.unit_inputs = unit_inputs
        #: > 0 while a module regfw inserted runs: its functions are not the host's own
        self.silent = silent
        self.chain: dict[int, str] = {}

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        if self.silent[0] > 0:
            return func(*args, **kwargs)
        if self.depth[0] > 0:
            if self.current and name not in _METADATA:
                self.flow.inner_calls.setdefault(self.current[-1], set()).add(name)
                if self.unit_inputs:
                    given, used = self.unit_inputs[-1]
                    used.update(i for i in map(id, (*iter_tensors(args), *iter_tensors(kwargs))) if i in given)
                out = func(*args, **kwargs)
                self.lineage.last_inner = (name, out)  # a unit's forward ending in a squash squashes
                return out
            return func(*args, **kwargs)
        if name in _METADATA:
            return func(*args, **kwargs)
        inputs = [*iter_tensors(args), *iter_tensors(kwargs)]
        if name in _SHAPE_OF_SECOND and len(inputs) == 2:
            inputs = inputs[:1]
        out = self._outside(func, name, inputs, args, kwargs)
        outputs = list(iter_tensors(out))
        self.keep.extend(outputs)
        self.lineage.follow(name, inputs, outputs)
        if name in gating.MUL or name in gating.MATMUL:
            self.flow.gates |= self.lineage.gates(name, inputs)
        return out

    def _outside(self, func, name: str, inputs: list[torch.Tensor], args, kwargs):
        """Call ``func`` (run outside any unit) and record which units' outputs it consumes."""
        if name in SHAPE_OPS and len(inputs) == 1 and id(inputs[0]) in self.producer:
            out = func(*args, **kwargs)
            if isinstance(out, torch.Tensor):  # a reshaped unit output is that unit's output
                self.keep.append(out)
                self.producer[id(out)] = self.producer[id(inputs[0])]
                if id(inputs[0]) in self.sources:
                    self.sources[id(out)] = self.sources[id(inputs[0])]
            return out
        out = func(*args, **kwargs)
        if len(inputs) == 1 and id(inputs[0]) in self.producer and isinstance(out, torch.Tensor) and (
                name in _ELEMENTWISE_NONLINEAR or (name in SCALAR_ARITHMETIC and out.shape == inputs[0].shape)):
            # ``F.relu(fc(x))``, in place or not, or ``0 + bn(x)``, ``x * 0.5``: the unit's output, changed
            # elementwise with nothing else flowing in, goes on to whatever reads it next (a dropout module there
            # is that place's dropout); the function is recorded as a user of the unit (no hook can follow
            # it), not as a branch
            src = self.producer[id(inputs[0])]
            self.flow.function_users.setdefault(src, set()).add(name)
            self.keep.append(out)
            self.producer[id(out)] = src
            if id(inputs[0]) in self.sources:
                self.sources[id(out)] = self.sources[id(inputs[0])]
            return out
        for t in inputs:
            consumed = self.producer.get(id(t))
            if consumed is not None:
                self.flow.link(consumed, FUNCTION, name)
        if len(inputs) == 1 and isinstance(out, torch.Tensor):
            # ``x.mean((2, 3))``, ``F.adaptive_avg_pool2d(x, 1).flatten(1)``: the unit the pooled value reaches
            via = self.producer.get(id(inputs[0])) if is_pool_op(name) else None
            if via is None and (name in SHAPE_OPS or is_pool_op(name)):
                via = self.pooled.get(id(inputs[0]))
            if via is not None:
                self.keep.append(out)
                self.pooled[id(out)] = via
        # a chain of one-tensor functions after a unit (``F.dropout(torch.relu(fc(x)))``): each function
        # on it counts as a user of that unit
        origin = self.chain.get(id(inputs[0])) if len(inputs) == 1 else None
        if origin is not None:
            self.flow.function_users.setdefault(origin, set()).add(name)
        elif len(inputs) == 1:
            origin = self.producer.get(id(inputs[0]))
        if origin is not None:
            for t in iter_tensors(out):
                self.keep.append(t)
                self.chain[id(t)] = origin
        carried = frozenset().union(*(self.sources.get(id(t), frozenset()) for t in inputs))
        if carried:
            for t in iter_tensors(out):
                self.keep.append(t)
                self.sources[id(t)] = self.sources.get(id(t), frozenset()) | carried
        return out


#: Elementwise arithmetic by function name (methods, operators and in-place forms): applied to one tensor and
#: constants (``0 + x``, ``x * 0.5``, ``out += 0``) it passes that tensor on with no other value flowing in.
SCALAR_ARITHMETIC = frozenset({
    "add", "sub", "mul", "div", "true_divide", "neg", "rsub", "add_", "sub_", "mul_", "div_", "neg_",
    "__add__", "__radd__", "__iadd__", "__sub__", "__rsub__", "__isub__", "__mul__", "__rmul__", "__imul__",
    "__truediv__", "__rtruediv__", "__itruediv__", "__neg__", "iadd", "isub", "imul", "itruediv", "truediv",
})

#: Elementwise nonlinearities by function name (those of :data:`regfw.placement.structure.NONLINEAR` that may act in
#: place; kept here so that this module does not import the one that reads it).
_ELEMENTWISE_NONLINEAR = frozenset({
    "relu", "relu_", "relu6", "gelu", "silu", "silu_", "sigmoid", "sigmoid_", "hardsigmoid", "hardswish",
    "hardswish_", "tanh", "tanh_", "mish", "elu", "elu_", "selu", "selu_", "celu", "celu_", "leaky_relu",
    "leaky_relu_", "softplus", "hardtanh", "hardtanh_",
})


def _weighted(module: nn.Module) -> bool:
    """A unit with parameters of its own that is not a norm: where a path to an output stops."""
    norm = isinstance(module, (nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm, nn.RMSNorm))
    return not norm and K.builtin_kind(module) != K.ACTIVATION and any(True for _ in module.parameters())


def _trace(model: nn.Module, units: dict[str, nn.Module], example_input: Any) -> Dataflow:
    """The dataflow of one eval-mode pass; when it leaves units uncalled, a second pass in training mode
    (BatchNorm statistics, random state and every attribute restored after) adds the units that run only in
    training (an auxiliary classifier) and the training outputs they reach."""
    flow = _trace_pass(model, units, example_input, training=False)
    uncalled = {p: m for p, m in units.items() if p not in flow.calls}
    if not uncalled:
        flow.complete = True
        return flow
    try:
        with torch.random.fork_rng(devices=[]):
            train = _trace_pass(model, units, example_input, training=True)
    except Exception:  # noqa: BLE001 - a model that cannot run a training pass here (needs targets, batch of 1)
        return flow
    _merge_training(flow, train)
    flow.complete = True
    return flow


def _merge_training(flow: Dataflow, train: Dataflow) -> None:
    """Add to ``flow`` (an eval pass) what the training pass ``train`` shows of the units the eval pass
    did not call, and the training outputs."""
    extra = [p for p in train.order if p not in flow.calls]
    flow.training_only.update(extra)
    flow.order.extend(extra)
    for a, succ in train.successors.items():
        for b in succ:
            if a in flow.training_only or b in flow.training_only:
                flow.link(a, b)
                if b != FUNCTION:
                    flow.feeds[(a, b)] = train.feeds.get((a, b), 1)
    for p in extra:
        flow.calls[p] = train.calls[p]
        for table in ("out_dims", "inner_calls", "function_users"):
            if p in getattr(train, table):
                getattr(flow, table)[p] = getattr(train, table)[p]
    flow.same_shape |= train.same_shape & flow.training_only
    flow.reshapes |= train.reshapes & flow.training_only
    flow.pools |= train.pools & flow.training_only
    for a, pooled in train.pooled.items():
        for b in pooled:
            if (a in flow.training_only or b in flow.training_only) and b not in flow.pooled.get(a, []):
                flow.pooled.setdefault(a, []).append(b)
    flow.gates |= train.gates & flow.training_only
    flow.output_sources |= train.output_sources


def _trace_pass(model: nn.Module, units: dict[str, nn.Module], example_input: Any, training: bool) -> Dataflow:
    flow = Dataflow("trace")
    producer: dict[int, str] = {}
    keep: list[torch.Tensor] = []  # keeps every recorded tensor alive so that ids stay unique
    depth = [0]  # > 0 while a unit runs: its internal functions are not consumers
    current: list[str] = []
    sources: dict[int, frozenset] = {}
    in_sources: dict[str, frozenset] = {}
    in_shapes: dict[str, tuple] = {}
    # a parameterless unit passes on the sources of the inputs whose values it uses, not of those it
    # reads the shape of only (torchvision's AnchorGenerator reads the feature maps' sizes)
    unit_inputs: list[tuple[set[int], set[int]]] = []
    in_tensors: dict[str, list[torch.Tensor]] = {}
    handles = []
    silent = [0]
    pooled: dict[int, str] = {}
    lineage = gating.Lineage()
    call_index: list[int] = []  # per running unit call: its index in ``lineage``

    def pre(path: str):
        def hook(module, args, kwargs):
            depth[0] += 1
            current.append(path)
            call_index.append(lineage.start(path))
            ts = [*iter_tensors(args), *iter_tensors(kwargs)]
            in_tensors[path] = ts
            unit_inputs.append(({id(t) for t in ts}, set()))
            if ts:
                in_shapes[path] = tuple(ts[0].shape)
            flow.calls[path] = flow.calls.get(path, 0) + 1
            if path not in flow.order:
                flow.order.append(path)
            first = _first_tensor(args) if args else None
            if first is None:
                first = next((v for v in kwargs.values() if isinstance(v, torch.Tensor)), None)
            if first is not None and id(first) in producer:
                flow.link(producer[id(first)], path)
            elif first is not None and id(first) in pooled and path not in flow.pooled.get(pooled[id(first)], []):
                flow.pooled.setdefault(pooled[id(first)], []).append(path)
        return hook

    def post(path: str):
        def hook(module, args, output):
            depth[0] -= 1
            if current:
                current.pop()
            given, used = unit_inputs.pop() if unit_inputs else (set(), set())
            ts = in_tensors.pop(path, [])
            # a unit whose forward showed no function at all (an op no torch function mode sees): every
            # input counts as used
            read = [t for t in ts if id(t) in used] if flow.inner_calls.get(path) else ts
            in_sources[path] = frozenset().union(*(sources.get(id(t), frozenset()) for t in read))
            if call_index:
                lineage.finish(call_index.pop(), read, output, given)
            out = _first_tensor(output)
            if out is not None:
                keep.append(out)
                producer[id(out)] = path
                flow.out_dims.setdefault(path, out.dim())
                if in_shapes.get(path) == tuple(out.shape):
                    flow.same_shape.add(path)
                calls = flow.inner_calls.get(path, set())
                if (calls and calls <= SHAPE_OPS and not any(True for _ in module.parameters()) and ts
                        and ts[0].numel() == out.numel()):
                    flow.reshapes.add(path)
                elif (calls and any(is_pool_op(c) for c in calls)
                      and all(c in SHAPE_OPS or is_pool_op(c) for c in calls)
                      and not any(True for _ in module.parameters())):
                    flow.pools.add(path)
            carried = frozenset({path}) if _weighted(module) else in_sources.get(path, frozenset()) | {path}
            for t in iter_tensors(output):
                if id(t) in given:
                    continue  # an input passed through unchanged (FPN's extra block returns the list it got)
                keep.append(t)
                sources[id(t)] = carried
        return hook

    def enter(module, args):  # a module that is no unit: a scope for the gates of the products it computes
        lineage.scopes.append(len(lineage.paths))

    def leave(module, args, output):
        lineage.scopes.pop()

    def hush(module, args):
        silent[0] += 1

    def unhush(module, args, output):
        silent[0] -= 1

    with untouched(model):
        for path, module in units.items():
            # First before any other pre-hook, last after any other hook: regfw's own hooks (and the
            # modules they call) count as part of the unit.
            handles.append(module.register_forward_pre_hook(pre(path), with_kwargs=True, prepend=True))
            handles.append(module.register_forward_hook(post(path)))
        for path, module in model.named_modules():  # what regfw inserted is not part of its host's forward
            if path.rsplit(".", 1)[-1].startswith(INJECTED_PREFIX):
                handles.append(module.register_forward_pre_hook(hush))
                handles.append(module.register_forward_hook(unhush, always_call=True))
            elif path not in units:
                handles.append(module.register_forward_pre_hook(enter))
                handles.append(module.register_forward_hook(leave, always_call=True))
        for t in iter_tensors(example_input):
            lineage.of[id(t)] = frozenset({gating.INPUT})
        try:
            model.train(training)
            with torch.no_grad(), foreign.watch_functional_dropout(model), \
                    _FunctionWatch(flow, producer, depth, current, sources, keep, unit_inputs, silent, pooled,
                                   lineage):
                output = call_with_example(model, example_input)
            for t in iter_tensors(output):
                flow.output_sources |= sources.get(id(t), frozenset())
        finally:
            for h in handles:
                h.remove()
    return flow


def call_with_example(model: nn.Module, example_input: Any) -> Any:
    """Run ``model`` on an example input: a tensor is one batch (``model(x)``), a tuple is the
    positional arguments (``model(*x)``), a dict the keyword arguments (``model(**x)``), and a list
    one argument (``model([img1, img2])``, as torchvision detection models take); anything else is a
    ``TypeError`` saying what is accepted."""
    if isinstance(example_input, torch.Tensor) or isinstance(example_input, list):
        return model(example_input)
    if isinstance(example_input, tuple):
        return model(*example_input)
    if isinstance(example_input, dict):
        return model(**example_input)
    raise TypeError(
        f"example_input: got {type(example_input).__name__}, expected a tensor (one input batch), a tuple of "
        f"positional arguments, a dict of keyword arguments or a list (one argument, e.g. a detection "
        f"model's list of images)"
    )


def fx_trace(model: nn.Module, leaves: Iterable[nn.Module] = ()) -> torch.fx.Graph:
    """The ``torch.fx`` graph of ``model`` (raises what ``torch.fx`` raises when it cannot trace).

    Tracing (:mod:`regfw.placement.tracing`, the tracer MC dropout shares) runs ``forward`` on proxies without
    calling any hook, so modules that regfw attached earlier are invisible and the graph is that of
    the model as written; ``leaves`` (and torch's own modules) are kept whole.
    """
    with untouched(model):
        return tracing.trace(model, leaves)


def _module_producer(node: torch.fx.Node) -> torch.fx.Node | None:
    """The ``call_module`` node whose output (or output[0]) ``node`` is, if any."""
    if node.op == "call_module":
        return node
    if (node.op == "call_function" and node.target is operator.getitem and len(node.args) == 2
            and node.args[1] == 0 and isinstance(node.args[0], torch.fx.Node)
            and node.args[0].op == "call_module"):
        return node.args[0]
    return None


def _from_fx(graph: torch.fx.Graph, units: dict[str, nn.Module], modules: dict[str, nn.Module]) -> Dataflow:
    flow = Dataflow("fx")
    for node in graph.nodes:
        if node.op != "call_module" or node.target not in units:
            continue
        flow.calls[node.target] = flow.calls.get(node.target, 0) + 1
        if node.target not in flow.order:
            flow.order.append(node.target)
        # The node's value, or output[0] of a tuple, and who uses it.
        outputs = [node] + [u for u in node.users if _module_producer(u) is node and u is not node]
        for out, user in _users_through(outputs, flow, node.target):
            if user.op == "call_module" and user.target in units and user.args and user.args[0] is out:
                flow.link(node.target, user.target)
            elif _module_producer(user) is node or _is_metadata(user):
                continue
            elif user.op == "call_function" and user.target is operator.getitem and out is node:
                continue  # output[k], k != 0, of a tuple: not the value hooks change
            else:
                name = user.target if isinstance(user.target, str) else getattr(user.target, "__name__", "")
                flow.link(node.target, FUNCTION, name)
    flow.gates = gating.fx_gates(graph, units, modules)
    return flow


def _fx_name(node: torch.fx.Node) -> str:
    return node.target if isinstance(node.target, str) else getattr(node.target, "__name__", "")


def _users_through(values: list[torch.fx.Node], flow: Dataflow, unit: str) -> list[tuple[torch.fx.Node, torch.fx.Node]]:
    """``(value, user)`` pairs of the nodes using ``values``, looking through shape functions and
    functional elementwise nonlinearities applied to the value alone and arithmetic with constants (as the
    traced source does: the value they return is still the unit's output; such a function is recorded as a
    user of ``unit``)."""
    pairs: list[tuple[torch.fx.Node, torch.fx.Node]] = []
    stack = list(values)
    while stack:
        value = stack.pop()
        for user in value.users:
            name = _fx_name(user) if user.op in ("call_method", "call_function") else ""
            if name in _SHAPE_OF_SECOND and len(user.args) > 1 and user.args[1] is value and user.args[0] is not value:
                continue  # ``y.reshape_as(value)`` reads the value's shape only
            rest = (*user.args[1 + (name in _SHAPE_OF_SECOND):], *user.kwargs.values())
            alone = bool(user.args) and user.args[0] is value and not any(isinstance(a, torch.fx.Node) for a in rest)
            with_constants = name in SCALAR_ARITHMETIC and [a for a in (*user.args, *user.kwargs.values())
                                                            if isinstance(a, torch.fx.Node)] == [value]
            if (alone and name in SHAPE_OPS | _ELEMENTWISE_NONLINEAR) or with_constants:
                if name not in SHAPE_OPS:
                    flow.function_users.setdefault(unit, set()).add(name)
                stack.append(user)
            else:
                pairs.append((value, user))
    return pairs


def _is_metadata(node: torch.fx.Node) -> bool:
    if node.op == "call_method":
        return node.target in _METADATA
    if node.op == "call_function" and node.target is getattr:
        return len(node.args) > 1 and node.args[1] in _METADATA
    return False


def _from_sequential(model: nn.Module, units: dict[str, nn.Module]) -> Dataflow:
    flow = Dataflow("sequential")
    for path, module in model.named_modules():
        if not isinstance(module, nn.Sequential):
            continue
        prefix = f"{path}." if path else ""
        keys = [prefix + k for k in module._modules]
        for a, b in zip(keys, keys[1:], strict=False):
            if a in units and b in units:
                flow.link(a, b)
    return flow


def build_dataflow(model: nn.Module, units: dict[str, nn.Module],
                   example_input: Any = None) -> tuple[Dataflow, str | None]:
    """The dataflow between ``units`` (path -> module) and, when a weaker source had to be used,
    a message saying why."""
    if example_input is not None:
        return _trace(model, units, example_input), None
    try:
        graph = fx_trace(model, units.values())
    except Exception as exc:  # noqa: BLE001 - any tracing failure means: use the next source
        return _from_sequential(model, units), (
            f"no example input was given and torch.fx cannot trace {type(model).__name__} "
            f"({type(exc).__name__}: {_first_line(exc)}); only nn.Sequential order is known, so a layer "
            f"followed by BatchNorm outside an nn.Sequential may get dropout before the BatchNorm. "
            f"Pass example_input (one input batch) to plan with a traced forward pass"
        )
    return _from_fx(graph, units, dict(model.named_modules())), None


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


# --------------------------------------------------------------------------- residual adds


@dataclass
class ResidualSite:
    """One residual add ``branch + shortcut`` found by ``torch.fx``.

    ``anchor`` is the module producing the branch operand, where DropPath hangs (None when no
    module can carry it; ``problem`` says why). ``block`` is the innermost module whose
    ``forward`` contains the add: adds in the same block share one depth-schedule rate.
    """

    node: str
    block: str
    branch: str
    shortcut: str
    anchor: str | None
    problem: str | None = None
    #: The module producing the shortcut operand (a projection's BatchNorm), if any: the residual
    #: stream itself, which never gets dropout.
    shortcut_module: str | None = None


def _param_modules(nodes: Iterable[torch.fx.Node], modules: dict[str, nn.Module]) -> int:
    count = 0
    for n in nodes:
        if n.op == "call_module":
            m = modules.get(str(n.target))
            if m is not None and any(True for _ in m.parameters()):
                count += 1
    return count


def _is_add(node: torch.fx.Node) -> bool:
    if node.op == "call_function" and node.target in _ADD_FUNCTIONS:
        return len(node.args) >= 2 and all(isinstance(a, torch.fx.Node) for a in node.args[:2])
    if node.op == "call_method" and node.target in _ADD_METHODS:
        return len(node.args) >= 2 and all(isinstance(a, torch.fx.Node) for a in node.args[:2])
    return False


def _block_of(node: torch.fx.Node) -> str:
    """The innermost module whose forward contains ``node``; an add in the model's own forward
    is a block of its own."""
    stack = node.meta.get("nn_module_stack") or {}
    if not stack:
        return f"<{node.name}>"
    return list(stack.values())[-1][0]


def find_residuals(model: nn.Module, leaves: Iterable[nn.Module] = (), example_input: Any = None,
                   captured: list | None = None) -> list[ResidualSite]:
    """Every residual add of ``model``, in forward order; raises when no graph can be captured
    (:func:`regfw.placement.tracing.capture`: ``torch.fx``, else ``torch.export`` of ``example_input``).
    ``captured``, when given, gets the :class:`~regfw.placement.tracing.Capture` used.

    The model is traced in eval mode (flags restored after), as the example-input trace runs, so a
    forward that counts or changes state only while training is not touched by planning."""
    flags = [(m, m.training) for m in model.modules()]
    try:
        model.eval()
        found = tracing.capture(model, leaves, example_input)
    finally:
        for m, flag in flags:
            m.training = flag
    if captured is not None:
        captured.append(found)
    graph = found.graph
    modules = dict(model.named_modules())
    module_calls: dict[str, int] = {}
    for node in graph.nodes:
        if node.op == "call_module":
            module_calls[node.target] = module_calls.get(node.target, 0) + 1
    cache: dict = {}
    sites: list[ResidualSite] = []
    for node in graph.nodes:
        if not _is_add(node):
            continue
        a, b = node.args[0], node.args[1]
        anc_a, anc_b = gating.ancestors(a, cache) | {a}, gating.ancestors(b, cache) | {b}
        common = anc_a & anc_b
        if not common:
            continue  # e.g. x + a learned positional embedding: not a residual connection
        # The modules each operand runs since their last common tensor.
        own_a = _param_modules(anc_a - common, modules)
        own_b = _param_modules(anc_b - common, modules)
        if own_a == own_b:
            continue  # no branch to tell from the shortcut (e.g. two parallel branches)
        branch, shortcut = (a, b) if own_a > own_b else (b, a)
        anchor, problem = _branch_anchor(branch, modules, module_calls)
        short = _module_producer(shortcut)
        sites.append(ResidualSite(node.name, _block_of(node), branch.name, shortcut.name, anchor, problem,
                                  str(short.target) if short is not None else None))
    return sites


def _branch_anchor(branch: torch.fx.Node, modules: dict[str, nn.Module],
                   module_calls: dict[str, int]) -> tuple[str | None, str | None]:
    """The module whose output is the branch operand and may carry a hook, or why none can.

    A module called more than once (a shared activation) would drop at every call; when it is
    positively homogeneous (ReLU), DropPath's non-negative per-sample factor may act on its input
    instead, so the search moves to the module before it.
    """
    node = branch
    while True:
        producer = _module_producer(node)
        if producer is None:
            what = f"{node.op} {getattr(node.target, '__name__', node.target)}"
            return None, (f"the branch ends in {what!r}, not in a module, so no hook can reach it; "
                          f"end the branch with a module (e.g. nn.Identity) to allow DropPath")
        path = str(producer.target)  # a call_module node's target is the module's path
        # The hook changes the module's output (output[0] of a tuple): nothing but the add may see it.
        users_ok = len(node.users) == 1 and (producer is node or all(
            u is node or (u.op == "call_function" and u.target is operator.getitem and u.args[1] != 0)
            for u in producer.users
        ))
        if not users_ok:
            return None, (f"the output of module {path!r} on the branch is also used elsewhere, so DropPath "
                          f"cannot hang on it")
        if module_calls.get(path, 0) == 1:
            return path, None
        before = producer.args[0] if producer.args else None
        if (isinstance(modules.get(path), POSITIVELY_HOMOGENEOUS) and producer is node
                and isinstance(before, torch.fx.Node) and len(before.users) == 1):
            node = before
            continue
        return None, (f"module {path!r} producing the branch is called more than once, so a hook on it would act "
                      f"at every call")


@dataclass
class ResidualAnalysis:
    """Residual adds of a model, or why they could not be found (computed lazily, once)."""

    model: nn.Module
    leaves: tuple = ()
    #: One input batch: where ``torch.fx`` cannot trace the model, ``torch.export`` captures it with this.
    example_input: Any = None
    #: How the graph was captured (``graph: torch.fx`` / ``graph: torch.export (...)``), once computed.
    capture: str | None = None

    @cached_property
    def result(self) -> tuple[list[ResidualSite], str | None]:
        captured: list = []
        try:
            sites = find_residuals(self.model, self.leaves, self.example_input, captured)
            self.capture = captured[0].describe()
            return sites, None
        except Exception as exc:  # noqa: BLE001 - reported to the user as a plan note
            why = str(exc) if isinstance(exc, tracing.CaptureError) else f"{type(exc).__name__}: {_first_line(exc)}"
            parts: list[str] = []
            sites = residuals_by_parts(self.model, self.leaves, parts)
            if sites:
                self.capture = (f"graph: torch.fx of the parts it can trace ({', '.join(parts)}); "
                                f"{type(self.model).__name__} as a whole cannot be captured ({why})")
                return sites, None
            return [], (
                f"torch.fx cannot trace {type(self.model).__name__} ({why}), so its residual adds are unknown and "
                f"DropPath was not inserted. Make forward traceable (no Python control flow on tensor values) or put "
                f"regfw.layers.DropPath on the residual branches by hand"
            )


def residuals_by_parts(model: nn.Module, leaves: Iterable[nn.Module] = (), parts: list[str] | None = None,
                       prefix: str = "") -> list[ResidualSite]:
    """The residual adds of a model that cannot be captured as a whole (a detection model: its forward
    iterates a list of images, and its post-processing branches on data-dependent sizes), found in the largest
    submodules ``torch.fx`` can trace (the backbone): each child is traced on its own, and a child that cannot be
    is searched through its own children. Paths, blocks and node names are the model's (``backbone.body.layer1.0``,
    ``add in backbone.body``). ``parts`` gets the paths of the submodules traced that hold residual adds.

    A submodule's residual adds are those its own forward makes, whoever calls it; a module on a branch that
    the rest of the model also calls is found by the usual rule of :func:`find_residuals` only within the part."""
    keep = tuple(leaves)
    leaf_ids = {id(m) for m in keep}
    sites: list[ResidualSite] = []
    for name, child in model.named_children():
        path = f"{prefix}{name}"
        if name.startswith(INJECTED_PREFIX) or id(child) in leaf_ids or not any(True for _ in child.parameters()):
            continue
        try:
            found = find_residuals(child, keep)
        except Exception:  # noqa: BLE001 - this part cannot be traced: look at its parts
            sites.extend(residuals_by_parts(child, keep, parts, path + "."))
            continue
        if found and parts is not None:
            parts.append(path)
        sites.extend(_within(site, path) for site in found)
    return sites


def _within(site: ResidualSite, path: str) -> ResidualSite:
    """``site``, found in the submodule at ``path``, with the model's paths."""
    def full(p: str | None) -> str | None:
        return f"{path}.{p}" if p else p
    block = path if site.block.startswith("<") else f"{path}.{site.block}"
    return ResidualSite(f"{site.node} in {path}", block, site.branch, site.shortcut, full(site.anchor), site.problem,
                        full(site.shortcut_module))
