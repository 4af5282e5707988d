"""Model surgery: classify a model's layers into kinds, plan insertions, and apply them.

Inserted modules hang on an *anchor* module as a child named ``regfw_<name>`` and run from a
forward hook (``after``: on the anchor's output) or forward pre-hook (``before``: on its input).
This keeps every existing parameter name, so a state dict of the plain model still loads, and
works for any ``forward`` however it is written. The hooks are small picklable objects that
look the child up by name, so ``copy.deepcopy`` and pickling keep working.

Placement rules (:func:`after_anchor`, :func:`plan_insertions`), read from the model's dataflow
(:mod:`regfw.placement.dataflow`); docs/placement.md states each with the graph pattern it matches:

* a module "after" a hidden, conv or recurrent layer goes after the norm and activation layers
  that directly follow it (through reshapes and placeholders), so it never sits between a layer
  and the norm that normalises it, and comes after the nonlinearity as in Srivastava et al. 2014;
* a module called more than once per forward pass (a shared ``nn.ReLU``) never carries one:
  the walk stops before it (for a non-negative mask, ``relu(m * x) = m * relu(x)``), unless each of
  its calls pairs with one call of the layer (a head applied once per feature level);
* a place whose output also reaches a normalisation through shape ops (the next block's pre-norm
  beside its residual add) gets none (:func:`feeds_norm`);
* where the model already has a dropout module at that place (even one called at several
  places), its rate is set (``existing: override``) or left alone (``existing: keep``), and
  nothing is inserted;
* nothing goes inside a gate, after an output, or on a module the forward never calls;
* a module regfw inserted earlier is updated, never inserted a second time.
"""
from __future__ import annotations

import inspect
import warnings
from dataclasses import dataclass, field
from typing import Any, cast

from torch import nn

import regfw.placement.attention as attention_graph
from regfw.layers.base import StochasticModule, attach_child
from regfw.layers.drop_path import DropPath
from regfw.placement import foreign, structure
from regfw.placement import kinds as K
from regfw.placement.attention import AttentionSite
from regfw.placement.dataflow import FUNCTION, INJECTED_PREFIX, Dataflow, ResidualAnalysis, build_dataflow
from regfw.placement.plan_items import PlanContext, PlanItem, Planner
from regfw.placement.untouched import untouched
from regfw.registry.discovery import get_plugin_manager

_LAYER_KINDS = {K.HIDDEN, K.CONV, K.RECURRENT, K.ATTENTION}


@dataclass
class LayerInfo:
    """One classified module of a model."""

    path: str
    module: nn.Module
    kind: str | None
    order: int
    is_input: bool = False
    is_output: bool = False
    #: The forward never calls it (its weights are used functionally, or it is unreachable): a hook on
    #: it would never fire, so nothing is placed there.
    dead: bool = False


