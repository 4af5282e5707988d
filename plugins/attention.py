"""The ``attention_dropout`` regularizer: the dropout rates of attention and Transformer layers.

Attention is found by what a forward computes (:mod:`regfw.placement.attention`), so every block
counts whatever its class: torch's layers, timm's ``Attention`` (its ``attn_drop`` module) and Hugging
Face attention, which passes ``dropout=0.0 if not self.training else rate`` to its attention function
and keeps the rate in a float attribute, an unused ``nn.Dropout``'s ``p`` or its config
(:func:`regfw.placement.foreign.rate_sources`): those attributes are set.

Vaswani et al., "Attention Is All You Need", NeurIPS 2017: ``P_drop = 0.1`` on the attention
weights and on every sub-layer output before its residual add. torch builds those dropouts into
``nn.MultiheadAttention`` (its ``dropout`` float) and ``nn.TransformerEncoderLayer`` /
``nn.TransformerDecoderLayer`` (their ``dropout*`` children), so nothing is inserted: the rates
are set in place (:func:`regfw.layers.set_attention_dropout`) and the model keeps its structure.
Kind ``attention`` (table: 0.1), family ``dropout``.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any

from torch import nn

from regfw.extend import (
    ATTENTION,
    HIDDEN,
    InjectingRegularizer,
    InjectionConfig,
    PlanContext,
    PlanItem,
    hookimpl,
    model_map,
    rate,
    rate_slot,
    set_rate,
    unrecognised_attention,
)
from regfw.layers import set_attention_dropout

_TRANSFORMER_LAYERS = (nn.TransformerEncoderLayer, nn.TransformerDecoderLayer)


@dataclass
class AttentionDropoutConfig(InjectionConfig):
    """The attention rate; null takes the table (0.1), 0 switches it off (leaves the model alone)."""

    attention: float | None = rate(doc="dropout of attention weights and sub-layer outputs (table: 0.1)")
    #: Only the attention weights, not the Transformer layers' other dropouts.
    attention_only: bool = False


def current_rate(module: nn.Module) -> float | None:
    """The attention-weight dropout of ``module`` (its first ``nn.MultiheadAttention``), or None."""
    for sub in module.modules():
        if isinstance(sub, nn.MultiheadAttention):
            return float(sub.dropout)
    return None


class AttentionDropout(InjectingRegularizer):
    """Set the dropout of every attention layer (``nn.MultiheadAttention``, Transformer layers)."""

    name = "attention_dropout"
    family = "dropout"
    description = "sets the attention-probability dropout of every attention block (0.1)"
    Config = AttentionDropoutConfig
    kinds = (ATTENTION,)

    def plan(self, model: nn.Module, ctx: PlanContext) -> list[PlanItem]:
        mm = model_map(model, ctx)
        rate, reason = self.rate_for(ATTENTION, ctx)
        if not rate:
            return []
        rows: list[PlanItem] = []
        done: list[str] = []  # torch's attention layers, set as wholes
        for info in mm.layers:
            if info.kind != ATTENTION:
                continue
            was = current_rate(info.module)
            if was is None:
                rows.append(PlanItem(self.name, info.path, ATTENTION, self.name, None,
                                     f"not set: {type(info.module).__name__} contains no nn.MultiheadAttention",
                                     action="note"))
                continue
            done.append(info.path)
            if was > 0 and self.config.existing == "keep":
                continue
            hidden = getattr(ctx, "claimed", {}).get(HIDDEN)  # e.g. `dropout`: it sets the sub-layer dropouts
            weights_only = (self.config.attention_only or not isinstance(info.module, _TRANSFORMER_LAYERS)
                            or (hidden is not None and hidden != self.name))
            what = "attention weights" if weights_only else "attention weights and sub-layer outputs"
            if weights_only and hidden is not None and hidden != self.name and isinstance(info.module,
                                                                                          _TRANSFORMER_LAYERS):
                what += f"; its sub-layer dropouts left to {hidden} (kind hidden)"
            rows.append(PlanItem(self.name, info.path, ATTENTION, self.name, rate,
                                 f"{reason}; {what} (was {was:g})", action="set", anchor=info.path,
                                 options={"attention_only": weights_only}))
        for site in mm.attention_sites:  # every other attention, found by what it computes
            if any(site.host == d or site.host.startswith(d + ".") for d in done):
                continue
            done.append(site.host)
            rows.extend(self._site_row(model, mm, site, rate, reason))
        if not rows:
            seen = unrecognised_attention(model, mm.attention_sites)
            what = (f"; attention-like modules seen: {', '.join(seen)} (none computes softmax(q·kᵀ)·v or "
                    f"scaled_dot_product_attention in the traced forward)") if seen else ""
            warnings.warn(f"regularizer {self.name!r} found no attention layer in {type(model).__name__}; "
                          f"nothing was changed{what}", stacklevel=2)
        return rows

    def _site_row(self, model: nn.Module, mm: Any, site: Any, rate: float, reason: str) -> list[PlanItem]:
        """The row of one attention site: its probability dropout module, or the attributes its host
        reads its dropout rate from (Hugging Face attention), or a note that the rate is fixed."""
        slot = rate_slot(model, site)
        if slot is None:
            return [PlanItem(self.name, site.host, ATTENTION, self.name, None,
                             f"not set: {type(mm.module(site.host)).__name__} ({site.how}) has no attention dropout "
                             f"regfw can set (no dropout on its probabilities, or a rate fixed in its forward)",
                             action="note")]
        anchor, was, where = slot.anchor, slot.rate, slot.where
        if was > 0 and self.config.existing == "keep":
            return []
        return [PlanItem(self.name, site.host, ATTENTION, self.name, rate,
                         f"{reason}; attention probabilities ({where}, was {was:g})", action="set", anchor=anchor)]

    def set_existing(self, model: nn.Module, item: PlanItem) -> None:
        """A set row: the attention dropout of the layer at ``item.anchor`` (or a timm block's attn_drop)."""
        assert item.anchor is not None and item.rate is not None  # plan() fills both on a set row
        target = model.get_submodule(item.anchor) if item.anchor else model
        if not isinstance(target, (nn.MultiheadAttention, *_TRANSFORMER_LAYERS)):
            set_rate(model, item.anchor, item.rate)  # a probability dropout module, or a host's rate attributes
        else:
            set_attention_dropout(target, item.rate, item.options.get("attention_only", self.config.attention_only))


@hookimpl
def regfw_register_regularizers(register):
    register(AttentionDropout)
