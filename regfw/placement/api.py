"""The public placement API: how a regularizer plugin finds the places of a model and changes them.

Everything a plugin needs to plan and apply its own rows, the way the built-in regularizers do
(``plugins/``), without reaching into :mod:`regfw.placement.surgery` or :mod:`regfw.placement.dataflow`, whose
insides may change. The names here are listed in ``docs/plugins.md`` and kept stable.

Reading the model:

* :func:`model_map` -- the analysed model a plan is made on: ``ctx.model_map`` when
  :func:`regfw.placement.plan.make_plan` computed it (once, for every regularizer), or analysed now.
* :func:`analyse` / :class:`ModelMap` -- every module classified into a kind
  (:class:`LayerInfo`: path, module, kind, ``is_input``, ``is_output``), the dataflow
  (``mm.flow``: ``next``, ``prev``, ``called_once``, ``out_dims``) and the residual adds
  (``mm.residuals.result``: ``(sites, error)``).
* :func:`classify` -- the kind of one module (a plugin's ``regfw_classify_module`` answer first,
  then the built-in type table); :func:`classify_model` -- :func:`analyse`'s layers only.
* :func:`is_dropout` -- a dropout-family module (torch's, every :class:`regfw.StochasticModule`, and the
  stochastic layers of torchvision and timm, :mod:`regfw.placement.foreign`); :func:`is_path_drop` -- one of them
  that is stochastic depth (regfw's ``DropPath``, torchvision's ``StochasticDepth``, timm's ``DropPath``).

Choosing the place and changing the model:

* :func:`after_anchor` -- where a module "after" a layer goes: past the norm and activation that
  follow it, never between a layer and its BatchNorm; an existing dropout on the way is returned.
* :func:`reuse_existing` -- the rows for a place that already has dropout (``existing: keep`` or
  ``override``), or a module this regularizer inserted before; None when the place is free.
* :func:`injected_name` -- the child name an inserted module gets on its anchor (``regfw_<name>``;
  :data:`INJECTED_PREFIX` is its prefix, :func:`is_injected` tells a path regfw inserted).
* :func:`attach` -- hang a module on an anchor, run from a forward hook (``after``) or pre-hook
  (``before``); parameter names and state dicts are unchanged. :func:`set_rate` -- a ``set`` row.
* :func:`apply_insertions` -- carry out ``before`` / ``after`` / ``set`` rows with the
  regularizer's ``make_module`` (what :class:`regfw.InjectingRegularizer` does by default).
"""
from __future__ import annotations

from typing import Any

from torch import nn

from regfw.placement.attention import AttentionSite, RateSlot, rate_slot, unrecognised_attention
from regfw.placement.plan_items import PlanContext, PlanItem
from regfw.placement.surgery import (
    INJECTED_PREFIX,
    LayerInfo,
    ModelMap,
    after_anchor,
    analyse,
    apply_insertions,
    attach,
    classify,
    classify_model,
    injected_name,
    is_dropout,
    is_injected,
    is_path_drop,
    reuse_existing,
    set_rate,
)

__all__ = [
    "AttentionSite",
    "INJECTED_PREFIX",
    "LayerInfo",
    "ModelMap",
    "after_anchor",
    "analyse",
    "apply_insertions",
    "attach",
    "classify",
    "classify_model",
    "injected_name",
    "is_dropout",
    "is_injected",
    "is_path_drop",
    "model_map",
    "planned_module",
    "RateSlot",
    "rate_slot",
    "reuse_existing",
    "set_rate",
    "unrecognised_attention",
]


def model_map(model: nn.Module, ctx: PlanContext | Any) -> ModelMap:
    """The analysed ``model`` of a plan: ``ctx.model_map`` when the planner computed it (once, shared
    by every regularizer), else :func:`analyse` with ``ctx.example_input`` now."""
    mm = getattr(ctx, "model_map", None)
    return mm if mm is not None else analyse(model, getattr(ctx, "example_input", None))


def planned_module(model: nn.Module, row: PlanItem | Any) -> tuple[str, nn.Module] | None:
    """``(path, module)`` of the module a plan row inserted (``before``/``after``) or re-rated (``set``)
    in ``model`` after :meth:`~regfw.Regularizer.apply`; None when there is none (a ``wrap`` or
    ``note`` row, or a model the row was not applied to)."""
    if row.action == "set":
        path = row.anchor or row.path
        try:
            return path, model.get_submodule(path)
        except AttributeError:
            return None
    if row.action not in ("before", "after") or row.anchor is None:
        return None
    try:
        host = model.get_submodule(row.anchor) if row.anchor else model
    except AttributeError:
        return None
    expected = injected_name(row.regularizer, row.action)
    names = [expected] + [n for n in host._modules if n.startswith(INJECTED_PREFIX) and n.endswith(row.regularizer)
                          and (("input_" in n) == (row.action == "before"))]
    for name in names:
        module = host._modules.get(name)
        if module is not None:
            return (f"{row.anchor}.{name}" if row.anchor else name), module
    return None