@dataclass
class ModelMap:
    """A model analysed once for planning: its classified modules, dataflow and residual adds."""

    model: nn.Module
    layers: list[LayerInfo]
    flow: Dataflow
    residuals: ResidualAnalysis
    #: Things the user should know about the analysis itself (e.g. a weaker dataflow source).
    notes: list[str] = field(default_factory=list)
    #: Units on a gating path (squeeze-excitation, gated linear units): nothing goes after them.
    gates: set[str] = field(default_factory=set)
    #: What feeds attention's query, key, value, scores and probabilities with no weight layer between (the
    #: projections, norms and wrappers after them: :attr:`regfw.placement.attention.AttentionSite.feeders`): no
    #: hidden-layer dropout after them.
    qkv: set[str] = field(default_factory=set)
    #: Paths of the attention blocks; a model with any is Transformer-family (:mod:`regfw.placement.structure`).
    attention: list[str] = field(default_factory=list)
    #: A Transformer's token dropout (timm's ``pos_drop``): its input dropout slot
    #: (:func:`regfw.placement.structure.token_dropout_slot`).
    token_drop: str | None = None
    #: The layers that make the tokens, called after any earlier dropout and before ``token_drop`` (a
    #: ViT's patch embedding): they get no dropout of their own.
    stem: set[str] = field(default_factory=set)
    #: What each attention block computes (:mod:`regfw.placement.attention`): host, q/k/v, probability dropout.
    attention_sites: list[AttentionSite] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.by_path = {i.path: i for i in self.layers}

    def attention_summary(self) -> str:
        """The attention blocks in a few words, for plan reasons."""
        if not self.attention:
            return "none"
        outer = [p for p in self.attention if not any(p.startswith(a + ".") for a in self.attention if a)]
        kinds = sorted({type(self.module(p)).__name__ for p in outer})
        return f"{len(outer)} x {'/'.join(kinds)}"

    def reaches_output(self, path: str) -> bool:
        """Whether the unit's output reaches a model output with no weight layer between (an *output*:
        nothing goes after it). Read from the traced outputs' sources (training-only outputs included); without
        them (no example input), the layer :func:`analyse` marked as the output layer."""
        info = self.by_path.get(path)
        return path in self.flow.output_sources or (info is not None and info.is_output)

    def kind(self, path: str) -> str | None:
        info = self.by_path.get(path)
        return info.kind if info is not None else None

    def module(self, path: str) -> nn.Module:
        return self.model.get_submodule(path) if path else self.model


class ApplyAfter:
    """Forward hook: pass the host's output through its child ``name``.

    For tuple outputs (``nn.LSTM`` returns ``(output, state)``) only the first element is
    changed.
    """

    def __init__(self, name: str) -> None:
        self.name = name

    def __call__(self, module: nn.Module, args: Any, output: Any) -> Any:
        child = cast(nn.Module, module._modules[self.name])  # attached by attach(), never None
        if isinstance(output, tuple):
            return (child(output[0]), *output[1:])
        return child(output)


class ApplyBefore:
    """Forward pre-hook: pass the host's first positional input through its child ``name``."""

    def __init__(self, name: str) -> None:
        self.name = name

    def __call__(self, module: nn.Module, args: tuple) -> tuple:
        child = cast(nn.Module, module._modules[self.name])  # attached by attach(), never None
        return (child(args[0]), *args[1:])


def is_injected(path: str) -> bool:
    """True for a module that regfw inserted (its own name starts with ``regfw_``)."""
    return any(part.startswith(INJECTED_PREFIX) for part in path.split("."))


def is_dropout(module: nn.Module) -> bool:
    """A dropout-family module: torch's dropout layers, every regfw stochastic layer and the
    stochastic layers of torchvision and timm (:mod:`regfw.placement.foreign`)."""
    return (isinstance(module, (nn.modules.dropout._DropoutNd, StochasticModule))
            or foreign.foreign_layer(module) is not None)


def is_path_drop(module: nn.Module) -> bool:
    """Stochastic depth (regfw's ``DropPath``, torchvision's ``StochasticDepth``, timm's ``DropPath``):
    it drops a residual branch for whole samples, a place of its own, not an activation dropout slot."""
    entry = foreign.foreign_layer(module)
    return isinstance(module, DropPath) or (entry is not None and entry.what == "path")


def is_batchnorm(module: nn.Module) -> bool:
    return isinstance(module, nn.modules.batchnorm._BatchNorm)


def classify(module: nn.Module, path: str) -> str | None:
    """The kind of one module: a plugin's answer first, then the built-in type table."""
    answer = get_plugin_manager().hook.regfw_classify_module(module=module, path=path)
    if answer is not None:
        if answer not in K.KINDS:
            raise ValueError(
                f"a plugin classified module {path!r} ({type(module).__name__}) as {answer!r}; "
                f"expected one of {', '.join(K.KINDS)}"
            )
        return answer
    return K.builtin_kind(module)


def _has_own_params(module: nn.Module) -> bool:
    return any(True for _ in module.parameters(recurse=False))


