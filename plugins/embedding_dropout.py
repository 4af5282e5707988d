"""The ``embedding_dropout`` regularizer: drop whole words at every ``nn.Embedding``.

Gal and Ghahramani, "A Theoretically Grounded Application of Dropout in Recurrent Neural
Networks", NeurIPS 2016; AWD-LSTM's ``embedded_dropout`` (Merity et al., ICLR 2018). Each
sequence drops a share ``p`` of the word types it contains: every occurrence of a dropped word
becomes the zero vector, the kept ones are scaled by ``1 / (1 - p)``
(:func:`regfw.layers.apply_embedding_dropout`). The embedding keeps its parameters and names.

Kind ``embedding`` (its own row of the rate table: 0.05-0.2, default 0.1, AWD-LSTM's value),
family ``dropout``. It combines with ``locked_dropout`` on the recurrent outputs and
``dropconnect`` on the recurrent weights, as in AWD-LSTM::

    regularizers: {embedding_dropout: {}, locked_dropout: {}, dropconnect: {}}

Which dimension of the indices is the batch is read from the recurrent layer the embedding feeds
(``batch_first``), or set with ``batch_first``.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass

from torch import nn

from regfw.extend import (
    EMBEDDING,
    InjectingRegularizer,
    InjectionConfig,
    PlanContext,
    PlanItem,
    hookimpl,
    model_map,
    rate,
)
from regfw.layers import EMBEDDING_DROPOUT_ATTR, EmbeddingDropout, apply_embedding_dropout


@dataclass
class EmbeddingDropoutConfig(InjectionConfig):
    """The share of words dropped; null takes the rate policy (or the table default), 0 switches it off."""

    embedding: float | None = rate(doc="share of word types dropped per sequence (table: 0.05-0.2)")
    #: Whether the index tensors are (batch, time); null reads it from the recurrent layer the
    #: embedding feeds (true when it feeds none).
    batch_first: bool | None = None


class EmbeddingDropoutRegularizer(InjectingRegularizer):
    """Embedding dropout on every ``nn.Embedding``: whole rows (words) per sequence."""

    name = "embedding_dropout"
    family = "dropout"
    description = "embedding dropout on nn.Embedding: whole words dropped per sequence (AWD-LSTM)"
    Config = EmbeddingDropoutConfig
    kinds = (EMBEDDING,)

    def plan(self, model: nn.Module, ctx: PlanContext) -> list[PlanItem]:
        mm = model_map(model, ctx)
        rows: list[PlanItem] = []
        found = [info for info in mm.layers if info.kind == EMBEDDING]
        rate, reason = self.rate_for(EMBEDDING, ctx)
        for info in found if rate else []:
            batch_first = self.config.batch_first
            consumer = mm.flow.next(info.path)
            feeds = mm.module(consumer) if consumer is not None else None
            if batch_first is None:
                batch_first = bool(feeds.batch_first) if isinstance(feeds, nn.RNNBase) else True
            current = info.module._modules.get(EMBEDDING_DROPOUT_ATTR)
            if isinstance(current, EmbeddingDropout) and self.config.existing == "keep":
                continue
            note = "; embedding dropout present, rate set" if isinstance(current, EmbeddingDropout) else ""
            rows.append(PlanItem(self.name, info.path, EMBEDDING, self.name, rate,
                                 f"{reason}; whole words, batch dim {0 if batch_first else 1}{note}",
                                 action="wrap", anchor=info.path, options={"batch_dim": 0 if batch_first else 1}))
        if not found:
            warnings.warn(f"regularizer {self.name!r} found no nn.Embedding in {type(model).__name__}; nothing was "
                          f"changed", stacklevel=2)
        return rows

    def wrap(self, model: nn.Module, item: PlanItem) -> None:
        """A wrap row: embedding dropout on the ``nn.Embedding`` at ``item.anchor``."""
        assert item.anchor is not None and item.rate is not None  # plan() fills both on a wrap row
        embedding = model.get_submodule(item.anchor)
        assert isinstance(embedding, nn.Embedding)
        apply_embedding_dropout(embedding, item.rate, item.options.get("batch_dim", 0))


@hookimpl
def regfw_register_regularizers(register):
    register(EmbeddingDropoutRegularizer)
