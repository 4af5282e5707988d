"""Attention blocks found by what they compute, whatever their classes and names: the one attention
detector of regfw.

An attention block is where a forward computes ``softmax(q kᵀ) v`` (Vaswani et al. 2017): a
softmax-normalised weighting whose weights come from computed operands multiplied together, either as
one call (``F.scaled_dot_product_attention``, torch's ``multi_head_attention_forward``) or spelled out
(``torch.matmul(q, k.transpose(-1, -2))``, scaling, a mask, ``softmax``, maybe a dropout, then a
product with ``v``, as Hugging Face's eager attention and timm's ``Attention`` do). The detector
follows every tensor of one forward pass back to the *weight layers* it comes from (a module with a
parameter of two or more dimensions: ``nn.Linear``, GPT-2's ``Conv1D``, a fused ``qkv``, a projection
wrapped in another module), through reshapes, transposes, splits, rotary embeddings and masks, and
reports for each attention computation

* its *host*: the innermost module whose own ``forward`` computes it (BERT's ``BertSelfAttention``,
  timm's ``Attention``, ``nn.MultiheadAttention``);
* *q/k/v*: the weight layers whose outputs become the query, the key and the value (DistilBERT's
  ``q_lin``, GPT-2's fused ``c_attn``, ``nn.MultiheadAttention`` itself);
* the dropout module applied to the attention probabilities, when one is (timm's ``attn_drop``);
* *feeders*: every module whose output reaches the query, key, value, scores or probabilities with
  no weight layer between (a projection's ``BatchNorm`` wrapper, a talking-heads layer, the residual
  stream a projection-free query is read from): none of them gets hidden dropout.

The attention spelled out may also be factorised, ``q (softmax(k)ᵀ v)`` (CoaT, efficient attention):
a softmax of one computed operand whose product with a value then meets a query. A softmax over one
weight layer's output that weights a value and goes on into a weight layer (a global-context block's
attention pooling) is not attention: its weights come from one operand (docs/placement.md).

Every regularizer asks this module (through :func:`regfw.placement.surgery.analyse`): a model with an
attention site is Transformer-family for every regularizer (every rate 0-0.1), and ``attention_dropout``
sets the rate of each site.

Two sources give the same events: one eval-mode pass of an example input (:func:`detect`, every
model), or a ``torch.fx`` graph (:func:`detect_fx`, models fx can trace, without an example input).
"""
from __future__ import annotations

import operator
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from regfw.layers.base import StochasticModule
from regfw.placement import foreign, tracing
from regfw.placement.dataflow import call_with_example

__all__ = ["AttentionSite", "RateSlot", "detect", "detect_fx", "find", "hosts", "rate_slot", "unrecognised_attention",
           "weight_layer"]

#: One call computes the whole attention (query, key, value are its first three tensor arguments).
FUSED_ATTENTION = frozenset({"scaled_dot_product_attention", "multi_head_attention_forward",
                             "_native_multi_head_attention"})
_MATMUL = frozenset({"matmul", "bmm", "__matmul__", "__rmatmul__", "einsum", "baddbmm"})
_SOFTMAX = frozenset({"softmax", "_softmax", "softmax_"})
#: Fused attention calls that take their projection weights as arguments: q/k/v are inside the call.
_INNER_PROJECTIONS = FUSED_ATTENTION - {"scaled_dot_product_attention"}
#: How a factorised site is named: the softmax of the keys weights the values first, the query reads the result.
FACTORISED = "q·(softmax(k)ᵀ·v)"


@dataclass
class AttentionSite:
    """One attention computation of a model (see the module docstring)."""

    host: str
    #: ``scaled_dot_product_attention``, ``multi_head_attention_forward``, ``softmax(q·kᵀ)`` or :data:`FACTORISED`
    how: str
    query: frozenset[str] = frozenset()
    key: frozenset[str] = frozenset()
    value: frozenset[str] = frozenset()
    #: The dropout module applied to the attention probabilities, when one is.
    dropout: str | None = None
    #: Every module whose output reaches the query, key, value, scores or probabilities with no weight
    #: layer between (the projections, a norm or pool after them, a talking-heads layer on the scores,
    #: the residual stream a projection-free query is read from): none of them gets hidden dropout.
    feeders: frozenset[str] = frozenset()

    @property
    def projections(self) -> frozenset[str]:
        """The weight layers that feed the query, key and value."""
        return self.query | self.key | self.value