def _classify_all(model: nn.Module) -> tuple[list[LayerInfo], dict[str, nn.Module]]:
    """Every module with its kind, and the *units* among them: leaf modules (ignoring children
    regfw inserted) and layers as wholes (attention and recurrent layers, and any module a plugin
    classifies as a layer kind): the children of a unit are not classified on their own."""
    infos: list[LayerInfo] = []
    units: dict[str, nn.Module] = {}
    atomic_prefixes: list[str] = []
    for path, module in model.named_modules():
        if is_injected(path) or any(path.startswith(prefix + ".") for prefix in atomic_prefixes):
            continue
        kind = classify(module, path)
        # A layer, a norm (with any activation fused into it, timm's BatchNormAct2d) or a skipped module is
        # one unit, even a container.
        whole = kind in _LAYER_KINDS or kind in (K.SKIP, K.NORM)
        if path and whole:
            atomic_prefixes.append(path)
        own_children = [n for n in module._modules if not n.startswith(INJECTED_PREFIX)]
        if path and (not own_children or whole):
            units[path] = module
        if path or not own_children:
            infos.append(LayerInfo(path, module, kind, len(infos)))
    return infos, units


def analyse(model: nn.Module, example_input: Any = None) -> ModelMap:
    """Classify ``model`` and read its dataflow (from ``example_input`` when given).

    The first layer called (when no unclassified module with parameters, such as an
    embedding, runs before it) is marked ``is_input``; the last hidden or conv layer called is
    the output layer (``is_output``) and gets nothing inserted after it. Every pass it makes over the
    model (the example pass, the training pass, the attention probes) leaves the model as it was
    (:func:`regfw.placement.untouched.untouched`).
    """
    with untouched(model):
        return _analyse(model, example_input)


def _analyse(model: nn.Module, example_input: Any) -> ModelMap:
    infos, units = _classify_all(model)
    if not units and infos:  # the model is a single leaf module
        units = {"": model}
    flow, note = build_dataflow(model, units, example_input)
    notes = [note] if note else []
    if flow.order:
        rank = {p: n for n, p in enumerate(flow.order)}
        called = sorted((i for i in infos if i.path in rank), key=lambda i: rank[i.path])
    else:
        called = [i for i in infos if i.kind in _LAYER_KINDS or _has_own_params(i.module)]
    for info in called:
        if info.kind in _LAYER_KINDS:
            info.is_input = True
            break
        if _has_own_params(info.module) and info.kind not in (K.NORM, K.SKIP):
            break  # e.g. an embedding consumes the input: no input dropout
    for info in infos:  # norms and activations of any library, by what their forward does
        if info.kind is None and info.path in units and structure.is_norm(info.path, info.module, flow):
            info.kind = K.NORM
        elif info.kind is None and info.path in units and structure.is_activation(info.path, info.module, flow):
            info.kind = K.ACTIVATION
        elif (info.kind is None and info.path in units
              and K.linear_by_behaviour(info.module, flow.inner_calls.get(info.path))):
            info.kind = K.HIDDEN  # a weight matrix multiplied with the input (GPT-2's Conv1D)
        if flow.complete and info.path in units and info.path and info.path not in flow.calls:
            info.dead = True
    if flow.output_sources:  # every layer reaching an output with no weight layer in between
        for info in infos:
            if info.kind in _LAYER_KINDS and info.path in flow.output_sources:
                info.is_output = True
    else:
        last = [i for i in called if i.kind in (K.HIDDEN, K.CONV)]
        if last:
            last[-1].is_output = True
    leaves = tuple(m for p, m in units.items() if p)
    sites, attention_note = attention_graph.find(model, example_input)
    if attention_note:
        notes.append(attention_note)
    attention = [p for p in attention_graph.hosts(sites, [i.path for i in infos if i.kind == K.ATTENTION])
                 if not is_injected(p)]
    kinds = {i.path: i.kind for i in infos}

    def drop_unit(p: str) -> bool:
        return p in units and is_dropout(units[p]) and not is_path_drop(units[p])

    token_drop = structure.token_dropout_slot(flow, attention, drop_unit, lambda p: kinds.get(p) in _LAYER_KINDS)
    stem: set[str] = set()
    if token_drop is not None:  # the layers since the dropout before it (or the input): a ViT's patch embedding
        end = flow.order.index(token_drop)
        start = max((i for i in range(end) if drop_unit(flow.order[i])), default=-1)
        stem = {p for p in flow.order[start + 1:end] if kinds.get(p) in _LAYER_KINDS}
    residuals = ResidualAnalysis(model, leaves, example_input)
    return ModelMap(model, infos, flow, residuals, notes, gates=structure.gate_units(flow),
                    qkv={p for s in sites for p in s.projections | s.feeders}, attention=attention,
                    token_drop=token_drop, stem=stem, attention_sites=sites)


