"""Fast Monte Carlo dropout: run the deterministic part of the network once, sample only the rest.

MC dropout (Gal & Ghahramani 2016, "Dropout as a Bayesian Approximation") needs T stochastic
passes, and the usual implementations re-run the whole network T times (a loop, or the batch
repeated T times). Everything upstream of the first stochastic layer is identical in every pass.
The ``"auto"`` strategy registered here computes it once:

1. **Trace** the model with :mod:`torch.fx`. regfw inserts dropout as a child ``regfw_<name>`` of
   an anchor module, called from a forward hook (:class:`regfw.surgery.ApplyAfter` /
   :class:`~regfw.surgery.ApplyBefore`); fx would treat the anchor (``nn.Linear``, ``nn.ReLU``...)
   as an opaque leaf and never see the hook, so the tracer here runs those hooks itself and the
   injected module becomes a node of its own. Stochastic modules are leaves.
2. **Split** by dependency: a node is *stochastic* when it is a stochastic module, a random op
   (``torch.rand``, ``F.dropout(training=True)``, ``bernoulli_``...), or has a stochastic input.
   Every other node is computed once on the batch (the *prefix*); the stochastic nodes are
   *replayed* for the T samples. Skip connections and several stochastic layers need nothing
   special: a ResNet with DropPath in its last stage reuses everything before the first DropPath,
   including that block's residual branch. In-place ops that would make the reordering observable
   are moved into the replay (see ``_fix_inplace``).
3. **Replay** over ``T x B`` rows, sample-major like ``batched`` (row ``t * B + b``), in chunks
   sized to ``budget_bytes`` (on CPU also to about 1 MiB of activations, which runs faster). The
   boundary activations are gathered per chunk: a ``[T, B, ...]`` expand must be copied anyway
   to become ``[T * B, ...]`` rows for the next module, so the copy is kept chunk-sized and the
   ``T x B`` rows never exist at once. When one pass of the prefix would exceed the budget, and
   its rows are independent, the prefix runs in row chunks too.

Before a split is used it is checked once on 2 and 3 rows of the real inputs (eval mode, on a
forked random stream, so the masks of the real call are drawn exactly as without the check):

* the traced graph reproduces the model's output, and calls every stochastic module as often as the
  model does, each from a node the split knows to be stochastic (a stochastic module called from an
  opaque place -- a foreign hook, inside a leaf module -- would otherwise be computed once);
* every tensor of the replay keeps one batch dimension and its rows stay independent (no
  ``x.mean(0)`` across rows), and every stochastic node draws its randomness per row (64 copies of
  one row give different outputs). When either fails -- e.g. weight drop, which draws one mask for
  the whole batch -- the replay runs as T passes over B rows (``mode="samples"``): still no prefix
  recomputation, and exactly the semantics of ``loop``.

When the model cannot be traced or a check fails, the strategy falls back to ``batched`` and says
why, once per model, in a :class:`RuntimeWarning`. The split is computed once per model and input
signature and cached in a :class:`weakref.WeakKeyDictionary`; a structural change (modules added,
replaced or removed, hooks added or removed, a rate switched to or from 0) invalidates it. Python
attributes read by a traced ``forward`` (not by a leaf module) are fixed at trace time, as with
:func:`torch.fx.symbolic_trace`; call :func:`invalidate` after changing one.
"""
from __future__ import annotations

import math
import operator
import warnings
import weakref
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import Tensor, nn

from regfw.surgery import ApplyAfter, ApplyBefore
from regfw.tensors import iter_tensors
from regfw.uncertainty import sampling as _sampling
from regfw.uncertainty.sampling import (
    DEFAULT_BUDGET_BYTES,
    batched_strategy,
    eval_mode,
    is_stochastic,
    isolated_rng,
    mc_mode,
    stochastic_types,
)

__all__ = [
    "TRACEABLE_HOOKS",
    "Split",
    "RunStats",
    "fast_strategy",
    "split_model",
    "invalidate",
]

#: Hook types the tracer runs itself (pure: they only call a child module). A module with any
#: other hook is an opaque leaf, called as a whole with all its hooks.
TRACEABLE_HOOKS: tuple[type, ...] = (ApplyAfter, ApplyBefore)

_PROBE_ROWS = (2, 3)  # the two probe batch sizes (not 1: squeeze() would hide the batch dim)
_INDEPENDENCE_COPIES = 64  # copies of one row for the per-row randomness check
_INDEPENDENCE_TRIALS = 3
_INDEPENDENCE_BYTES = 16 * 2**20  # fewer copies (at least 8, more trials) for rows larger than this / 64
_MAX_SIGNATURES = 8  # cached splits per model (input shapes / dtypes / devices)
#: On CPU the replay runs in chunks of about this many activation bytes (fewer if the budget
#: says so): measured 20-35% faster than one big chunk (cache reuse, no fresh pages per tensor).
_CPU_CHUNK_BYTES = 1 * 2**20
_CPU_MIN_ROWS = 64  # ... but at least this many rows, so the per-chunk Python cost stays small
_FORWARD_ONLY = "regfw_forward_only"  # node meta: call module.forward, its hooks are in the graph


# --------------------------------------------------------------------------- public results


@dataclass
class RunStats:
    """How the last call of a split was executed (for benchmarks and tests)."""

    samples: int = 0
    batch: int = 0
    prefix_chunks: int = 0  #: passes of the deterministic prefix (1 unless over budget)
    chunks: int = 0  #: passes of the replay
    chunk_rows: int = 0  #: largest replay chunk, in rows
    kept_bytes: int = 0  #: boundary activations held for the whole replay
    planned_peak_bytes: int = 0  #: estimated activation peak: kept + largest chunk (or prefix chunk)
    budget_bytes: int | None = None