def _is_dropout(module: nn.Module) -> bool:
    """A dropout-family module (torch's, regfw's, torchvision's or timm's)."""
    return (isinstance(module, (nn.modules.dropout._DropoutNd, StochasticModule))
            or foreign.foreign_layer(module) is not None)


def weight_layer(module: nn.Module) -> bool:
    """A module with a parameter of its own of two or more dimensions (a weight matrix or kernel):
    where the detector's trail of a tensor starts."""
    return any(p.dim() >= 2 for p in module.parameters(recurse=False))


@dataclass
class _Mark:
    """What one value is: the weight layers it comes from, the modules it passed since (``feeders``),
    and whether it is attention scores (a product of two computed operands, ``q kᵀ``, with the marks
    of q and k), probabilities (their softmax, or the softmax of one computed operand waiting for a
    value, with the site) or a factorised context (``softmax(k)ᵀ v``, waiting for its query)."""

    layers: frozenset[str] = frozenset()
    feeders: frozenset[str] = frozenset()
    scores: tuple[_Mark, _Mark, str] | None = None
    probs: AttentionSite | None = None
    context: AttentionSite | None = None


def _distinct(values: Iterable[Any]) -> list[Any]:
    """The values that are not None, each object once (``attn / attn.sum(-1)`` carries one site twice)."""
    out: list[Any] = []
    for v in values:
        if v is not None and not any(v is o for o in out):
            out.append(v)
    return out


def _merged(sites: list[AttentionSite], weighted: bool = False) -> AttentionSite | None:
    """One weighting made of several (ConViT's gated sum of ``softmax(q kᵀ)`` and a positional softmax):
    the first with a query and key takes the others' query, key and feeders. A weighting still waiting
    for its value and query (:data:`FACTORISED`) does not pass a weight layer (``weighted``)."""
    if weighted:
        sites = [s for s in sites if s.how != FACTORISED]
    if not sites:
        return None
    first = next((s for s in sites if s.how != FACTORISED), sites[0])
    for other in sites:
        if other is not first:
            first.query, first.key = first.query | other.query, first.key | other.key
            first.feeders = first.feeders | other.feeders
    return first


def _product_operands(name: str, marks: list[_Mark]) -> tuple[_Mark, _Mark]:
    return (marks[-2], marks[-1]) if name == "baddbmm" else (marks[0], marks[1])


