"""Model surgery: classify a model's layers into kinds, plan insertions, and apply them.

Inserted modules hang on an *anchor* module as a child named ``regfw_<name>`` and run from a
forward hook (``after``: on the anchor's output) or forward pre-hook (``before``: on its input).
This keeps every existing parameter name, so a state dict of the plain model still loads, and
works for any ``forward`` however it is written. The hooks are small picklable objects that
look the child up by name, so ``copy.deepcopy`` and pickling keep working.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Optional

import torch
from torch import nn

from regfw import kinds as K
from regfw.regularizer import PlanContext, PlanItem

if TYPE_CHECKING:  # pragma: no cover
    from regfw.regularizer import InjectingRegularizer

INJECTED_PREFIX = "regfw_"
#: Kinds whose subtrees are one unit: their children are not classified on their own.
_ATOMIC_KINDS = {K.ATTENTION, K.RECURRENT}
_LAYER_KINDS = {K.HIDDEN, K.CONV, K.RECURRENT, K.ATTENTION}


@dataclass
class LayerInfo:
    """One classified module of a model."""

    path: str
    module: nn.Module
    kind: Optional[str]
    order: int
    is_input: bool = False
    is_output: bool = False


class ApplyAfter:
    """Forward hook: pass the host's output through its child ``name``.

    For tuple outputs (``nn.LSTM`` returns ``(output, state)``) only the first element is
    changed.
    """

    def __init__(self, name: str) -> None:
        self.name = name

    def __call__(self, module: nn.Module, args: Any, output: Any) -> Any:
        child = getattr(module, self.name)
        if isinstance(output, tuple):
            return (child(output[0]), *output[1:])
        return child(output)


class ApplyBefore:
    """Forward pre-hook: pass the host's first positional input through its child ``name``."""

    def __init__(self, name: str) -> None:
        self.name = name

    def __call__(self, module: nn.Module, args: tuple) -> tuple:
        child = getattr(module, self.name)
        return (child(args[0]), *args[1:])


def is_injected(path: str) -> bool:
    """True for a module that regfw inserted (its own name starts with ``regfw_``)."""
    return any(part.startswith(INJECTED_PREFIX) for part in path.split("."))


def is_dropout(module: nn.Module) -> bool:
    from regfw.layers.base import StochasticModule

    return isinstance(module, (nn.modules.dropout._DropoutNd, StochasticModule))


def classify(module: nn.Module, path: str) -> Optional[str]:
    """The kind of one module: a plugin's answer first, then the built-in type table."""
    from regfw.plugins import get_plugin_manager

    answer = get_plugin_manager().hook.regfw_classify_module(module=module, path=path)
    if answer is not None:
        if answer not in K.KINDS:
            raise ValueError(
                f"a plugin classified module {path!r} ({type(module).__name__}) as {answer!r}; "
                f"expected one of {', '.join(K.KINDS)}"
            )
        return answer
    return K.builtin_kind(module)


def _call_order(model: nn.Module, example_input: Any, paths: dict[nn.Module, str]) -> list[str]:
    """Paths of the given modules in the order a forward pass first calls them."""
    seen: list[str] = []
    handles = []

    def record(module, args):
        path = paths[module]
        if path not in seen:
            seen.append(path)

    for module in paths:
        handles.append(module.register_forward_pre_hook(record))
    was_training = model.training
    try:
        model.eval()
        with torch.no_grad():
            if isinstance(example_input, (tuple, list)):
                model(*example_input)
            else:
                model(example_input)
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    return seen


def classify_model(model: nn.Module, example_input: Any = None) -> list[LayerInfo]:
    """Every module of ``model`` with its kind, in call order when ``example_input`` is given.

    The first layer called (when no unclassified module with parameters, such as an
    embedding, runs before it) is marked ``is_input``; the last hidden or conv layer called is
    the output layer (``is_output``) and gets nothing inserted after it.
    """
    infos: list[LayerInfo] = []
    atomic_prefixes: list[str] = []
    for path, module in model.named_modules():
        if not path or is_injected(path):
            continue
        if any(path.startswith(prefix + ".") for prefix in atomic_prefixes):
            continue
        kind = classify(module, path)
        if kind in _ATOMIC_KINDS or kind == K.SKIP:
            atomic_prefixes.append(path)
        infos.append(LayerInfo(path, module, kind, len(infos)))
    if not infos and not is_injected(""):
        kind = classify(model, "")
        if kind is not None:
            infos.append(LayerInfo("", model, kind, 0))
    if example_input is not None:
        leaves = {i.module: i.path for i in infos if i.kind in _LAYER_KINDS or _has_own_params(i.module)}
        order = _call_order(model, example_input, leaves)
        rank = {p: n for n, p in enumerate(order)}
        called = [i for i in infos if i.path in rank]
        called.sort(key=lambda i: rank[i.path])
    else:
        called = [i for i in infos if i.kind in _LAYER_KINDS or _has_own_params(i.module)]
    for info in called:
        if info.kind in _LAYER_KINDS:
            info.is_input = True
            break
        if _has_own_params(info.module) and info.kind not in (K.NORM, K.SKIP):
            break  # e.g. an embedding consumes the input: no input dropout
    last = [i for i in called if i.kind in (K.HIDDEN, K.CONV)]
    if last:
        last[-1].is_output = True
    return infos