def classify_model(model: nn.Module, example_input: Any = None) -> list[LayerInfo]:
    """Every module of ``model`` with its kind, in call order when ``example_input`` is given
    (see :func:`analyse`)."""
    return analyse(model, example_input).layers


def after_anchor(mm: ModelMap, path: str) -> tuple[str, str | None, list[str]]:
    """Where a module inserted after the layer at ``path`` goes.

    Returns ``(anchor_path, existing_dropout_path, skipped)``: the anchor moves past the norm
    and activation layers that consume the layer's output one after the other, each called
    once per forward pass; an existing dropout found on the way (also past a pool) is returned so
    that it can be reused instead of inserting a second one in series with it.
    """
    anchor, existing, skipped, _pooled = _walk_after(mm, path)
    return anchor, existing, skipped


def _walk_after(mm: ModelMap, path: str) -> tuple[str, str | None, list[str], bool]:
    """:func:`after_anchor`, and whether the existing dropout was reached through a pool.

    A pool (a parameterless unit whose forward only pools, or a pooling function such as
    ``x.mean((2, 3))``) is read through when looking for the place's dropout: a dropout mask before
    the pool and the model's own dropout after it act on the same features with no weight between
    (in series). The anchor never moves past a pool: a norm or activation after it ends the walk.
    """
    flow = mm.flow
    anchor = path
    skipped: list[str] = []
    pooled = False
    cursor = path  # walks on through placeholders, reshapes and pools; the anchor moves only past norms and activations
    while True:
        nxt = flow.next(cursor)
        through_pool = False
        if nxt is None:
            nxt = flow.next_through_pool(cursor)
            through_pool = nxt is not None
        if nxt is None:
            return anchor, None, skipped, False
        module = mm.module(nxt)
        pooled = pooled or through_pool
        if is_dropout(module) and not is_path_drop(module):
            # the model's own dropout at this place, even one module called at several places (each call
            # is a dropout slot): it is reused, never doubled by an insertion before it
            return anchor, nxt, skipped, pooled
        paired = flow.called_once(nxt) if through_pool else flow.paired(cursor, nxt)
        if (not through_pool and flow.prev(nxt) != cursor) or not paired or is_path_drop(module):
            # a module fed by more than this path, one called again elsewhere (more often than this path
            # runs, or on another path), or a residual branch's stochastic depth (not this slot): the walk
            # stops before it. A unit called once per call of this path (a detection head applied once per
            # feature level) is passed: a hook on it acts exactly where one on the layer would
            return anchor, None, skipped, False
        cursor = nxt
        if isinstance(module, nn.Identity) or nxt in flow.reshapes:
            continue
        if nxt in flow.pools:
            pooled = True
            continue
        if pooled or mm.kind(nxt) not in (K.NORM, K.ACTIVATION):
            return anchor, None, skipped, False
        anchor = nxt
        skipped.append(nxt)