@dataclass(eq=False)
class Split:
    """The deterministic / stochastic split of one model for one input signature.

    ``fallback`` is the reason the split cannot be used (then ``batched`` runs); otherwise
    ``mode`` is ``"rows"`` (one replay over ``T x B`` rows, chunked) or ``"samples"`` (T replays
    over ``B`` rows, see ``mode_reason``).
    """

    fallback: str | None = None
    mode: str = "fallback"
    mode_reason: str | None = None
    nodes: list = field(default_factory=list, repr=False)
    replay: list = field(default_factory=list, repr=False)  #: replayed nodes, in graph order
    sources: list = field(default_factory=list, repr=False)  #: stochastic source nodes
    boundary: dict = field(default_factory=dict, repr=False)  #: node -> layout, prefix values the replay reads
    mutated: set = field(default_factory=set, repr=False)  #: boundary nodes the replay changes in place
    output: Any = field(default=None, repr=False)
    prefix_chunkable: bool = False
    prefix_cost: tuple = (0, 0)  #: (constant, per-row) bytes of the prefix at its peak
    replay_cost: tuple = (0, 0)  #: (constant, per-row) bytes of one replay chunk at its peak
    boundary_cost: tuple = (0, 0)  #: (constant, per-row) bytes of the kept boundary values
    last_run: RunStats = field(default_factory=RunStats)
    _prefix: list = field(default_factory=list, repr=False)
    _prefix_free: dict = field(default_factory=dict, repr=False)
    _replay_free: dict = field(default_factory=dict, repr=False)
    _targets: tuple = field(default=(), repr=False)
    _placeholder: Any = field(default=None, repr=False)
    _verified: bool = field(default=False, repr=False)  #: ran once without error
    _warned: bool = field(default=False, repr=False)  #: the fallback warning was given

    @property
    def ok(self) -> bool:
        """True when the split is used (no fallback)."""
        return self.fallback is None

    @property
    def deterministic_names(self) -> list[str]:
        """Names of the nodes computed once (graph order)."""
        replay = set(self.replay)
        return [n.name for n in self.nodes if n not in replay and n.op not in ("placeholder", "output")]

    @property
    def replay_names(self) -> list[str]:
        """Names of the nodes computed for every sample (graph order)."""
        return [n.name for n in self.replay]

    @property
    def source_targets(self) -> list[str]:
        """The stochastic sources: module paths (``m.`` is the model) or op names."""
        return [_describe_target(n) for n in self.sources]

    def node_targets(self) -> list[str]:
        """Every node's target (module path, function or method name), graph order."""
        return [_describe_target(n) for n in self.nodes]

    def describe(self) -> str:
        """A few lines: what is computed once, what is replayed, and how."""
        if not self.ok:
            return f"fallback to 'batched': {self.fallback}"
        work = [n for n in self.nodes if n.op in ("call_module", "call_function", "call_method")]
        replay = set(self.replay)
        once = sum(1 for n in work if n not in replay)
        lines = [
            f"mode {self.mode}" + (f" ({self.mode_reason})" if self.mode_reason else ""),
            f"{once} of {len(work)} ops computed once; {len(work) - once} replayed per sample",
            "stochastic sources: " + ", ".join(self.source_targets),
            "boundary: " + ", ".join(n.name for n in self.boundary),
        ]
        return "\n".join(lines)

    def graph_forward(self, model: nn.Module, inputs: Tensor) -> Any:
        """Run the whole traced graph on ``inputs`` (in the model's current modes)."""
        mods = {t: _resolve(model, t) for t in self._targets}
        env: dict = {self._placeholder: inputs}
        for node in self.nodes:
            if node.op == "placeholder":
                continue
            if node.op == "output":
                return fx.node.map_arg(node.args[0], env.__getitem__)
            env[node] = _eval(node, env, mods, model)
        raise RuntimeError("graph without output")  # pragma: no cover


# --------------------------------------------------------------------------- layouts of values


@dataclass(frozen=True)
class _Batch:
    """A tensor whose dimension ``d`` holds ``k`` entries per batch row, batch outermost."""

    d: int
    k: int


@dataclass(frozen=True)
class _Seq:
    type: type
    items: tuple


_UNCLEAN = "unclean"  # a tensor whose batch rows cannot be told apart or are mixed




def _has_tensor(v: Any) -> bool:
    return next(iter_tensors(v), None) is not None


def _nbytes(v: Any) -> int:
    return sum(t.numel() * t.element_size() for t in iter_tensors(v))


def _same(a: Tensor, b: Tensor) -> bool:
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    if not a.is_floating_point() and not a.is_complex():
        return bool(torch.equal(a, b))
    tol = 1e-4 if a.dtype in (torch.float32, torch.float64, torch.complex64, torch.complex128) else 1e-2
    scale = float(b.abs().max()) if b.numel() else 0.0
    return bool(torch.allclose(a, b, rtol=tol, atol=tol * max(1.0, scale) * 0.1, equal_nan=True))


