"""Embedding dropout: drop whole words, not single coordinates of their vectors.

Gal and Ghahramani, "A Theoretically Grounded Application of Dropout in Recurrent Neural
Networks", NeurIPS 2016, section 4: dropping rows of the embedding matrix drops *word types*, so
every occurrence of a dropped word in a sequence becomes the zero vector (and the kept ones are
scaled by ``1 / (1 - p)``). AWD-LSTM (Merity et al., ICLR 2018, ``embedded_dropout``) draws one
row mask per batch; here each sequence gets its own mask, as every other regfw layer draws one
mask per example, so the rows of a batch are independent and Monte Carlo dropout can repeat a
batch to draw samples. Only the words a batch uses are drawn (``torch.unique`` over (sequence,
word) pairs), so the cost does not grow with the vocabulary. In a graph compiled by ``torch.compile``
that draw (whose size depends on the data) is one operator, ``regfw::word_keep``, running the same code.

:func:`apply_embedding_dropout` hangs an :class:`EmbeddingDropout` on an ``nn.Embedding`` as the
child ``regfw_embedding_dropout`` with a forward hook that sees the indices and the looked-up
vectors; the embedding keeps its class, parameters and state-dict keys.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from .base import Rate, StochasticModule, attach_child, check_rate, zeros_like_graph
from .masks import keep_scale_mask

__all__ = ["EmbeddingDropout", "embedding_dropout", "apply_embedding_dropout", "EMBEDDING_DROPOUT_ATTR"]

#: The child name of the :class:`EmbeddingDropout` on an ``nn.Embedding``.
EMBEDDING_DROPOUT_ATTR = "regfw_embedding_dropout"


def embedding_dropout(vectors: Tensor, indices: Tensor, p: float, num_embeddings: int, training: bool = True,
                      batch_dim: int = 0) -> Tensor:
    """Zero every occurrence of a dropped word within each sequence of ``indices``.

    ``vectors`` is the embedding lookup of ``indices`` (shape ``indices.shape + (D,)``); sequences
    run along every dimension but ``batch_dim`` (an index tensor of rank 0 or 1 is one sequence).
    """
    p = check_rate(p)
    if not training or p == 0.0:
        return vectors
    if p == 1.0:
        return zeros_like_graph(vectors)
    if indices.dim() >= 2:
        shape = [1] * indices.dim()
        shape[batch_dim] = indices.shape[batch_dim]
        seq = torch.arange(indices.shape[batch_dim], device=indices.device).view(shape).expand_as(indices)
        key = seq * num_embeddings + indices
    else:
        key = indices
    if torch.compiler.is_compiling():  # torch.unique's size depends on the data: one opaque operator
        keep = _word_keep_op(key, p, vectors.dtype)
    else:
        keep = _word_keep(key, p, vectors.dtype)
    return vectors * keep.unsqueeze(-1)


def _word_keep(key: Tensor, p: float, dtype: torch.dtype) -> Tensor:
    """Per entry of ``key``, the inverted-dropout factor of its word: one draw per distinct value."""
    words, where = torch.unique(key, return_inverse=True)
    keep = keep_scale_mask(torch.empty((), dtype=dtype, device=key.device), words.shape, p)  # one draw per word
    return keep[where]


@torch.library.custom_op("regfw::word_keep", mutates_args=(), tags=(torch.Tag.nondeterministic_seeded,))
def _word_keep_op(key: Tensor, p: float, dtype: torch.dtype) -> Tensor:
    """:func:`_word_keep` as one operator of a compiled graph, whose output has the static shape of
    ``key``: the graph draws eager mode's masks. Tagged as a seeded random op (never folded, merged
    or recomputed for the backward pass)."""
    return _word_keep(key, p, dtype)


@_word_keep_op.register_fake
def _(key: Tensor, p: float, dtype: torch.dtype) -> Tensor:
    return torch.empty(key.shape, dtype=dtype, device=key.device)


class EmbeddingDropout(StochasticModule):
    """The embedding-dropout state of one ``nn.Embedding``: rate ``p`` and the batch dimension.

    Called by the embedding's forward hook as ``module(vectors, indices, num_embeddings)``.
    """

    p = Rate()

    def __init__(self, p: float = 0.1, batch_dim: int = 0) -> None:
        super().__init__()
        self.p = p
        self.batch_dim = int(batch_dim)

    def forward(self, vectors: Tensor, indices: Tensor, num_embeddings: int) -> Tensor:
        return embedding_dropout(vectors, indices, self.p, num_embeddings, self.training, self.batch_dim)

    def extra_repr(self) -> str:
        return f"p={self.p}, batch_dim={self.batch_dim}"


class _EmbeddingDropoutHook:
    """Forward hook of an ``nn.Embedding``: drop words of its output (picklable, looks the child up)."""

    def __call__(self, module: nn.Module, args: tuple, output: Any) -> Any:
        child = module._modules.get(EMBEDDING_DROPOUT_ATTR)
        if not isinstance(child, EmbeddingDropout) or not args:
            return output
        return child(output, args[0], int(getattr(module, "num_embeddings")))  # noqa: B009


def apply_embedding_dropout(embedding: nn.Embedding, p: float = 0.1, batch_dim: int = 0) -> nn.Embedding:
    """Add embedding dropout to ``embedding`` in place and return it.

    Applying it again updates the rate and batch dimension without adding a second hook. The
    state dict, parameters and their names are unchanged.
    """
    if not isinstance(embedding, nn.Embedding):
        raise TypeError(f"apply_embedding_dropout expects an nn.Embedding, got {type(embedding).__name__}")
    child = attach_child(embedding, EMBEDDING_DROPOUT_ATTR, EmbeddingDropout(p, batch_dim),
                         hook=_EmbeddingDropoutHook())
    if isinstance(child, EmbeddingDropout):  # already there: update it
        child.p = p
        child.batch_dim = int(batch_dim)
    return embedding