def feeds_norm(mm: ModelMap, anchor: str) -> str | None:
    """The normalisation the output of ``anchor`` reaches on any of its consumers through shape ops only
    (reshapes, permutes, a ``Permute`` module, ``nn.Identity``; a functional nonlinearity is transparent in the
    dataflow's links too): a norm unit (by type or behaviour), or a normalising function called outside any unit
    (``F.layer_norm(x, ...)``); None when it reaches none.

    A dropout there would feed the norm: at training time the norm normalises the masked values (the mask's
    scale is normalised away), at inference it sees other statistics (Li et al., CVPR 2019, for BatchNorm).
    The walk of :func:`after_anchor` already moves past a norm that is the place's one consumer; this finds a
    norm among several consumers (the pre-norm of the next block next to the residual add of ``x``)."""
    flow = mm.flow
    stack, seen = [anchor], {anchor}
    while stack:
        unit = stack.pop()
        functions = flow.function_users.get(unit, set()) & structure.NORMALISING
        if functions:
            return f"the function {sorted(functions)[0]!r}"
        for nxt in flow.successors.get(unit, []):
            if nxt == FUNCTION or nxt in seen:
                continue
            seen.add(nxt)
            if mm.kind(nxt) == K.NORM:
                return nxt
            if isinstance(mm.module(nxt), nn.Identity) or nxt in flow.reshapes:
                stack.append(nxt)
    return None


def injected_name(reg_name: str, action: str) -> str:
    """The child name of the module regularizer ``reg_name`` hangs on its anchor."""
    return f"{INJECTED_PREFIX}{'input_' if action == 'before' else ''}{reg_name}"


def reuse_existing(reg: Any, mm: ModelMap, kind: str, host: str, action: str, rate: float, reason: str,
                   existing: str | None, path: str) -> list[PlanItem] | None:
    """Rows for a place that already has dropout: ``[]`` to keep it, one ``set`` row to change its
    rate, or None when the place is free. Covers a module regfw inserted earlier (``existing``
    is then the child of ``host`` named by :func:`injected_name`) and the model's own dropout."""
    own = injected_name(reg.name, action)
    if own in mm.module(host)._modules:
        target = f"{host}.{own}" if host else own
        return [PlanItem(reg.name, path, kind, reg.variant_for(kind), rate,
                         reason + "; inserted before, rate set", action="set", anchor=target)]
    if existing is None:
        return None
    if getattr(reg.config, "existing", "override") == "keep":
        return []
    return [PlanItem(reg.name, path, kind, f"{foreign.describe(mm.module(existing))} (existing)", rate,
                     reason + "; existing dropout, rate overridden", action="set", anchor=existing)]


def rate_of(reg: Planner, kind: str, ctx: PlanContext,
            layer: LayerInfo | None) -> tuple[float | None, str]:
    """``reg.rate_for(kind, ctx, layer=layer)``; without ``layer`` for an override that does not take it."""
    parameters = inspect.signature(reg.rate_for).parameters
    if "layer" in parameters or any(p.kind is p.VAR_KEYWORD for p in parameters.values()):
        return reg.rate_for(kind, ctx, layer=layer)
    return reg.rate_for(kind, ctx)