@dataclass
class _Propagator:
    """The shared core: fed events (a module's output, a function call) keyed by value identity.

    The rules, each a property of the computation (docs/placement.md, "attention"):

    * a product of two computed operands (neither a weight, neither probabilities) is **scores**;
      scores stay scores through every op but a product: reshapes, scaling, masks, added position
      biases, and a weight layer mixing them (talking heads, Shazeer et al. 2020);
    * the softmax of scores is **probabilities**; probabilities times a computed operand (on either
      side) completes a site: ``softmax(q kᵀ) v``;
    * the softmax of a computed operand that is not scores (``softmax(k)``) waits for a value: its
      product with one is a **context** ``softmax(k)ᵀ v``, and the product of that context with a
      third computed operand (the query) completes a factorised site (CoaT, efficient attention,
      Shen et al. 2021). A context that reaches a weight layer first was a pooling (a global-context
      block's ``softmax(conv(x))`` weighting ``x``): a weighting by one operand, not attention;
    * ``feeders`` run back from a value to the weight layers it comes from (those included) through
      every other module and function, stopping at products and softmaxes.
    """

    #: value key of a weight (a parameter of two or more dimensions) -> the module owning it: a function
    #: computing with it (``F.linear(x, self.qkv.weight)``) is that module's weight layer at work.
    weights: dict[Any, str] = field(default_factory=dict)
    marks: dict[Any, _Mark] = field(default_factory=dict)
    sites: list[AttentionSite] = field(default_factory=list)

    def mark(self, key: Any) -> _Mark:
        return self.marks.get(key) or _Mark()

    def module_input(self, path: str, module: nn.Module, keys: list[Any]) -> None:
        """A module is called on ``keys``: a dropout module on attention probabilities is their dropout."""
        if keys and _is_dropout(module):
            site = self.mark(keys[0]).probs
            if site is not None and site.dropout is None:
                site.dropout = path

    def module_output(self, path: str, module: nn.Module, keys: list[Any]) -> None:
        """A weight layer starts a new trail (scores and probabilities it mixes stay what they are:
        talking heads); any other module joins the feeders of its output."""
        for k in keys:
            old = self.mark(k)
            if weight_layer(module):
                self.marks[k] = _Mark(frozenset({path}), frozenset({path}), old.scores,
                                      _merged([old.probs] if old.probs else [], weighted=True))
            elif path:
                self.marks[k] = _Mark(old.layers, old.feeders | {path}, old.scores, old.probs, old.context)

    def _complete(self, site: AttentionSite, *operands: _Mark) -> None:
        site.feeders = site.feeders.union(*(m.feeders for m in operands))

    def function(self, name: str, host: str, inputs: list[Any], outputs: list[Any]) -> None:
        if not outputs:
            return  # metadata (sizes, dtypes): no feature comes out
        owners = frozenset(self.weights[k] for k in inputs if k in self.weights)
        inputs = [k for k in inputs if k not in self.weights]
        marks = [self.mark(k) for k in inputs]
        layers = owners or frozenset().union(*(m.layers for m in marks))
        feeders = owners or frozenset().union(*(m.feeders for m in marks))
        if name in FUSED_ATTENTION and len(inputs) >= 3:
            q, k, v = (_Mark(), _Mark(), _Mark()) if name in _INNER_PROJECTIONS or owners else marks[:3]
            site = AttentionSite(host, name, q.layers, k.layers, v.layers)
            self._complete(site, q, k, v)
            self.sites.append(site)
            result = _Mark(layers)
        elif name in _MATMUL and len(marks) >= 2:
            result = self._product(host, layers, *_product_operands(name, marks))
        elif name in _SOFTMAX and marks and marks[0].scores is not None:
            query, key, where = marks[0].scores
            site = AttentionSite(where, "softmax(q·kᵀ)", query.layers, key.layers)
            self._complete(site, query, key, marks[0])
            self.sites.append(site)
            result = _Mark(layers, probs=site)
        elif name in _SOFTMAX and marks and marks[0].probs is None and marks[0].context is None:
            site = AttentionSite(host, FACTORISED, key=marks[0].layers, feeders=marks[0].feeders)
            result = _Mark(layers, probs=site)  # waits for a value, then a query
        else:  # reshapes, scaling, masks, dtype casts, dropout: scores and probabilities stay what they are
            scores = _distinct(m.scores for m in marks)
            probs = _merged(_distinct(m.probs for m in marks), weighted=bool(owners))
            contexts = _distinct(m.context for m in marks)
            result = _Mark(layers, feeders, scores=scores[0] if len(scores) == 1 and not probs else None,
                           probs=probs if not scores else None,
                           context=contexts[0] if len(contexts) == 1 and not owners else None)
        for k in outputs:
            self.marks[k] = result

    def _product(self, host: str, layers: frozenset[str], a: _Mark, b: _Mark) -> _Mark:
        """A product of two computed values (see the class docstring)."""
        weighting, other = (a, b) if a.probs is not None else (b, a)
        site = weighting.probs
        if site is not None and other.probs is None:
            site.value = other.layers
            self._complete(site, weighting, other)
            if site.how != FACTORISED:
                return _Mark(layers)  # probabilities times values: the site is complete
            return _Mark(layers, context=site)
        pending, query = (a, b) if a.context is not None else (b, a)
        site = pending.context
        if site is not None and query.context is None:
            site.query = query.layers
            self._complete(site, query)
            site.host = host
            self.sites.append(site)
            return _Mark(layers)
        return _Mark(layers, scores=(a, b, host))

    def result(self) -> list[AttentionSite]:
        """The sites whose probabilities met their values (a softmax of scores that never multiplies a
        value is not attention), and every fused call."""
        return [s for s in self.sites if s.how in FUSED_ATTENTION or s.value]


