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

Residual branches (kind ``residual``):

* :func:`residual_branches` -- every residual add's branch (:class:`ResidualSite`: the module that
  produces the branch operand, its block, why none can carry a module) and the blocks in order.
* :func:`plan_residual_rows` -- the rows that put a regularizer's module on every residual branch,
  one rate per block from a depth profile; what an :class:`regfw.InjectingRegularizer` with
  ``residual`` in its ``kinds`` plans by default, and what ``drop_path`` plans with a linear profile.
"""
from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

from torch import nn

from regfw.placement import kinds as K
from regfw.placement.attention import AttentionSite, RateSlot, rate_slot, unrecognised_attention
from regfw.placement.dataflow import ResidualSite
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
    "ResidualSite",
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
    "plan_residual_rows",
    "planned_module",
    "RateSlot",
    "rate_slot",
    "residual_branches",
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


def residual_branches(model: nn.Module, ctx: PlanContext | Any) -> tuple[list[ResidualSite], list[str], str | None]:
    """``(sites, blocks, error)``: every residual add of ``model`` (a :class:`ResidualSite` each), the
    blocks holding a branch that can carry a module, in forward order (adds in one block share a
    rate), and why the adds could not be found (the model cannot be traced), else None. A branch whose
    anchor lies on a gate (the position convolution inside a spatial-attention branch that scales the
    features) carries nothing: dropping it for a sample would change the gate, not skip a block."""
    mm = model_map(model, ctx)
    sites, error = mm.residuals.result
    blocks = list(dict.fromkeys(s.block for s in sites if s.anchor is not None and s.anchor not in mm.gates))
    return sites, blocks, error


def plan_residual_rows(reg: Any, model: nn.Module, ctx: PlanContext | Any,
                       profile: Callable[[float, int], tuple[list[float], str]] | None = None) -> list[PlanItem]:
    """The rows that hang ``reg``'s module (its ``make_module``) after every residual branch.

    The rate of the deepest block comes from ``reg.rate_for("residual", ctx)`` (explicit, the
    Transformer range where the model has attention, or the rate table); ``profile(top, n_blocks)``
    gives each block's rate and a note for the plan (default: ``top`` everywhere). A branch that
    already ends in stochastic depth is reused (``existing: override``/``keep``); a branch no module
    can carry gets a note; a model that cannot be traced, or has no residual add, gets no row and a
    warning saying why.
    """
    mm = model_map(model, ctx)
    sites, blocks, error = residual_branches(model, ctx)
    if error:
        warnings.warn(f"{reg.name}: {error}", stacklevel=3)
        return []
    if not sites:
        hidden = [type(m).__name__ for m in model.modules()
                  if isinstance(m, (nn.TransformerEncoderLayer, nn.TransformerDecoderLayer))]
        hint = (f"; the residual adds of {hidden[0]} happen inside that torch module, which no module "
                f"can reach (set its dropout instead, e.g. with attention_dropout)") if hidden else ""
        warnings.warn(f"{reg.name}: found no residual add in {type(model).__name__}; nothing was inserted{hint}",
                      stacklevel=3)
        return []
    top, why = reg.rate_for(K.RESIDUAL, ctx)
    if not top:
        return []
    rates, note = profile(top, len(blocks)) if profile is not None else ([top] * len(blocks), "")
    if note:
        why += f"; {note}"
    rows: list[PlanItem] = []
    capture = getattr(mm.residuals, "capture", None)
    if capture and capture != "graph: torch.fx":  # say how the residual adds were found where torch.fx could not
        rows.append(PlanItem(reg.name, "", K.RESIDUAL, reg.variant_for(K.RESIDUAL), None, capture, action="note"))
    for site in sites:
        where = f"residual add {site.node!r}"
        if site.anchor is not None and site.anchor in mm.qkv and not is_path_drop(mm.module(site.anchor)):
            rows.append(PlanItem(reg.name, site.block, K.RESIDUAL, reg.variant_for(K.RESIDUAL), None,
                                 f"not inserted at {where}: the branch's output reaches attention's query, key or "
                                 f"value with no weight layer between (q/k/v get no dropout)", action="note"))
            continue
        if site.anchor is None or site.anchor in mm.gates:  # (attention's scores weight a path too: q/k/v first)
            problem = site.problem or f"the branch ends in {site.anchor!r}, on a gate (docs/placement.md)"
            rows.append(PlanItem(reg.name, site.block, K.RESIDUAL, reg.variant_for(K.RESIDUAL), None,
                                 f"not inserted at {where}: {problem}", action="note"))
            continue
        index = blocks.index(site.block)
        rate = rates[index]
        reason = f"{why}{',' if note else ';'} block {index + 1} of {len(blocks)}; {where}"
        existing = _branch_path_drop(mm, site.anchor)
        if rate == 0 and existing is None:
            rows.append(PlanItem(reg.name, site.block, K.RESIDUAL, reg.variant_for(K.RESIDUAL), 0.0,
                                 reason + "; rate 0, nothing inserted", action="note"))
            continue
        if existing is None and mm.reaches_output(site.anchor):
            rows.append(PlanItem(reg.name, site.block, K.RESIDUAL, reg.variant_for(K.RESIDUAL), None,
                                 f"not inserted at {where}: the branch's {site.anchor} reaches a model output with "
                                 f"no weight layer between (an output: nothing goes after it)", action="note"))
            continue
        reused = reuse_existing(reg, mm, K.RESIDUAL, site.anchor, "after", rate, reason, existing, site.block)
        if reused is not None:
            rows.extend(reused)
            continue
        rows.append(PlanItem(reg.name, site.block, K.RESIDUAL, reg.variant_for(K.RESIDUAL), rate, reason,
                             action="after", anchor=site.anchor))
    return rows


def _branch_path_drop(mm: ModelMap, anchor: str) -> str | None:
    """The stochastic depth that ends the branch at ``anchor``: the anchor itself, or the path-drop unit that
    consumes its output and nothing else, as its only consumer. An eval-mode capture (``torch.export``) sees no
    call of the latter, which returns its input unchanged; the recorded dataflow does."""
    if is_path_drop(mm.module(anchor)):
        return anchor
    after = mm.flow.next(anchor)
    if after is not None and mm.flow.prev(after) == anchor and is_path_drop(mm.module(after)):
        return after
    return None