def plan_insertions(reg: Planner, model: nn.Module, ctx: PlanContext) -> list[PlanItem]:
    """The rows an :class:`~regfw.extend.regularizer.InjectingRegularizer` would insert."""
    mm: ModelMap = ctx.model_map or analyse(model, ctx.example_input)
    items: list[PlanItem] = []
    matched = False  # a layer of one of the kinds exists (it may still get nothing: rate 0, `keep`)
    seen: set[str] = set()  # existing dropout already given a row
    for info in mm.layers:
        if K.INPUT in reg.kinds and info.is_input:
            matched = True
            items.extend(_input_rows(reg, mm, info, ctx))
        if K.HIDDEN in reg.kinds and structure.transformer_layer_slots(info.module):
            matched = True
            items.extend(_transformer_layer_rows(reg, mm, info, ctx))
        if info.kind not in reg.kinds or info.kind == K.INPUT or info.is_output or info.dead:
            continue
        matched = True
        if info.path in mm.gates or info.path in mm.qkv or info.path in mm.stem:
            continue  # a gating path (SE, GLU), an attention q/k/v projection, a Transformer's stem: never dropout
        rate, reason = rate_of(reg, info.kind, ctx, info)
        if not rate:  # None (no rate) or an explicit 0 switch the kind off
            continue
        anchor, existing, skipped, pooled = _walk_after(mm, info.path)
        if anchor in mm.gates or anchor in _shortcuts(mm):
            continue  # a gate, or the projection shortcut of a residual block (the residual stream)
        if pooled and existing is not None:
            reason += f"; pooled into the model's own {existing} (never a second dropout in series)"
            if K.HIDDEN in reg.kinds and _head_slot(mm, existing):
                # the dropout before an output layer is the head's hidden slot: its row sets the hidden rate
                items.append(PlanItem(reg.name, info.path, info.kind, reg.variant_for(info.kind), None,
                                      f"not inserted: the output is pooled into {existing}, the model's own "
                                      f"dropout before its output layer (its hidden slot); never a second "
                                      f"dropout in series", action="note"))
                continue
        if existing is None:
            functional = _functional_dropout_row(reg, mm, info, anchor, rate, reason)
            if functional is not None:
                items.extend(functional)
                continue
        if existing is not None:
            seen.add(existing)
        nonlinear = _functional_nonlinearity(mm, anchor) if existing is None else None
        if nonlinear:
            items.append(PlanItem(reg.name, info.path, info.kind, reg.variant_for(info.kind), None,
                                  f"not inserted: the output goes to the function {nonlinear!r} (an activation no "
                                  f"hook can follow); use an activation module to get dropout after it",
                                  action="note"))
            continue
        norm = feeds_norm(mm, anchor) if existing is None else None
        if norm:
            items.append(PlanItem(reg.name, info.path, info.kind, reg.variant_for(info.kind), None,
                                  f"not inserted: the output of {anchor} feeds {norm}, a normalisation, "
                                  f"through shape ops only (never dropout before a norm: it would normalise the "
                                  f"mask away and shift its statistics at inference)", action="note"))
            continue
        reused = reuse_existing(reg, mm, info.kind, anchor, "after", rate, reason, existing, info.path)
        if reused is not None:
            items.extend(reused)
            continue
        problem = reg.supports(info.kind, info.module, mm.flow.out_dims.get(anchor))
        if problem:
            items.append(PlanItem(reg.name, info.path, info.kind, reg.variant_for(info.kind), None,
                                  f"not inserted: {problem}", action="note"))
            continue
        if skipped:
            reason += f"; after {', '.join(skipped)}"
        items.append(PlanItem(reg.name, info.path, info.kind, reg.variant_for(info.kind), rate, reason,
                              action="after", anchor=anchor, options=_layer_options(info.module)))
    if K.HIDDEN in reg.kinds:
        items.extend(_classifier_rows(reg, mm, ctx, seen))
    if not matched:
        warnings.warn(
            f"regularizer {reg.name!r} found no layer of kinds {', '.join(reg.kinds)} in "
            f"{type(model).__name__}; nothing was inserted. {_looked_at(reg, mm)}",
            stacklevel=3,
        )
    return items


def _looked_at(reg: Planner, mm: ModelMap) -> str:
    """What :func:`plan_insertions` saw in a model that gave it no layer: for its warning."""
    parts: list[str] = []
    outputs = [i.path for i in mm.layers if i.is_output and i.kind in reg.kinds]
    if outputs:
        parts.append(f"output layer(s) {', '.join(outputs)} (nothing goes after an output layer)")
    if K.INPUT in reg.kinds and not any(i.is_input for i in mm.layers):
        first = next((p for p in mm.flow.order if _has_own_params(mm.module(p))), None)
        if first is not None:
            parts.append(f"the model input goes first to {first} ({type(mm.module(first)).__name__}), not to a "
                         f"layer of kind {', '.join(k for k in reg.kinds if k in _LAYER_KINDS)}, so it takes no "
                         f"input dropout")
    others: dict[str, list[str]] = {}
    for info in mm.layers:
        if info.path and info.kind in (_LAYER_KINDS | {K.EMBEDDING}) and info.kind not in reg.kinds:
            others.setdefault(info.kind, []).append(info.path)
    if others:
        parts.append("layers of other kinds: " + ", ".join(
            f"{len(paths)} {kind} ({', '.join(paths[:4])}{', ...' if len(paths) > 4 else ''})"
            for kind, paths in others.items()))
    return f"It looked at: {'; '.join(parts)}." if parts else "The model has no classified layer."


