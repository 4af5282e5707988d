"""The one ``torch.fx`` tracer of regfw, shared by placement (:mod:`regfw.placement.dataflow`) and the fast
Monte Carlo strategy (:mod:`regfw.uncertainty.fast`).

Both need the graph of a model's ``forward`` with some modules kept whole (leaves) and tensor
constants kept in the graph rather than set as attributes on the user's model (``torch.fx``'s own
tracer adds ``_tensor_constant0`` attributes to the module it traces). They differ in one switch:

* placement traces the model *as written*: hooks are never run (``hooks=None``), so modules regfw
  attached earlier are invisible;
* Monte Carlo sampling traces the model *as it runs*: the hook types listed in ``hooks`` (regfw's
  own ``ApplyAfter`` / ``ApplyBefore``, which only call a child module) are run on proxies around
  the module's forward, so the injected module becomes a node of its own; a module with any other
  hook is a leaf, called whole with all its hooks (:func:`hook_kinds`).

Where ``torch.fx`` cannot trace a model (every Hugging Face model), :func:`capture` takes its graph from
``torch.export`` (Dynamo) of an example input and turns it into the same shape (:func:`module_graph`), for
placement; for Monte Carlo sampling, :func:`export` of :class:`Call` and :func:`executable` give the captured
operators as a graph that runs node by node on the model.

This module imports nothing from regfw, so every other module may import it.
"""
from __future__ import annotations

import contextlib
import io
import operator
import sys
from collections.abc import Callable, Iterable
from typing import Any

import torch.fx as fx
from torch import Tensor, nn

__all__ = ["FORWARD_ONLY", "Call", "Capture", "CaptureError", "Const", "Root", "Tracer", "capture", "executable",
           "export", "hook_kinds", "module_graph", "own_path", "structure", "trace"]

#: Node meta key: the leaf node calls ``module.forward`` only, its (traceable) hooks are in the graph.
FORWARD_ONLY = "regfw_forward_only"


class Const:
    """A tensor constant met while tracing, kept in the graph instead of set on the model."""

    __slots__ = ("value",)

    def __init__(self, value: Tensor) -> None:
        self.value = value

    def __call__(self) -> Tensor:
        return self.value


class Root(nn.Module):
    """Traced in place of a model, so the model's own hooks are seen like any module's.

    ``unpack`` turns the one graph input into the model's ``(args, kwargs)`` (a dict of keyword
    arguments travels as one flat tuple of tensors); without it the input is the one argument."""

    def __init__(self, model: nn.Module, unpack: Callable[[Any], tuple[tuple, dict]] | None = None) -> None:
        super().__init__()
        self.m = model
        self._unpack = unpack

    def forward(self, x: Any) -> Any:
        if self._unpack is None:
            return self.m(x)
        args, kwargs = self._unpack(x)
        return self.m(*args, **kwargs)


def hook_kinds(m: nn.Module, traceable: tuple[type, ...]) -> str:
    """``"none"``, ``"traceable"`` (only hooks of the ``traceable`` types) or ``"foreign"``."""
    pre, post = m._forward_pre_hooks, m._forward_hooks
    if not pre and not post and not m._backward_hooks and not getattr(m, "_backward_pre_hooks", None):
        return "none"
    if m._backward_hooks or getattr(m, "_backward_pre_hooks", None):
        return "foreign"
    if (m._forward_pre_hooks_with_kwargs or m._forward_hooks_with_kwargs
            or getattr(m, "_forward_hooks_always_called", None)):
        return "foreign"
    if traceable and all(isinstance(h, traceable) for h in (*pre.values(), *post.values())):
        return "traceable"
    return "foreign"


def structure(v: Any) -> Any:
    """The tuple / list nesting of a value (``None`` for a leaf), to shape a leaf's proxy like it."""
    if type(v) in (tuple, list):
        return (type(v), tuple(structure(x) for x in v))
    return None


def _structured(proxy: Any, shape: Any) -> Any:
    if shape is None:
        return proxy
    kind, items = shape
    return kind(_structured(proxy[i], s) for i, s in enumerate(items))