# --------------------------------------------------------------------------- one pass of an example input


def _tensors(value: Any) -> Iterator[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, (list, tuple)):
        for v in value:
            yield from _tensors(v)
    elif isinstance(value, dict):
        for v in value.values():
            yield from _tensors(v)
    elif hasattr(value, "to_tuple") and callable(value.to_tuple):  # a ModelOutput
        yield from _tensors(value.to_tuple())


class _Watch(torch.overrides.TorchFunctionMode):
    def __init__(self, core: _Propagator, stack: list[str], keep: list) -> None:
        super().__init__()
        self.core, self.stack, self.keep = core, stack, keep

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        name = getattr(func, "__name__", "")
        inputs = [*_tensors(args), *_tensors(kwargs)]
        outputs = list(_tensors(out))
        self.keep.extend(inputs + outputs)  # ids stay unique while the pass runs
        self.core.function(name, self.stack[-1] if self.stack else "", [id(t) for t in inputs],
                           [id(t) for t in outputs])
        return out


def detect(model: nn.Module, example_input: Any) -> list[AttentionSite]:
    """The attention sites of ``model`` seen in one eval-mode, no-grad pass of ``example_input``
    (a tensor, a tuple of positional arguments, a dict of keyword arguments or a list, as
    :func:`regfw.placement.dataflow.call_with_example` takes). Every flag and hook is as before afterwards."""
    core = _Propagator(weights=_weights(model, id))
    stack: list[str] = []
    keep: list = []
    handles = []

    def pre(path: str, module: nn.Module):
        def hook(_m, args, kwargs):
            stack.append(path)
            core.module_input(path, module, [id(t) for t in (*_tensors(args), *_tensors(kwargs))])
        return hook

    def post(path: str, module: nn.Module):
        def hook(_m, _args, _kwargs, output):
            if stack:
                stack.pop()
            outs = list(_tensors(output))
            keep.extend(outs)
            core.module_output(path, module, [id(t) for t in outs])
        return hook

    for path, module in model.named_modules():
        handles.append(module.register_forward_pre_hook(pre(path, module), with_kwargs=True, prepend=True))
        handles.append(module.register_forward_hook(post(path, module), with_kwargs=True, always_call=True))
    flags = [(m, m.training) for m in model.modules()]
    try:
        model.eval()
        with torch.no_grad(), _Watch(core, stack, keep):
            call_with_example(model, example_input)
    finally:
        for h in handles:
            h.remove()
        for m, flag in flags:
            m.training = flag
    return core.result()


# --------------------------------------------------------------------------- a torch.fx graph


def _weights(model: nn.Module, key: Any) -> dict[Any, str]:
    """``key(parameter) -> owner path`` for every parameter of two or more dimensions of ``model``."""
    return {key(p) if key is id else key(f"{path}.{n}" if path else n): path
            for path, m in model.named_modules() for n, p in m.named_parameters(recurse=False) if p.dim() >= 2}


def detect_fx(graph: torch.fx.Graph, model: nn.Module) -> list[AttentionSite]:
    """The attention sites of a ``torch.fx`` graph of ``model`` (the same rules as :func:`detect`;
    torch's own modules are leaves there, so ``nn.MultiheadAttention`` counts by its call)."""
    owners = _weights(model, str)
    core = _Propagator(weights={n: owners[str(n.target)] for n in graph.nodes
                                if n.op == "get_attr" and str(n.target) in owners})
    modules = dict(model.named_modules())
    for node in graph.nodes:
        inputs = [a for a in node.all_input_nodes]
        if node.op == "call_module":
            module = modules.get(str(node.target))
            if module is None:
                continue
            core.module_input(str(node.target), module, inputs[:1])
            if isinstance(module, nn.MultiheadAttention):
                core.sites.append(AttentionSite(str(node.target), "multi_head_attention_forward"))
            core.function("", _host(node), inputs, [node])
            core.module_output(str(node.target), module, [node])
        elif node.op in ("call_function", "call_method"):
            name = node.target if isinstance(node.target, str) else getattr(node.target, "__name__", "")
            if node.target is operator.getitem:
                name = "__getitem__"
            core.function(name, _host(node), inputs, [] if _metadata(node, name) else [node])
    return core.result()