def _layout(v1: Any, v2: Any, n1: int, n2: int) -> Any:
    """Where the batch is in a value, from the same value at ``n1`` and ``n2`` (> n1) rows.

    ``_Batch(d, k)``: dimension ``d`` has ``k * rows`` entries and its first ``k * n1`` entries at
    ``n2`` rows equal the value at ``n1`` rows (the batch is outermost in that dimension and rows
    do not mix); ``None``: a value of fixed shape; ``_UNCLEAN``: anything else.
    """
    if isinstance(v1, Tensor) or isinstance(v2, Tensor):
        if not (isinstance(v1, Tensor) and isinstance(v2, Tensor)) or v1.dim() != v2.dim():
            return _UNCLEAN
        diff = [i for i, (a, b) in enumerate(zip(v1.shape, v2.shape)) if a != b]
        if not diff:
            return None
        if len(diff) != 1:
            return _UNCLEAN
        d = diff[0]
        a, b = v1.shape[d], v2.shape[d]
        if a % n1 or b % n2 or a // n1 != b // n2:
            return _UNCLEAN
        if not _same(v1, v2.narrow(d, 0, a)):
            return _UNCLEAN
        return _Batch(d, a // n1)
    if type(v1) in (tuple, list) and type(v2) is type(v1) and len(v1) == len(v2):
        return _Seq(type(v1), tuple(_layout(a, b, n1, n2) for a, b in zip(v1, v2)))
    if _has_tensor(v1) or _has_tensor(v2):
        return _UNCLEAN
    return None


def _layout_leaves(layout: Any) -> Iterator[Any]:
    if isinstance(layout, _Seq):
        for item in layout.items:
            yield from _layout_leaves(item)
    else:
        yield layout


def _clean(layout: Any) -> bool:
    return all(x is not _UNCLEAN for x in _layout_leaves(layout))


def _batched(layout: Any) -> bool:
    """Every tensor in the value carries the batch (clean, no fixed-shape tensor)."""
    return all(isinstance(x, _Batch) for x in _layout_leaves(layout))


def _gather(v: Any, layout: Any, rows: Tensor | None, clone: bool) -> Any:
    """The chunk's rows of a boundary value (``rows``: batch index of each chunk row)."""
    if isinstance(layout, _Batch) and rows is not None:
        idx = rows if layout.k == 1 else (rows[:, None] * layout.k + torch.arange(layout.k, device=rows.device)).reshape(-1)
        return v.index_select(layout.d, idx.to(v.device))
    if isinstance(layout, _Seq):
        return layout.type(_gather(x, item, rows, clone) for x, item in zip(v, layout.items))
    if clone:
        return _clone(v)
    return v


def _clone(v: Any) -> Any:
    if isinstance(v, Tensor):
        return v.clone()
    if type(v) in (tuple, list):
        return type(v)(_clone(x) for x in v)
    return v


def _alloc(v: Any, layout: Any, rows: int, total: int) -> Any:
    """A buffer for the whole batch (``total`` rows) shaped like chunk value ``v`` of ``rows`` rows."""
    if isinstance(layout, _Batch):
        shape = list(v.shape)
        shape[layout.d] = layout.k * total
        return v.new_empty(shape)
    if isinstance(layout, _Seq):
        return layout.type(_alloc(x, item, rows, total) for x, item in zip(v, layout.items))
    return v


def _write(buf: Any, v: Any, layout: Any, start: int) -> None:
    if isinstance(layout, _Batch):
        n = v.shape[layout.d]
        buf.narrow(layout.d, start * layout.k, n).copy_(v)
    elif isinstance(layout, _Seq):
        for b, x, item in zip(buf, v, layout.items):
            _write(b, x, item, start)


def _repeat_row(v: Any, layout: Any, row: int, copies: int) -> Any:
    """``copies`` identical rows: row ``row`` of ``v`` repeated along its batch dimension."""
    if isinstance(layout, _Batch):
        piece = v.narrow(layout.d, row * layout.k, layout.k)
        reps = [1] * v.dim()
        reps[layout.d] = copies
        return piece.repeat(*reps)
    if isinstance(layout, _Seq):
        return layout.type(_repeat_row(x, item, row, copies) for x, item in zip(v, layout.items))
    return v


def _rows_differ(v: Any, layout: Any, copies: int) -> bool:
    for t, item in zip(iter_tensors(v), _layout_leaves(layout)):
        if not isinstance(item, _Batch):
            continue
        pieces = t.reshape(*t.shape[: item.d], copies, item.k, *t.shape[item.d + 1:])
        first = pieces.narrow(item.d, 0, 1)
        if not bool((pieces == first).all()):
            return True
    return False


# --------------------------------------------------------------------------- node helpers


class _Const:
    """A tensor constant met while tracing, kept in the graph instead of set on the model."""

    __slots__ = ("value",)

    def __init__(self, value: Tensor) -> None:
        self.value = value

    def __call__(self) -> Tensor:
        return self.value


def _resolve(model: nn.Module, target: str) -> Any:
    """``m.a.b`` (a path under the tracing wrapper) to the object in ``model``."""
    obj: Any = model
    for part in target.split(".")[1:]:
        obj = getattr(obj, part)
    return obj


def _eval(node: fx.Node, env: dict, mods: dict, model: nn.Module) -> Any:
    args = fx.node.map_arg(node.args, env.__getitem__)
    kwargs = fx.node.map_arg(node.kwargs, env.__getitem__)
    op = node.op
    if op == "call_module":
        mod = mods[node.target]
        if node.meta.get(_FORWARD_ONLY):
            return mod.forward(*args, **kwargs)
        return mod(*args, **kwargs)
    if op == "call_function":
        return node.target(*args, **kwargs)
    if op == "call_method":
        return getattr(args[0], node.target)(*args[1:], **kwargs)
    if op == "get_attr":
        return _resolve(model, node.target)
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


def _random_op(node: fx.Node) -> bool:
    """True for a call of a random function or method (a stochastic source outside modules)."""
    if node.op == "call_method":
        return node.target in _RANDOM_METHODS
    if node.op != "call_function":
        return False
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
    if node.op == "call_function":
        if node.target in _INPLACE_FUNCTIONS or node.kwargs.get("inplace") is True:
            return True
        name = getattr(node.target, "__name__", "")
        return name.endswith("_") and not name.startswith("__")
    if node.op == "call_module":
        return getattr(mods[node.target], "inplace", False) is True
    return False


# --------------------------------------------------------------------------- tracing


class _Root(nn.Module):
    """Traced in place of the model, so the model's own hooks are seen like any module's."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.m = model

    def forward(self, x: Any) -> Any:
        return self.m(x)


def _hook_kinds(m: nn.Module) -> str:
    """``"none"``, ``"traceable"`` (only :data:`TRACEABLE_HOOKS`) or ``"foreign"``."""
    pre, post = m._forward_pre_hooks, m._forward_hooks
    if not pre and not post and not m._backward_hooks and not getattr(m, "_backward_pre_hooks", None):
        return "none"
    if m._backward_hooks or getattr(m, "_backward_pre_hooks", None):
        return "foreign"
    if m._forward_pre_hooks_with_kwargs or m._forward_hooks_with_kwargs or getattr(m, "_forward_hooks_always_called", None):
        return "foreign"
    if all(isinstance(h, TRACEABLE_HOOKS) for h in (*pre.values(), *post.values())):
        return "traceable"
    return "foreign"


def _structure(v: Any) -> Any:
    if type(v) in (tuple, list):
        return (type(v), tuple(_structure(x) for x in v))
    return None


def _structured(proxy: Any, structure: Any) -> Any:
    if structure is None:
        return proxy
    kind, items = structure
    return kind(_structured(proxy[i], s) for i, s in enumerate(items))


class _Tracer(fx.Tracer):
    """fx tracer that sees regfw's injected modules and keeps stochastic modules whole.

    * stochastic modules and modules with foreign hooks are leaves (called whole, hooks included);
    * a module whose only hooks are :data:`TRACEABLE_HOOKS` has them run here, on proxies, around
      its forward (a leaf node that calls ``forward`` only, or traced through), so a module the
      hook calls becomes a node of its own;
    * a leaf's result is shaped like the tuple / list the model returned for it (recorded on a real
      pass), so ``out, _ = self.lstm(x)`` and ``ApplyAfter`` on tuple outputs trace right;
    * tensor constants are kept in the graph, never set as attributes on the model.
    """

    def __init__(self, stochastic: set[int], records: dict[int, list]) -> None:
        super().__init__(param_shapes_constant=False)
        self._stochastic = stochastic
        self._records = records
        self._calls: dict[int, int] = {}

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        if id(m) in self._stochastic or _hook_kinds(m) == "foreign":
            return True
        return super().is_leaf_module(m, module_qualified_name)

    def call_module(self, m: nn.Module, forward: Callable[..., Any], args: tuple, kwargs: dict) -> Any:
        k = self._calls.get(id(m), 0)
        self._calls[id(m)] = k + 1
        recorded = self._records.get(id(m), [])
        raw, final = recorded[k] if k < len(recorded) else (None, None)
        path = self.path_of_module(m)
        if id(m) not in self._stochastic and _hook_kinds(m) == "traceable":
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

    def _leaf(self, path: str, args: tuple, kwargs: dict, structure: Any, forward_only: bool) -> Any:
        proxy = self.create_proxy("call_module", path, args, kwargs)
        proxy.node.meta[_FORWARD_ONLY] = forward_only
        return _structured(proxy, structure)

    def create_arg(self, a: Any) -> Any:
        if isinstance(a, Tensor) and not isinstance(a, nn.Parameter):
            for name, buf in self.root.named_buffers():
                if a is buf:
                    return self.create_node("get_attr", name, (), {})
            return self.create_node("call_function", _Const(a), (), {}, name="regfw_constant")
        return super().create_arg(a)


# --------------------------------------------------------------------------- analysis


class _Fallback(Exception):
    """The split cannot be used; the message is the reason."""


def _probe_inputs(inputs: Tensor) -> tuple[Tensor, Tensor, bool]:
    """``(x1, x2, distinct)``: 2 and 3 rows of ``inputs``, x2 extending x1.

    Distinct rows are chosen when the batch has them (rows that mix would go unnoticed on
    identical rows); a floating-point batch with fewer distinct rows gets slightly shifted copies.
    """
    n1, n2 = _PROBE_ROWS
    b = inputs.shape[0]
    chosen = [0]
    for i in range(1, min(b, 64)):
        if all(not torch.equal(inputs[i], inputs[j]) for j in chosen):
            chosen.append(i)
            if len(chosen) == n2:
                break
    distinct = len(chosen) == n2
    if distinct:
        x2 = inputs.index_select(0, torch.tensor(chosen, device=inputs.device))
    else:
        idx = torch.tensor([chosen[i % len(chosen)] for i in range(n2)], device=inputs.device)
        x2 = inputs.index_select(0, idx)
        if inputs.is_floating_point():
            step = torch.arange(n2, device=inputs.device, dtype=inputs.dtype).view(-1, *([1] * (inputs.dim() - 1)))
            x2 = x2 * (1.0 + 0.05 * step) + 0.01 * step  # distinct even for rows of zeros
            distinct = True
    return x2[:n1], x2, distinct


def _record_real(model: nn.Module, x: Tensor, stochastic: dict[int, str]) -> tuple[dict, dict, Any]:
    """One real eval pass: output structure of every module call, stochastic call counts, output."""
    records: dict[int, list] = {}
    raws: dict[int, list] = {}
    counts = {path: 0 for path in stochastic.values()}
    handles = []

    def raw_hook(m: nn.Module, args: Any, out: Any) -> None:
        raws.setdefault(id(m), []).append(_structure(out))

    def final_hook(m: nn.Module, args: Any, out: Any) -> None:
        raw = raws.get(id(m), [None]).pop(0) if raws.get(id(m)) else None
        records.setdefault(id(m), []).append((raw, _structure(out)))

    def count_hook(m: nn.Module, args: Any) -> None:
        counts[stochastic[id(m)]] += 1

    try:
        for m in model.modules():
            handles.append(m.register_forward_hook(raw_hook, prepend=True))
            handles.append(m.register_forward_hook(final_hook))
            if id(m) in stochastic:
                handles.append(m.register_forward_pre_hook(count_hook))
        out = model(x)
    finally:
        for h in handles:
            h.remove()
    return records, counts, out


def _run_probe(split: Split, model: nn.Module, x: Tensor, stochastic: dict[int, str], mods: dict) -> tuple[dict, dict]:
    """Run the whole graph on ``x`` keeping every value; also which node called which stochastic module."""
    current: list = [None]
    calls: dict[str, list] = {path: [] for path in stochastic.values()}
    handles = []

    def count_hook(m: nn.Module, args: Any) -> None:
        calls[stochastic[id(m)]].append(current[0])

    try:
        for m in model.modules():
            if id(m) in stochastic:
                handles.append(m.register_forward_pre_hook(count_hook))
        env: dict = {split._placeholder: x}
        for node in split.nodes:
            if node.op in ("placeholder", "output"):
                continue
            current[0] = node
            env[node] = _eval(node, env, mods, model)
    finally:
        for h in handles:
            h.remove()
    return env, calls


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


def _analyse(model: nn.Module, inputs: Any, types: tuple) -> Split:
    """Trace, probe and split ``model`` for inputs like ``inputs``; raises :class:`_Fallback`."""
    if not isinstance(inputs, Tensor) or inputs.dim() == 0 or inputs.shape[0] == 0:
        raise _Fallback("the inputs are not a batch tensor")
    from torch.nn.modules import module as module_globals

    if module_globals._global_forward_hooks or module_globals._global_forward_pre_hooks:
        raise _Fallback("global module hooks are registered (torch.nn.modules.module.register_module_forward_hook)")
    stochastic = {id(m): (path or "<model>") for path, m in model.named_modules() if is_stochastic(m, types)}
    x1, x2, distinct = _probe_inputs(inputs)
    devices = _sampling._devices(model, inputs)

    with isolated_rng(0, devices), eval_mode(model):
        records, real_counts, ref = _record_real(model, x2, stochastic)
    if not isinstance(ref, Tensor):
        raise _Fallback(f"the model returns {type(ref).__name__}, not one tensor")
    split, mods = _trace(model, stochastic, records)
    sources = _sources(split, mods, stochastic)

    with eval_mode(model):  # each run on the stream of the real run (random ops in eval agree)
        with isolated_rng(0, devices):
            env1, _ = _run_probe(split, model, x1, stochastic, mods)
        with isolated_rng(0, devices):
            env2, calls = _run_probe(split, model, x2, stochastic, mods)
    _check_probe(split, env2[split.output], ref, calls, real_counts, set(sources))

    _partition(split, sources, env2, mods, types)
    n1, n2 = _PROBE_ROWS
    layouts = {n: _layout(env1[n], env2[n], n1, n2) for n in split.nodes if n in env1 and n in env2}
    layouts[split._placeholder] = _Batch(0, 1)
    split.boundary = {n: layouts.get(n) for n in split.boundary}
    reason = _rows_mode_obstacle(split, env2, layouts, distinct)
    if reason is None:
        with isolated_rng(1, devices):
            shared = next((n for n in sources if not _independent_rows(n, env2, layouts, mods, model)), None)
        if shared is not None:
            reason = (f"{_describe_target(shared)!r} gives identical rows for identical inputs (one random "
                      "mask for the whole batch, or no randomness at all in MC mode)")
    split.mode, split.mode_reason = ("rows", None) if reason is None else ("samples", reason)
    _plan_memory(split, env1, env2, layouts, distinct)
    return split


def _trace(model: nn.Module, stochastic: dict[int, str], records: dict) -> tuple[Split, dict]:
    """The traced graph as a fresh :class:`Split`, and the modules its nodes call, by target."""
    tracer = _Tracer(set(stochastic), records)
    try:
        graph = tracer.trace(_Root(model))
    except Exception as exc:  # noqa: BLE001 - any tracing failure means: use batched
        raise _Fallback(f"the model could not be traced with torch.fx ({type(exc).__name__}: {exc})") from None
    split = Split(mode="rows")
    split.nodes = list(graph.nodes)
    split._placeholder = next(n for n in split.nodes if n.op == "placeholder")
    out = next(n for n in split.nodes if n.op == "output").args[0]
    if not isinstance(out, fx.Node):
        raise _Fallback("the traced graph does not return one tensor")
    split.output = out
    split._targets = tuple(sorted({n.target for n in split.nodes if n.op == "call_module"}))
    try:
        mods = {t: _resolve(model, t) for t in split._targets}
    except AttributeError as exc:
        raise _Fallback(f"a traced module could not be found again ({exc})") from None
    return split, mods


def _work(split: Split) -> list:
    return [n for n in split.nodes if n.op not in ("placeholder", "output")]


def _sources(split: Split, mods: dict, stochastic: dict[int, str]) -> list:
    """Stochastic modules, opaque modules that contain one, and random ops."""
    sources = []
    for node in _work(split):
        if node.op == "call_module":
            mod = mods[node.target]
            if id(mod) in stochastic:
                sources.append(node)
                continue
            hooked = set()  # children the traced hooks call are nodes of their own
            if node.meta.get(_FORWARD_ONLY):
                hooked = {h.name for h in (*mod._forward_pre_hooks.values(), *mod._forward_hooks.values())}
            inner = [c for name, c in mod.named_children() if name not in hooked]
            if any(id(d) in stochastic for c in inner for d in c.modules()):
                sources.append(node)
        elif _random_op(node):
            sources.append(node)
    return sources


def _check_probe(split: Split, got: Any, ref: Tensor, calls: dict, real_counts: dict, sources: set) -> None:
    """The graph gives the model's output and calls every stochastic module where the split sees it."""
    if not isinstance(got, Tensor) or not _same(got, ref):
        diff = (got.float() - ref.float()).abs().max().item() if isinstance(got, Tensor) and got.shape == ref.shape else "shape"
        raise _Fallback(f"the traced graph does not reproduce the model's output (difference: {diff})")
    for path, seen in calls.items():
        if len(seen) != real_counts.get(path, 0):
            raise _Fallback(
                f"stochastic module {path!r} is called {real_counts.get(path, 0)} time(s) by the model "
                f"but {len(seen)} time(s) by the traced graph"
            )
        hidden = [n for n in seen if n not in sources]
        if hidden:
            raise _Fallback(
                f"stochastic module {path!r} is called inside {_describe_target(hidden[0])!r}, where the "
                "split cannot see it (from a hook that is not regfw's, or from a leaf module's forward)"
            )