class Tracer(fx.Tracer):
    """``torch.fx`` tracer with explicit leaves, optional hook tracing and in-graph constants.

    * modules in ``leaves`` (and torch's own modules, as in ``torch.fx``) are leaves;
    * ``hooks=None``: hooks are ignored (the model as written). ``hooks=(types...)``: a module whose
      only hooks are of those types has them run here, on proxies, around its forward (a leaf node
      that calls ``forward`` only, or traced through); a module with any other hook is a leaf;
    * ``records`` (``id(module) -> [(raw, final), ...]``, one entry per call, from a real pass)
      shapes a leaf's result like the tuple / list the model returned for it, so
      ``out, _ = self.lstm(x)`` and hooks on tuple outputs trace right;
    * tensor constants are kept in the graph (:class:`Const`), never set as attributes on the model.
    """

    def __init__(
        self,
        leaves: Iterable[nn.Module] = (),
        *,
        hooks: tuple[type, ...] | None = None,
        records: dict[int, list] | None = None,
    ) -> None:
        super().__init__(param_shapes_constant=False)
        self._leaves = {id(m) for m in leaves}
        self._hooks = hooks
        self._records = records or {}
        self._calls: dict[int, int] = {}

    def _hook_kind(self, m: nn.Module) -> str:
        return "none" if self._hooks is None else hook_kinds(m, self._hooks)

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        if id(m) in self._leaves or self._hook_kind(m) == "foreign":
            return True
        return super().is_leaf_module(m, module_qualified_name)

    def call_module(self, m: nn.Module, forward: Callable[..., Any], args: tuple, kwargs: dict) -> Any:
        k = self._calls.get(id(m), 0)
        self._calls[id(m)] = k + 1
        recorded = self._records.get(id(m), [])
        raw, final = recorded[k] if k < len(recorded) else (None, None)
        path = self.path_of_module(m)
        if id(m) not in self._leaves and self._hook_kind(m) == "traceable":
            for hook in m._forward_pre_hooks.values():
                result = hook(m, args)
                if result is not None:
                    args = result if isinstance(result, tuple) else (result,)
            if super().is_leaf_module(m, path):
                out = self._leaf(path, args, kwargs, raw, forward_only=True)
            else:
                out = super().call_module(m, lambda *a, **kw: m.forward(*a, **kw), args, kwargs)
            for hook in m._forward_hooks.values():
                result = hook(m, args, out)
                if result is not None:
                    out = result
            return out
        if self.is_leaf_module(m, path):
            return self._leaf(path, args, kwargs, final, forward_only=False)
        return super().call_module(m, forward, args, kwargs)

    def _leaf(self, path: str, args: tuple, kwargs: dict, shape: Any, forward_only: bool) -> Any:
        proxy = self.create_proxy("call_module", path, args, kwargs)
        proxy.node.meta[FORWARD_ONLY] = forward_only
        return _structured(proxy, shape)

    def create_arg(self, a: Any) -> Any:
        if isinstance(a, Tensor) and not isinstance(a, nn.Parameter):
            for name, buf in self.root.named_buffers():
                if a is buf:
                    return self.create_node("get_attr", name, (), {})
            return self.create_node("call_function", Const(a), (), {}, name="regfw_constant")
        return super().create_arg(a)


def trace(
    model: nn.Module,
    leaves: Iterable[nn.Module] = (),
    *,
    hooks: tuple[type, ...] | None = None,
    records: dict[int, list] | None = None,
) -> fx.Graph:
    """The ``torch.fx`` graph of ``model`` with :class:`Tracer` (raises what ``torch.fx`` raises
    when it cannot trace)."""
    return Tracer(leaves, hooks=hooks, records=records).trace(model)


# --------------------------------------------------------------------------- torch.export


class CaptureError(RuntimeError):
    """Neither ``torch.fx`` nor ``torch.export`` gave a graph; the message says why for each."""


class Capture:
    """A module-level graph of a model and how it was captured: ``torch.fx`` symbolic tracing, or
    ``torch.export`` (Dynamo) where ``torch.fx`` cannot trace (``why`` says what stopped it)."""

    __slots__ = ("graph", "how", "why")

    def __init__(self, graph: fx.Graph, how: str, why: str | None = None) -> None:
        self.graph, self.how, self.why = graph, how, why

    def describe(self) -> str:
        """How a plan names the capture, e.g. ``graph: torch.export (torch.fx: TraceError ...)``."""
        return f"graph: {self.how}" + (f" (torch.fx cannot trace it: {self.why})" if self.why else "")