#: Calls whose result describes a tensor (its sizes) rather than carrying its values.
_METADATA_CALLS = frozenset({"size", "dim", "numel", "len"})
_METADATA_ATTRS = frozenset({"shape", "ndim", "dtype", "device"})


def _metadata(node: torch.fx.Node, name: str) -> bool:
    """A graph node that reads a tensor's sizes (``x.shape``, ``x.size(1)``): in an eager pass these are
    plain numbers, so no feature flows through them (a reshape to ``(b, heads, c // heads, n)`` does not
    make the query depend on what ``b`` was read from)."""
    return name in _METADATA_CALLS or (name == "getattr" and len(node.args) > 1 and node.args[1] in _METADATA_ATTRS)


def _host(node: torch.fx.Node) -> str:
    stack = node.meta.get("nn_module_stack") or {}
    return list(stack.values())[-1][0] if stack else ""


def find(model: nn.Module, example_input: Any = None) -> tuple[list[AttentionSite], str | None]:
    """The attention sites of ``model``: from one pass of ``example_input`` when given, else from its
    ``torch.fx`` graph; with neither, none and a note saying why (torch's own attention layers are
    still known by their type, :mod:`regfw.placement.kinds`)."""
    if example_input is not None:
        return detect(model, example_input), None

    flags = [(m, m.training) for m in model.modules()]
    try:
        model.eval()
        graph = tracing.trace(model)
    except Exception as exc:  # noqa: BLE001 - any tracing failure: no graph to read
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        return [], (f"no example input was given and torch.fx cannot trace {type(model).__name__} "
                    f"({type(exc).__name__}: {first}); attention blocks other than torch's own are unknown. "
                    f"Pass example_input (one input batch) to find them")
    finally:
        for m, flag in flags:
            m.training = flag
    return detect_fx(graph, model), None


def hosts(sites: Iterable[AttentionSite], typed: Iterable[str] = ()) -> list[str]:
    """The attention blocks: the modules of kind ``attention`` by type (``typed``) and the host of
    every site, each once, in order."""
    return list(dict.fromkeys([*typed, *(s.host for s in sites)]))


@dataclass(frozen=True)
class RateSlot:
    """Where an attention site's probability dropout rate is set."""

    anchor: str  #: the module to pass to :func:`regfw.placement.api.set_rate`
    rate: float  #: its rate now
    where: str  #: how a plan names it: ``attn_drop``, ``dropout.p``, ``config.attention_dropout``


def rate_slot(model: nn.Module, site: AttentionSite) -> RateSlot | None:
    """The probability dropout of ``site``: the dropout module applied to the probabilities (timm's
    ``attn_drop``), or the attributes the host reads its rate from when it chooses its dropout by its
    training flag (Hugging Face attention, :func:`regfw.placement.foreign.rate_sources`); None when its
    rate cannot be set (no dropout there, or a rate fixed in its forward)."""
    host = model.get_submodule(site.host) if site.host else model
    if site.dropout is not None:
        return RateSlot(site.dropout, foreign.get_rate(model.get_submodule(site.dropout)) or 0.0,
                        site.dropout.rsplit(".", 1)[-1])
    sources = foreign.rate_sources(host)
    if sources:
        return RateSlot(site.host, foreign.get_rate(host) or 0.0, ", ".join(sources))
    return None


def unrecognised_attention(model: nn.Module, sites: Iterable[AttentionSite]) -> list[str]:
    """Class names of modules called attention that compute no attention site, for a message saying
    what was seen."""
    found = {s.host for s in sites}
    return sorted({type(m).__name__ for p, m in model.named_modules()
                   if ("attention" in type(m).__name__.lower() or "attn" in type(m).__name__.lower())
                   and p not in found})