def _partition(split: Split, sources: list, env: dict, mods: dict, types: tuple) -> None:
    """Fill ``replay``, the prefix, ``boundary`` (keys) and ``mutated``.

    Stochastic: the sources and everything downstream (grown by :func:`_fix_inplace`). The
    replay also recomputes the non-tensor values it reads (``x.shape[0]`` gives the chunk's rows,
    not ``B``); those stay in the prefix as well when the prefix reads them.
    """
    work = _work(split)
    stoch = _closure(set(sources), work)
    stoch = _fix_inplace([split._placeholder, *work], stoch, mods, types)
    replay = set(stoch)
    todo = list(replay)
    while todo:
        node = todo.pop()
        for inp in _inputs(node):
            if inp not in replay and inp.op in ("call_function", "call_method") and not _has_tensor(env.get(inp)):
                replay.add(inp)
                todo.append(inp)
    split.sources = sources
    split.replay = [n for n in work if n in replay]
    split._prefix = [n for n in work if n not in stoch]
    boundary = [n for n in [split._placeholder, *split._prefix]
                if n not in replay and any(u in replay for u in n.users)]
    if split.output not in replay and split.output not in boundary:
        boundary.append(split.output)
    split.boundary = dict.fromkeys(boundary)
    for node in split.replay:  # boundary values the replay writes to in place are copied per chunk
        if _mutates_input(node, mods):
            base = _first_node(node)
            while base is not None and base in replay and _aliases_input(base, mods, types):
                base = _first_node(base)
            if base is not None and base in split.boundary:
                split.mutated.add(base)