def capture(model: nn.Module, leaves: Iterable[nn.Module] = (), example_input: Any = None) -> Capture:
    """The graph of ``model`` with ``leaves`` (and torch's own modules) as ``call_module`` nodes: from
    ``torch.fx`` when it can trace the model, else from ``torch.export`` of ``example_input`` (a
    tensor, a tuple of positional arguments or a dict of keyword arguments), turned into the same
    shape of graph (:func:`module_graph`). Raises what ``torch.fx`` raised when there is no example
    input, and what ``torch.export`` raises when it fails too. The model is captured in eval mode;
    its flags are restored after."""
    leaves = tuple(leaves)
    try:
        return Capture(trace(model, leaves), "torch.fx")
    except Exception as exc:  # noqa: BLE001 - any failure of torch.fx: try torch.export
        if example_input is None:
            raise
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        why = f"{type(exc).__name__}: {first}"

    args: tuple
    if isinstance(example_input, dict):
        args, kwargs = (), dict(example_input)
    elif isinstance(example_input, tuple):
        args, kwargs = example_input, {}
    else:
        args, kwargs = (example_input,), {}
    flags = [(m, m.training) for m in model.modules()]
    try:
        model.eval()
        program = export(_Tensors(model), args, kwargs)
    except Exception as exc:  # noqa: BLE001 - both captures failed: say why for each
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise CaptureError(f"{why}; torch.export cannot capture it either ({type(exc).__name__}: {first})") from exc
    finally:
        for m, flag in flags:
            m.training = flag
    names = {id(m): p for p, m in model.named_modules()}
    leaf_paths = {names[id(m)] for m in leaves if id(m) in names}
    leaf_paths |= {p for p, m in model.named_modules() if p and _torch_module(m)}
    return Capture(module_graph(program, leaf_paths, prefix="m."), "torch.export", why)


def export(module: nn.Module, args: tuple, kwargs: dict | None = None, dynamic_shapes: Any = None) -> Any:
    """``torch.export`` (non-strict: the Python of the forward runs, as in eager mode) of ``module``
    in the modes its modules are in, without gradients: the one place regfw calls it.

    A failed export prints the graph it had traced so far to stderr before raising (thousands of lines
    for a detector whose proposals have data-dependent shapes); regfw falls back from a failed capture
    and says why in one line, so that graph is left out; anything else written to stderr passes."""
    import torch

    written = io.StringIO()
    try:
        with torch.no_grad(), contextlib.redirect_stderr(written):
            return torch.export.export(module, args, kwargs or {}, dynamic_shapes=dynamic_shapes, strict=False)
    except Exception as exc:
        partial = getattr(exc, "partial_fx_graph", None)
        if partial is not None:
            written = io.StringIO(written.getvalue().replace(f"{partial}\n", ""))
        raise
    finally:
        sys.stderr.write(written.getvalue())


class Call(nn.Module):
    """Exported in place of a model for sampling: the graph input is one flat tuple of tensors
    (``unpack`` gives the model's ``(args, kwargs)``, like :class:`Root`), the output is the one
    tensor ``select`` picks from the model's output. Paths inside it start with ``m.``
    (:func:`own_path`)."""

    def __init__(self, model: nn.Module, unpack: Callable[[Any], tuple[tuple, dict]],
                 select: Callable[[Any], Tensor]) -> None:
        super().__init__()
        self.m = model
        self._unpack, self._select = unpack, select

    def forward(self, *flat: Tensor) -> Tensor:
        args, kwargs = self._unpack(flat)
        return self._select(self.m(*args, **kwargs))


def own_path(path: str) -> str | None:
    """The path in the model of a module path inside :class:`Root` or :class:`Call` (``m.a.b`` ->
    ``a.b``, ``m`` -> ``""``, the model itself), or None for the wrapper."""
    if path == "m":
        return ""
    return path[2:] if path.startswith("m.") else None


def executable(program: Any) -> fx.Graph:
    """An exported program as a graph that runs node by node on the model it was exported from:
    one placeholder (the tuple of the program's inputs, in order), parameters and buffers as
    ``get_attr`` nodes of their path, lifted constants kept in the graph (:class:`Const`), every
    operation as captured, and the one output. Raises ``ValueError`` when the program writes to a
    buffer or an input, or returns anything but one tensor."""
    from torch.export.graph_signature import InputKind, OutputKind

    sig = program.graph_signature
    if any(spec.kind != OutputKind.USER_OUTPUT for spec in sig.output_specs):
        raise ValueError("the captured program writes to a buffer or an input")
    if len(sig.output_specs) != 1:
        raise ValueError(f"the captured program returns {len(sig.output_specs)} values, not one tensor")
    kinds = {spec.arg.name: spec for spec in sig.input_specs}
    user = [spec.arg.name for spec in sig.input_specs if spec.kind == InputKind.USER_INPUT]
    graph = fx.Graph()
    inputs = graph.placeholder("inputs")
    env: dict[fx.Node, Any] = {}
    for n in program.graph.nodes:
        if n.op == "placeholder":
            spec = kinds[n.name]
            if spec.kind == InputKind.USER_INPUT:
                env[n] = graph.call_function(operator.getitem, (inputs, user.index(n.name)))
            elif spec.kind in (InputKind.PARAMETER, InputKind.BUFFER):
                env[n] = graph.get_attr(spec.target)
            else:  # a lifted tensor constant
                env[n] = graph.create_node("call_function", Const(program.constants[spec.target]), (), {},
                                           name="regfw_constant")
            env[n].meta = dict(n.meta)
        elif n.op == "output":
            (out,) = n.args[0]
            graph.output(env[out])
        elif n.op == "get_attr":  # the program's own attribute: a higher-order operator's subgraph
            env[n] = graph.create_node("call_function", Const(getattr(program.graph_module, n.target)), (), {},
                                       name="regfw_constant")
            env[n].meta = dict(n.meta)
        else:
            env[n] = graph.node_copy(n, lambda a: env[a])
    return graph


