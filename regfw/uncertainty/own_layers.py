"""Which of a model's own stochastic layers Monte Carlo dropout samples, and saying so.

A model often brings stochastic layers of its own: torchvision's ``StochasticDepth``, timm's
``DropPath``, the dropout inside attention, a classifier's ``nn.Dropout``. MC dropout switches on
every stochastic layer it finds, so "dropout on the head" of an EfficientNet would also sample its
16 stochastic-depth layers. The setting ``sample_model_stochastic`` (``uncertainty:`` in a config,
the argument of :func:`regfw.uncertainty.mc_predict` and of the MC callback) decides:

* ``all``: every own stochastic layer is sampled (MC dropout as on a plain model);
* ``none``: none; only the layers regfw inserted;
* ``auto`` (the default): the own layers of a kind the user selected a regularizer for -- element
  dropout (``dropout``), stochastic depth (``drop_path``), attention dropout (``attention_dropout``)
  -- are sampled, the others stay in eval mode. Which kinds were selected comes from the plan (the
  kinds of its rows) where one is known; :func:`mc_predict` on a bare model reads it off the layers
  regfw inserted, and samples everything when regfw inserted none.

The kind of an own layer is what it drops, never its name: a per-sample path drop (stochastic
depth) is ``drop_path``; a stochastic layer inside an attention block, or a module random only
through its own flag that runs fused attention, is ``attention_dropout``; everything else is
``dropout``. :func:`listing` gives the lines ``regfw plan`` and the MC callback print.
"""
from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from torch import nn

from regfw.layers.drop_path import DropPath
from regfw.placement import foreign
from regfw.placement.structure import attention_modules
from regfw.uncertainty.modes import dropout_family, stochastic_modules

SETTINGS: tuple[str, ...] = ("auto", "all", "none")
#: The kinds of own stochastic layers, named after the regularizer that places that kind.
DROPOUT, DROP_PATH, ATTENTION = "dropout", "drop_path", "attention_dropout"
KINDS: tuple[str, ...] = (DROPOUT, DROP_PATH, ATTENTION)
#: Plan row kinds (:mod:`regfw.placement.kinds`) -> the own-layer kind a row of it selects.
_ROW_KINDS = {"residual": DROP_PATH, "attention": ATTENTION}
INJECTED_PREFIX = "regfw_"


@dataclass(frozen=True)
class OwnLayer:
    """One stochastic layer the model brought itself."""

    path: str
    what: str  #: how a plan names it, e.g. ``StochasticDepth (torchvision)``
    kind: str  #: one of :data:`KINDS`
    rate: float | None
    sampled: bool


def _injected(path: str) -> bool:
    return any(part.startswith(INJECTED_PREFIX) for part in path.split("."))


def _path_drop(module: nn.Module) -> bool:
    layer = foreign.foreign_layer(module)
    if layer is not None:
        return layer.what == "path"

    return isinstance(module, DropPath)


def _kind(path: str, module: nn.Module, attention: list[str]) -> str:
    if _path_drop(module):
        return DROP_PATH
    if isinstance(module, nn.MultiheadAttention) or any(
            path == a or path.startswith(a + ".") for a in attention if a):
        return ATTENTION
    return DROPOUT


def _attention_blocks(model: nn.Module, known: Iterable[str] | None = None) -> list[str]:
    """The attention blocks: ``known`` where the caller has them from the graph (a plan's
    :attr:`~regfw.placement.surgery.ModelMap.attention`), else the structural fallback for a bare model
    (:func:`regfw.placement.structure.attention_modules`)."""
    return list(known) if known is not None else [p for p, _ in attention_modules(model)]


def own_stochastic(model: nn.Module, attention: Iterable[str] | None = None) -> list[tuple[str, nn.Module, str]]:
    """``(path, module, kind)`` of every stochastic layer with a rate > 0 that regfw did not insert,
    and of every module random only through its own flag (fused attention, functional dropout);
    ``attention``: the attention blocks found in the graph, when known."""
    attention = _attention_blocks(model, attention)
    found = {id(m): (p, m) for p, m in stochastic_modules(model) if not _injected(p)}
    for p, m in foreign.mc_train_modules(model):
        if not _injected(p):
            found.setdefault(id(m), (p, m))
    return [(p, m, _kind(p, m, attention)) for p, m in found.values()]


def inserted_kinds(model: nn.Module) -> set[str]:
    """The kinds of the layers regfw inserted into ``model`` (what the user selected, read off the model)."""
    attention = _attention_blocks(model)
    return {_kind(p, m, attention) for p, m in dropout_family(model) if _injected(p)}


def plan_kinds(rows: Iterable[object]) -> set[str]:
    """The own-layer kinds the rows of a plan select (their ``kind`` column: a residual row is stochastic
    depth, an attention row attention dropout, any other rate row element dropout)."""
    out = set()
    for row in rows:
        if getattr(row, "action", "") == "note" or getattr(row, "rate", None) is None:
            continue
        out.add(_ROW_KINDS.get(getattr(row, "kind", ""), DROPOUT))
    return out


def check_setting(value: object) -> str:
    if value not in SETTINGS:
        raise ValueError(f"sample_model_stochastic must be one of {list(SETTINGS)}, got {value!r}")
    return str(value)


def own_layers(model: nn.Module, setting: str = "auto", selected: Iterable[str] | None = None,
               attention: Iterable[str] | None = None) -> list[OwnLayer]:
    """The model's own stochastic layers, each marked sampled or not under ``setting``; ``selected``: the
    kinds the user selected (default: :func:`inserted_kinds`, everything when regfw inserted nothing);
    ``attention``: the attention blocks found in the graph, when known (a plan's model map)."""
    setting = check_setting(setting)
    kinds = set(KINDS)
    if setting == "none":
        kinds = set()
    elif setting == "auto":
        chosen = set(selected) if selected is not None else inserted_kinds(model)
        if selected is not None or chosen:
            kinds = chosen
    return [OwnLayer(p, foreign.describe(m), k, foreign.get_rate(m), k in kinds)
            for p, m, k in own_stochastic(model, attention)]


def excluded(model: nn.Module, setting: str = "auto", selected: Iterable[str] | None = None) -> list[nn.Module]:
    """The modules MC dropout leaves in eval mode under ``setting`` (see :func:`own_layers`)."""
    modules = dict(model.named_modules())
    return [modules[o.path] for o in own_layers(model, setting, selected) if not o.sampled]


def listing(layers: list[OwnLayer], setting: str) -> list[str]:
    """Lines saying which own stochastic layers MC dropout samples and which it leaves in eval mode."""
    if not layers:
        return []
    lines = []
    for sampled, word in ((True, "samples"), (False, "does not sample")):
        chosen = [o for o in layers if o.sampled is sampled]
        if not chosen:
            continue
        by_kind: dict[str, list[OwnLayer]] = {}
        for o in chosen:
            by_kind.setdefault(o.kind, []).append(o)
        parts = []
        for kind, group in sorted(by_kind.items()):
            paths = ", ".join(o.path or "<model>" for o in group[:4]) + (" ..." if len(group) > 4 else "")
            parts.append(f"{len(group)} {kind} ({paths})")
        lines.append(f"MC dropout {word} the model's own stochastic layers: {'; '.join(parts)}")
    lines.append(f"(uncertainty.sample_model_stochastic: {setting}; auto samples the kinds the regularizers "
                 "select, all / none every one / no one)")
    return lines