def _transformer_layer_rows(reg: Planner, mm: ModelMap, info: LayerInfo,
                            ctx: PlanContext) -> list[PlanItem]:
    """The hidden rows of a torch Transformer layer: its own sub-layer and feed-forward dropouts
    (:func:`regfw.placement.structure.transformer_layer_slots`), reused (``override`` or ``keep``), never doubled."""
    rate, reason = reg.rate_for(K.HIDDEN, ctx)
    if not rate:
        return []
    rows: list[PlanItem] = []
    for sub, drop in structure.transformer_layer_slots(info.module):
        what = "feed-forward hidden units" if sub == "linear1" else "sub-layer output, before the residual add"
        slot = f"{info.path}.{drop}" if info.path else drop
        rows.extend(reuse_existing(reg, mm, K.HIDDEN, slot, "after", rate,
                                   f"{reason}; {type(info.module).__name__}'s own dropout ({what})", slot,
                                   f"{info.path}.{sub}" if info.path else sub) or [])
    return rows


def _shortcuts(mm: ModelMap) -> set[str]:
    """Modules whose output is only the shortcut operand of a residual add (the projection of a
    downsampling block): dropout there would drop the shortcut and not the branch."""
    sites, _error = mm.residuals.result
    return {s.shortcut_module for s in sites
            if s.shortcut_module and mm.flow.successors.get(s.shortcut_module) in (None, [FUNCTION])}


def _functional_dropout_row(reg: Planner, mm: ModelMap, info: LayerInfo, anchor: str, rate: float,
                            reason: str) -> list[PlanItem] | None:
    """Rows for a layer whose output goes straight into a functional dropout (``F.dropout(self.fc(x),
    self.p, self.training)``): that call is the existing dropout of the place, so nothing is
    inserted; its rate is set where the host keeps it in an attribute (``existing: override``), and
    a note says so where it is a constant in the code. None when there is no such call."""
    if not mm.flow.function_users.get(anchor, set()) & foreign.FUNCTIONAL_NAMES:
        return None
    hosts = [(p, m, name, p_) for p, m, name, p_ in foreign.functional_hosts(mm.model)
             if not p or anchor.startswith(p + ".")]
    if not hosts:
        return None
    path, host, fname, was = max(hosts, key=lambda h: len(h[0]))
    what = f"F.{fname} in {type(host).__name__}.forward (existing)"
    kind = info.kind or K.HIDDEN
    if getattr(reg.config, "existing", "override") == "keep":
        return []
    if foreign.rate_attr(host) is None:
        return [PlanItem(reg.name, info.path, kind, what, was,
                         reason + f"; existing functional dropout with its rate {was:g} fixed in the code, kept",
                         action="note")]
    return [PlanItem(reg.name, info.path, kind, what, rate, reason + "; existing dropout, rate overridden",
                     action="set", anchor=path)]


def _functional_nonlinearity(mm: ModelMap, anchor: str) -> str | None:
    """The name of a functional nonlinearity (``F.gelu``) consuming ``anchor``'s output, when it does
    not commute with a dropout mask (every one but ReLU-like functions)."""
    names = mm.flow.function_users.get(anchor, set()) & structure.NONLINEAR
    names -= {"relu", "relu_", "leaky_relu", "threshold"}
    return sorted(names)[0] if names else None


def _head_slot(mm: ModelMap, dropout: str) -> bool:
    """Whether the dropout directly feeds an output layer (a classifier's ``Dropout -> Linear``)."""
    nxt = mm.flow.next(dropout)
    return nxt is not None and any(i.path == nxt and i.is_output for i in mm.layers)


