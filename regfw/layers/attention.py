"""Attention dropout: set the dropout rates of torch's attention and Transformer layers in place.

Vaswani et al., "Attention Is All You Need", NeurIPS 2017, use ``P_drop = 0.1`` on the output of every
sub-layer before the residual add ("residual dropout"); their tensor2tensor code and later models also
drop the attention weights at the same rate. ``nn.TransformerEncoderLayer(dropout=p)`` follows that:
its one ``dropout`` argument sets the attention-weight dropout of its ``nn.MultiheadAttention`` blocks
and every ``nn.Dropout`` it owns (after the feed-forward activation and on each residual branch).
:func:`set_attention_dropout` changes an already built model the same way, so a regularization config
can set "attention: 0.1" without rebuilding the model; ``attention_only=True`` restricts it to the
attention weights.
"""
from __future__ import annotations

from torch import nn

from .base import check_rate

__all__ = ["set_attention_dropout", "DEFAULT_ATTENTION_DROPOUT"]

#: The Transformer convention (Vaswani et al. 2017).
DEFAULT_ATTENTION_DROPOUT = 0.1

_TRANSFORMER_LAYERS = (nn.TransformerEncoderLayer, nn.TransformerDecoderLayer)


def set_attention_dropout(module: nn.Module, p: float = DEFAULT_ATTENTION_DROPOUT, attention_only: bool = False) -> int:
    """Set dropout rates inside ``module`` (itself included) to ``p``; return how many places were set.

    * every ``nn.MultiheadAttention`` (matched by type, subclasses included): its ``dropout`` float, the
      rate applied to the attention weights; counts 1 each;
    * unless ``attention_only``: every ``nn.Dropout`` that is a direct child of an
      ``nn.TransformerEncoderLayer`` / ``nn.TransformerDecoderLayer`` (``dropout``, ``dropout1``,
      ``dropout2`` and the decoder's ``dropout3``), as the layers' own ``dropout`` argument would;
      counts 1 each.

    An encoder layer thus counts 4 places (1 attention + 3 dropouts), a decoder layer 6. Other dropout
    modules (e.g. on embeddings) are left alone. Places are counted when set, even if they already had
    the rate. Returns 0 if the module contains no attention layer; the caller decides whether to warn.
    """
    p = check_rate(p)
    changed = 0
    for sub in module.modules():
        if isinstance(sub, nn.MultiheadAttention):
            sub.dropout = p
            changed += 1
        elif isinstance(sub, _TRANSFORMER_LAYERS) and not attention_only:
            for child in sub.children():
                if isinstance(child, nn.Dropout):
                    child.p = p
                    changed += 1
    return changed