class _Tensors(nn.Module):
    """Exported in place of a model: its output's tensors only, as a flat tuple (a Hugging Face
    output also holds a key/value cache object, which ``torch.export`` cannot return)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.m = model

    def forward(self, *args: Any, **kwargs: Any) -> tuple:
        return tuple(_flat_tensors(self.m(*args, **kwargs)))


def _flat_tensors(value: Any) -> Iterable[Any]:
    import torch

    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, (tuple, list)):
        for v in value:
            yield from _flat_tensors(v)
    elif isinstance(value, dict):  # a ModelOutput is a dict
        for v in value.values():
            yield from _flat_tensors(v)


def _torch_module(m: nn.Module) -> bool:
    """A module of torch's own (``torch.nn``), a leaf as in ``torch.fx``."""
    return type(m).__module__.startswith("torch.nn") and not isinstance(m, (nn.Sequential, nn.ModuleList,
                                                                            nn.ModuleDict))


def module_graph(program: Any, leaf_paths: set[str], prefix: str = "") -> fx.Graph:
    """The graph of an exported program with every call of a leaf module collapsed into one
    ``call_module`` node (target: its path; arguments: the values its operations read from outside;
    every value it hands out stands for its output), parameters and buffers as ``get_attr`` nodes,
    and every other operation kept: the shape :func:`trace` gives, so one analysis reads both.
    ``prefix``: the path of the model inside the exported module (removed from every path)."""
    def own(path: str) -> str:
        return path[len(prefix):] if prefix and path.startswith(prefix) else ("" if path + "." == prefix else path)

    owners = {spec.arg.name: own(spec.target) for spec in program.graph_signature.input_specs
              if getattr(spec, "target", None) is not None}
    graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    group: dict[str, Any] = {}  # the leaf call being collected: key, path, nodes, stack

    def leaf_of(node: fx.Node) -> tuple[str, str, dict] | None:
        stack = node.meta.get("nn_module_stack") or {}
        outer: dict = {}
        for key, (path, kind) in stack.items():
            path = own(path)
            if path in leaf_paths:
                return key, path, outer
            outer[key] = (path, kind)
        return None

    def close() -> None:
        if not group:
            return
        inside = set(group["nodes"])
        inputs: list[fx.Node] = []
        for n in group["nodes"]:
            for a in n.all_input_nodes:
                if a not in inside and a not in inputs and not (a.op == "get_attr" or a.name in owners):
                    inputs.append(a)
        node = graph.create_node("call_module", group["path"], tuple(env[a] for a in inputs), {})
        node.meta["nn_module_stack"] = group["stack"]
        for n in group["nodes"]:
            env[n] = node
        group.clear()

    for n in program.graph.nodes:
        if n.op == "placeholder":
            if n.name in owners:
                env[n] = graph.get_attr(owners[n.name])
            else:
                env[n] = graph.placeholder(n.name)
            env[n].meta = dict(n.meta)
            continue
        found = leaf_of(n) if n.op == "call_function" else None
        if found is not None:
            key, path, outer = found
            if group.get("key") != key:
                close()
                group.update(key=key, path=path, nodes=[], stack=outer)
            group["nodes"].append(n)
            continue
        close()
        env[n] = graph.node_copy(n, lambda a: env[a])
        stack = n.meta.get("nn_module_stack")
        if stack:
            env[n].meta["nn_module_stack"] = {k: (own(p), kind) for k, (p, kind) in stack.items()}
    close()
    return graph