def _has_own_params(module: nn.Module) -> bool:
    return any(True for _ in module.parameters(recurse=False))


def _parent(model: nn.Module, path: str) -> tuple[Optional[nn.Module], str]:
    if "." not in path:
        return (model if path else None), path
    parent_path, name = path.rsplit(".", 1)
    return model.get_submodule(parent_path), name


def after_anchor(model: nn.Module, info: LayerInfo, by_path: dict[str, LayerInfo]) -> tuple[str, Optional[str], list[str]]:
    """Where a module inserted after layer ``info`` goes.

    Returns ``(anchor_path, existing_dropout_path, skipped)``: in an ``nn.Sequential`` the
    anchor moves past the norm and activation layers that follow the layer (so dropout never
    sits between a layer and the BatchNorm that normalises it); an existing dropout found there
    is returned so it can be reused instead of inserting a second one.
    """
    parent, name = _parent(model, info.path)
    if not isinstance(parent, nn.Sequential):
        return info.path, None, []
    keys = list(parent._modules.keys())
    idx = keys.index(name)
    prefix = info.path[: -len(name)]
    anchor = info.path
    skipped: list[str] = []
    for key in keys[idx + 1:]:
        sibling = parent._modules[key]
        sib_path = prefix + key
        if is_dropout(sibling):
            return anchor, sib_path, skipped
        sib = by_path.get(sib_path)
        kind = sib.kind if sib is not None else classify(sibling, sib_path)
        if kind in (K.NORM, K.ACTIVATION):
            anchor = sib_path
            skipped.append(sib_path)
            continue
        break
    return anchor, None, skipped


def plan_insertions(reg: "InjectingRegularizer", model: nn.Module, ctx: PlanContext) -> list[PlanItem]:
    """The rows an :class:`~regfw.regularizer.InjectingRegularizer` would insert."""
    layers = ctx.layers or classify_model(model, ctx.example_input)
    by_path = {i.path: i for i in layers}
    existing_policy = getattr(reg.config, "existing", "override")
    items: list[PlanItem] = []
    for info in layers:
        if K.INPUT in reg.kinds and info.is_input:
            rate, reason = reg.rate_for(K.INPUT, ctx)
            if rate:
                items.append(PlanItem(reg.name, info.path, K.INPUT, reg.variant_for(K.INPUT), rate, reason,
                                      action="before", anchor=info.path))
        if info.kind not in reg.kinds or info.kind == K.INPUT or info.is_output:
            continue
        rate, reason = reg.rate_for(info.kind, ctx)
        if not rate:  # None (no rate) or an explicit 0 switch the kind off
            continue
        anchor, existing, skipped = after_anchor(model, info, by_path)
        if existing is not None:
            if existing_policy == "keep":
                continue
            items.append(PlanItem(reg.name, existing, info.kind, type(model.get_submodule(existing)).__name__,
                                  rate, reason + "; existing dropout, rate overridden", action="set",
                                  anchor=existing))
            continue
        if skipped:
            reason += f"; after {', '.join(skipped)}"
        items.append(PlanItem(reg.name, info.path, info.kind, reg.variant_for(info.kind), rate, reason,
                              action="after", anchor=anchor, options=_layer_options(info.module)))
    if not items:
        warnings.warn(
            f"regularizer {reg.name!r} found no layer of kinds {', '.join(reg.kinds)} in "
            f"{type(model).__name__}; nothing was inserted",
            stacklevel=3,
        )
    return items


def _layer_options(module: nn.Module) -> dict:
    if isinstance(module, nn.RNNBase):
        return {"batch_first": bool(module.batch_first)}
    return {}


def attach(model: nn.Module, anchor: str, name: str, module: nn.Module, where: str) -> bool:
    """Hang ``module`` on ``anchor`` as child ``name`` and call it from a hook.

    ``where`` is ``"after"`` or ``"before"``. Returns False (and changes nothing) when the
    anchor already carries a child of that name: a module is never inserted twice.
    """
    host = model.get_submodule(anchor) if anchor else model
    if name in host._modules:
        return False
    ref = next(iter(host.parameters()), None)
    if ref is None:
        ref = next(iter(host.buffers()), None)
    if ref is not None:
        module = module.to(device=ref.device)
    host.add_module(name, module)
    if where == "after":
        host.register_forward_hook(ApplyAfter(name))
    elif where == "before":
        host.register_forward_pre_hook(ApplyBefore(name))
    else:
        raise ValueError(f"where must be 'after' or 'before', got {where!r}")
    return True


def apply_insertions(reg: "InjectingRegularizer", model: nn.Module, items: list[PlanItem]) -> None:
    """Carry out the rows of :func:`plan_insertions`."""
    for item in items:
        if item.action == "set":
            existing = model.get_submodule(item.anchor)
            existing.p = item.rate
            continue
        module = reg.make_module(item.kind, item.rate, item)
        suffix = "input_" if item.action == "before" else ""
        attach(model, item.anchor, f"{INJECTED_PREFIX}{suffix}{reg.name}", module, item.action)
