"""The ``attention_dropout`` regularizer: the dropout rates of attention and Transformer layers.

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

from torch import nn

import regfw
from regfw.config.schema import rate
from regfw.extend.regularizer import InjectingRegularizer, InjectionConfig, PlanContext, PlanItem
from regfw.layers import set_attention_dropout
from regfw.placement.api import set_rate
from regfw.placement.kinds import ATTENTION, HIDDEN

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
    description = "sets the attention dropout of nn.MultiheadAttention / nn.Transformer*Layer / timm Attention (0.1)"
    Config = AttentionDropoutConfig
    kinds = (ATTENTION,)

    def plan(self, model: nn.Module, ctx: PlanContext) -> list[PlanItem]:
        from regfw.placement.api import model_map

        mm = model_map(model, ctx)
        rate, reason = self.rate_for(ATTENTION, ctx)
        if not rate:
            return []
        rows: list[PlanItem] = []
        for path in mm.attention:  # attention blocks written outside torch (timm's Attention): their attn_drop
            module = mm.module(path)
            slot = module._modules.get("attn_drop")
            if isinstance(module, (nn.MultiheadAttention, *_TRANSFORMER_LAYERS)) or not isinstance(slot, nn.Dropout):
                continue
            if slot.p > 0 and self.config.existing == "keep":
                continue
            rows.append(PlanItem(self.name, path, ATTENTION, self.name, rate,
                                 f"{reason}; attention weights (attn_drop, was {slot.p:g})", action="set",
                                 anchor=f"{path}.attn_drop"))
        for info in mm.layers:
            if info.kind != ATTENTION:
                continue
            was = current_rate(info.module)
            if was is None:
                rows.append(PlanItem(self.name, info.path, ATTENTION, self.name, None,
                                     f"not set: {type(info.module).__name__} contains no nn.MultiheadAttention",
                                     action="note"))
                continue
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
        if not rows:
            seen = sorted({type(m).__name__ for m in model.modules()
                           if "attention" in type(m).__name__.lower() or "attn" in type(m).__name__.lower()})
            what = (f"; attention-like modules seen: {', '.join(seen)} (none is an nn.MultiheadAttention, an "
                    f"nn.Transformer*Layer or a block with an attn_drop dropout)") if seen else ""
            warnings.warn(f"regularizer {self.name!r} found no attention layer in {type(model).__name__}; "
                          f"nothing was changed{what}", stacklevel=2)
        return rows

    def set_existing(self, model: nn.Module, item: PlanItem) -> None:
        """A set row: the attention dropout of the layer at ``item.anchor`` (or a timm block's attn_drop)."""
        assert item.anchor is not None and item.rate is not None  # plan() fills both on a set row
        target = model.get_submodule(item.anchor)
        if isinstance(target, nn.Dropout):  # a timm attention block's attn_drop
            set_rate(model, item.anchor, item.rate)
        else:
            set_attention_dropout(target, item.rate, item.options.get("attention_only", self.config.attention_only))


@regfw.hookimpl
def regfw_register_regularizers(register):
    register(AttentionDropout)