def _classifier_rows(reg: Planner, mm: ModelMap, ctx: PlanContext, seen: set[str]) -> list[PlanItem]:
    """Existing dropout directly before an output layer (a classifier's ``Dropout -> Linear``) is the
    hidden slot of that head, whatever precedes it, so every model's classifier dropout gets the
    hidden rate (``override``) or is kept (``keep``)."""
    rows: list[PlanItem] = []
    for info in mm.layers:
        if not info.is_output:
            continue
        before = mm.flow.prev(info.path)
        if (before is None or before in seen or not is_dropout(mm.module(before)) or is_path_drop(mm.module(before))
                or mm.flow.next(before) != info.path):
            continue
        rate, reason = reg.rate_for(K.HIDDEN, ctx)
        if not rate:
            continue
        seen.add(before)
        reused = reuse_existing(reg, mm, K.HIDDEN, before, "after", rate,
                                reason + f"; dropout before output layer {info.path}", before, info.path)
        rows.extend(reused or [])
    return rows


def _input_rows(reg: Planner, mm: ModelMap, info: LayerInfo, ctx: PlanContext) -> list[PlanItem]:
    rate, reason = reg.rate_for(K.INPUT, ctx)
    if not rate:
        return []
    if mm.token_drop is not None:  # a Transformer: its input dropout acts on the token embeddings
        stem = [p for p in mm.flow.order if p in mm.stem]
        reason += (f"; token dropout: the model's own {mm.token_drop} after the position embedding"
                   + (f" (nothing on the pixels or in the stem {', '.join(stem)})" if stem else ""))
        return reuse_existing(reg, mm, K.INPUT, mm.token_drop, "after", rate, reason, mm.token_drop, info.path) or []
    before = mm.flow.prev(info.path)
    existing = (before if before is not None and is_dropout(mm.module(before)) and mm.flow.next(before) == info.path
                else None)
    reused = reuse_existing(reg, mm, K.INPUT, info.path, "before", rate, reason, existing, info.path)
    if reused is not None:
        return reused
    return [PlanItem(reg.name, info.path, K.INPUT, reg.variant_for(K.INPUT), rate, reason,
                     action="before", anchor=info.path)]


def _layer_options(module: nn.Module) -> dict:
    if isinstance(module, nn.RNNBase):
        return {"batch_first": bool(module.batch_first)}
    return {}


def attach(model: nn.Module, anchor: str, name: str, module: nn.Module, where: str) -> bool:
    """Hang ``module`` on ``anchor`` as child ``name`` and call it from a hook.

    ``where`` is ``"after"`` or ``"before"``. Returns False (and changes nothing) when the
    anchor already carries a child of that name: a module is never inserted twice. The module
    is moved to the anchor's device; its masks follow the input's dtype.
    """
    if where not in ("after", "before"):
        raise ValueError(f"where must be 'after' or 'before', got {where!r}")
    host = model.get_submodule(anchor) if anchor else model
    if name in host._modules:
        return False
    if where == "after":
        attach_child(host, name, module, hook=ApplyAfter(name))
    else:
        attach_child(host, name, module, pre_hook=ApplyBefore(name))
    return True


def set_rate(model: nn.Module, path: str, rate: float) -> None:
    """Set the rate of the dropout module at ``path`` (a ``set`` row): ``p``, or timm's ``drop_prob``
    (:func:`regfw.placement.foreign.set_rate`)."""
    foreign.set_rate(model.get_submodule(path), rate)


def apply_insertions(reg: Planner, model: nn.Module, items: list[PlanItem]) -> None:
    """Carry out the ``before``, ``after`` and ``set`` rows among ``items`` (those of
    :func:`plan_insertions`), each through the regularizer's :meth:`~regfw.Regularizer.apply_row`."""
    for item in items:
        if item.action in ("set", "after", "before"):
            reg.apply_row(model, item)