def _rows_mode_obstacle(split: Split, env: dict, layouts: dict, distinct: bool) -> str | None:
    """Why the replay cannot run as one pass over ``T x B`` independent rows (None: it can)."""
    if not distinct:
        return "the batch has fewer than 3 distinct rows, so mixing of rows cannot be ruled out"
    for node in split.replay:
        if _has_tensor(env[node]) and not _batched(layouts[node]):
            return f"{_describe_target(node)!r} ({node.name}) mixes batch rows or has no batch dimension"
    for node, layout in split.boundary.items():
        if _has_tensor(env.get(node)) and not _clean(layout):
            return f"the replay reads {node.name}, whose batch rows cannot be separated"
    if layouts.get(split.output) != _Batch(0, 1):
        return "the output's first dimension is not the batch"
    return None


def _plan_memory(split: Split, env1: dict, env2: dict, layouts: dict, distinct: bool) -> None:
    """(constant, per-row) bytes of every value from the two probes, and the peaks they add up to."""
    n1, n2 = _PROBE_ROWS
    per_node = {}
    for node in split.nodes:
        if node in env1 and node in env2:
            b1, b2 = _nbytes(env1[node]), _nbytes(env2[node])
            r = max(0, (b2 - b1) // (n2 - n1))
            per_node[node] = (max(0, b1 - n1 * r), r)
    keep = set(split.boundary)
    split._prefix_free = _last_uses(split._prefix, {split._placeholder, *split._prefix})
    split._replay_free = _last_uses(split.replay, set(split.replay) | keep)
    shifted = {i + 1: dead for i, dead in split._prefix_free.items()}
    split.prefix_cost = _cost([split._placeholder, *split._prefix], shifted, keep, per_node)
    b_c = sum(per_node.get(n, (0, 0))[0] for n in keep)
    b_r = sum(per_node.get(n, (0, 0))[1] for n in keep)
    split.boundary_cost = (b_c, b_r)
    r_c, r_r = _cost(split.replay, split._replay_free, set(), per_node)
    split.replay_cost = (r_c + b_c, r_r + b_r)  # boundary values enter each chunk as gathered copies
    depends = _closure({split._placeholder}, _work(split))
    split.prefix_chunkable = distinct and all(
        _batched(layouts.get(n)) for n in split._prefix if n in depends and _has_tensor(env2.get(n))
    )


def _independent_rows(node: fx.Node, env: dict, layouts: dict, mods: dict, model: nn.Module) -> bool:
    """Whether a stochastic node draws its randomness per row: identical rows in, different rows out.

    Runs the node on 64 copies of one probe row (fewer for large rows, with more trials), up to 3
    times. A module that draws one mask for the whole batch (weight drop) gives identical rows
    every time. A per-row module gives identical rows with a probability like ``(1 - p) ** 63``
    per trial (DropPath, one draw per row); then the samples mode, slower but exact, is chosen.
    """
    if node.op != "call_module":
        return True  # random functions and methods draw per element
    out_layout = layouts.get(node)
    if not isinstance(out_layout, _Batch) and not (isinstance(out_layout, _Seq) and any(isinstance(x, _Batch) for x in _layout_leaves(out_layout))):
        return False
    arg_nodes = _inputs(node)
    if not any(isinstance(layouts.get(a), (_Batch, _Seq)) for a in arg_nodes):
        return False
    first = next((a for a in arg_nodes if isinstance(layouts.get(a), _Batch)), None)
    row = 0
    if first is not None:
        lay, val = layouts[first], env[first]
        norms = [float(val.narrow(lay.d, r * lay.k, lay.k).abs().sum()) for r in range(val.shape[lay.d] // lay.k)]
        row = max(range(len(norms)), key=norms.__getitem__) if norms else 0
    row_bytes = sum(_nbytes(_repeat_row(env[a], layouts.get(a), row, 1)) for a in arg_nodes
                    if isinstance(layouts.get(a), (_Batch, _Seq)))
    copies = max(8, min(_INDEPENDENCE_COPIES, _INDEPENDENCE_BYTES // max(1, row_bytes)))
    trials = max(_INDEPENDENCE_TRIALS, math.ceil(_INDEPENDENCE_COPIES * _INDEPENDENCE_TRIALS / copies))
    try:
        local = {a: _repeat_row(env[a], layouts.get(a), row, copies) for a in arg_nodes}
        for _ in range(trials):
            out = _eval(node, local, mods, model)
            if _rows_differ(out, out_layout, copies):
                return True
    except Exception:  # noqa: BLE001 - cannot tell: assume shared, the samples mode is exact
        return False
    return False


# --------------------------------------------------------------------------- execution


def _even_chunks(total: int, rows: int) -> list[tuple[int, int]]:
    """``[start, stop)`` chunks of at most about ``rows`` rows, near-equal, at least 2 rows each."""
    rows = max(1, min(rows, total))
    n = math.ceil(total / rows)
    if total >= 2:
        n = max(1, min(n, total // 2))
    base, extra = divmod(total, n)
    out, start = [], 0
    for i in range(n):
        stop = start + base + (1 if i < extra else 0)
        out.append((start, stop))
        start = stop
    return out


def _run_prefix(split: Split, model: nn.Module, mods: dict, rows: Tensor) -> dict:
    env: dict = {split._placeholder: rows}
    keep = split.boundary
    free = split._prefix_free
    for i, node in enumerate(split._prefix):
        env[node] = _eval(node, env, mods, model)
        for dead in free.get(i, ()):
            if dead not in keep:
                env.pop(dead, None)
    return {n: env[n] for n in keep}


def _execute(split: Split, model: nn.Module, inputs: Tensor, samples: int, budget: int | None, chunk_rows: int | None) -> Tensor:
    mods = {t: _resolve(model, t) for t in split._targets}
    b = inputs.shape[0]
    stats = RunStats(samples=samples, batch=b, budget_bytes=budget)
    c_p, r_p = split.prefix_cost
    c_b, r_b = split.boundary_cost
    kept_est = c_b + r_b * b
    prefix_rows = b
    if budget is not None and split.prefix_chunkable and c_p + r_p * b > budget and r_p > 0:
        prefix_rows = max(2, (budget - kept_est - c_p) // r_p)
    if prefix_rows >= b:
        values = _run_prefix(split, model, mods, inputs)
        stats.prefix_chunks = 1
        prefix_peak = c_p + r_p * b
    else:
        values = {}
        chunks = _even_chunks(b, prefix_rows)
        for start, stop in chunks:
            part = _run_prefix(split, model, mods, inputs[start:stop])
            for node, v in part.items():
                layout = split.boundary[node]
                if node not in values:
                    values[node] = _alloc(v, layout, stop - start, b)
                _write(values[node], v, layout, start)
        stats.prefix_chunks = len(chunks)
        prefix_peak = kept_est + c_p + r_p * max(stop - start for start, stop in chunks)
    kept = sum(_nbytes(v) for v in values.values())
    stats.kept_bytes = kept

    out_node = split.output
    if out_node not in set(split.replay):  # the output does not depend on any stochastic node
        det = values[out_node]
        stats.planned_peak_bytes = prefix_peak
        split.last_run = stats
        return det.unsqueeze(0).expand(samples, *det.shape).clone()

    c_r, r_r = split.replay_cost
    total = samples * b
    if split.mode == "samples":
        chunks = [(t * b, (t + 1) * b) for t in range(samples)]
    else:
        if chunk_rows is None:
            chunk_rows = total if budget is None or r_r == 0 else max(2, (budget - kept - c_r) // r_r)
            if inputs.device.type == "cpu" and r_r > 0:  # cache-sized chunks run faster on CPU
                chunk_rows = min(chunk_rows, max(_CPU_MIN_ROWS, _CPU_CHUNK_BYTES // r_r))
        elif chunk_rows < 1:
            raise ValueError(f"chunk_rows must be >= 1, got {chunk_rows!r}")
        chunks = _even_chunks(total, int(chunk_rows))
    largest = max(stop - start for start, stop in chunks)
    stats.chunks, stats.chunk_rows = len(chunks), largest
    stats.planned_peak_bytes = max(prefix_peak, kept + c_r + r_r * largest)

    result: Tensor | None = None
    free = split._replay_free
    mutated = split.mutated
    for start, stop in chunks:
        rows = None if split.mode == "samples" else torch.arange(start, stop, device=inputs.device) % b
        env = {n: _gather(v, split.boundary[n], rows, n in mutated) for n, v in values.items()}
        for i, node in enumerate(split.replay):
            env[node] = _eval(node, env, mods, model)
            for dead in free.get(i, ()):
                if dead is not out_node:
                    env.pop(dead, None)
        y = env[out_node]
        if result is None:
            result = y.new_empty((total, *y.shape[1:]))
        result[start:stop] = y
    split.last_run = stats
    assert result is not None
    return result.view(samples, b, *result.shape[1:])


# --------------------------------------------------------------------------- cache and strategy


@dataclass
class _Entry:
    fingerprint: tuple
    splits: dict = field(default_factory=dict)


_CACHE: weakref.WeakKeyDictionary[nn.Module, _Entry] = weakref.WeakKeyDictionary()


def _fingerprint(model: nn.Module, types: tuple) -> tuple:
    """What a split depends on: every module's identity, type, stochasticity and hooks.

    (Not the ``training`` flags: the split is always traced and run in ``mc_mode``.)
    """
    return tuple(
        (
            name,
            id(m),
            type(m),
            is_stochastic(m, types),
            tuple(m._forward_pre_hooks),
            tuple(m._forward_hooks),
            tuple(m._backward_hooks),
        )
        for name, m in model.named_modules()
    )


def _signature(inputs: Any) -> tuple:
    if isinstance(inputs, Tensor):
        return (tuple(inputs.shape[1:]), inputs.dtype, inputs.device, inputs.shape[0] >= 3)
    return (type(inputs),)


def invalidate(model: nn.Module) -> None:
    """Forget the cached split of ``model`` (needed only after changing a plain Python attribute
    that a traced ``forward`` reads; structural changes are detected)."""
    _CACHE.pop(model, None)


def split_model(model: nn.Module, inputs: Tensor, types: tuple | None = None) -> Split:
    """The (cached) split of ``model`` for inputs like ``inputs``; computes it on first use.

    The analysis runs in :func:`~regfw.uncertainty.mc_mode` (the modes sampling runs in; the
    trace follows the ``training`` flags of traced-through modules) and restores every flag.
    A split that cannot be used has ``fallback`` set to the reason.
    """
    types = stochastic_types() if types is None else types
    fp = _fingerprint(model, types)
    entry = _CACHE.get(model)
    if entry is None or entry.fingerprint != fp:
        entry = _Entry(fp)
        _CACHE[model] = entry
    sig = _signature(inputs)
    split = entry.splits.get(sig)
    if split is None:
        on = [m for m in model.modules() if is_stochastic(m, types)]
        try:
            with torch.no_grad(), mc_mode(model, on):
                split = _analyse(model, inputs, types)
        except _Fallback as exc:
            split = Split(fallback=str(exc))
        except Exception as exc:  # noqa: BLE001 - e.g. the model fails on the probe rows
            split = Split(fallback=f"the analysis of the model failed ({type(exc).__name__}: {exc})")
        if len(entry.splits) >= _MAX_SIGNATURES:
            entry.splits.pop(next(iter(entry.splits)))
        entry.splits[sig] = split
    return split


def _fall_back(model: nn.Module, split: Split, inputs: Tensor, samples: int, budget_bytes: int | None, kw: dict) -> Tensor:
    if not split._warned:
        split._warned = True
        warnings.warn(
            f"Monte Carlo strategy 'auto' uses 'batched' for this {type(model).__name__}: {split.fallback}. "
            "Every sample then runs the whole network; pass strategy='batched' to silence this warning.",
            RuntimeWarning,
            stacklevel=4,
        )
    return batched_strategy(model, inputs, samples, budget_bytes=budget_bytes, **kw)


def fast_strategy(
    model: nn.Module,
    inputs: Tensor,
    samples: int,
    *,
    budget_bytes: int | None = DEFAULT_BUDGET_BYTES,
    chunk_rows: int | None = None,
    **kw: Any,
) -> Tensor:
    """The ``auto`` strategy: deterministic prefix once, stochastic part over ``T x B`` rows.

    Same contract as the other strategies (called inside ``mc_mode`` and the forked random
    stream, returns ``[T, B, ...]``). ``budget_bytes`` bounds the activations held at once: the
    boundary values kept for the replay plus one chunk (the prefix itself is run in row chunks
    when one pass over the batch would exceed it and its rows are independent). ``chunk_rows``
    fixes the replay chunk size instead. Falls back to ``batched`` (one warning per model,
    naming the reason) when the model cannot be split.
    """
    if budget_bytes is not None and budget_bytes <= 0:
        raise ValueError(f"budget_bytes must be > 0 or None, got {budget_bytes!r}")
    split = split_model(model, inputs)
    if not split.ok:
        return _fall_back(model, split, inputs, samples, budget_bytes, {"chunk_rows": chunk_rows, **kw})
    with torch.no_grad():
        if split._verified:
            return _execute(split, model, inputs, samples, budget_bytes, chunk_rows)
        state = torch.random.get_rng_state()
        try:
            out = _execute(split, model, inputs, samples, budget_bytes, chunk_rows)
        except Exception as exc:  # noqa: BLE001 - a first run that breaks means the split is wrong
            torch.random.set_rng_state(state)
            split.fallback = f"the split failed on its first run ({type(exc).__name__}: {exc})"
            return _fall_back(model, split, inputs, samples, budget_bytes, {"chunk_rows": chunk_rows, **kw})
        split._verified = True
        return out


_sampling.register_strategy("auto", fast_strategy)
