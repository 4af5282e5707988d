"""Embedding dropout: drop whole words, not single coordinates of their vectors.

Gal and Ghahramani, "A Theoretically Grounded Application of Dropout in Recurrent Neural
Networks", NeurIPS 2016, section 4: dropping rows of the embedding matrix drops *word types*, so
every occurrence of a dropped word in a sequence becomes the zero vector (and the kept ones are
scaled by ``1 / (1 - p)``). AWD-LSTM (Merity et al., ICLR 2018, ``embedded_dropout``) draws one
row mask per batch; here each sequence gets its own mask, as every other regfw layer draws one
mask per example, so the rows of a batch are independent and Monte Carlo dropout can repeat a
batch to draw samples. Only the words a batch uses are drawn (``torch.unique`` over (sequence,
word) pairs), so the cost does not grow with the vocabulary; a graph compiled by ``torch.compile``
groups the words by sorting instead (static shapes) and draws one entry per position.

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
    if torch.compiler.is_compiling():  # torch.unique's size depends on the data: a graph break
        where, count = _distinct_ranks(key), key.numel()
    else:
        words, where = torch.unique(key, return_inverse=True)
        count = words.numel()
    keep = keep_scale_mask(vectors, (count,), p)  # one draw per word (CPU: sliced random words)
    return vectors * keep[where].unsqueeze(-1)


def _distinct_ranks(key: Tensor) -> Tensor:
    """For each entry of ``key``, the rank of its value among the distinct values of ``key``
    (``torch.unique(key, return_inverse=True)[1]``) with static shapes: sort, mark where the value
    changes, count the marks and put the ranks back in place. The caller draws one mask entry per
    position and reads entry ``rank``, so each distinct word still gets one independent draw."""
    flat = key.reshape(-1)
    ordered, order = flat.sort()
    changes = torch.ones_like(ordered)
    changes[1:] = ordered[1:] != ordered[:-1]
    ranks = changes.cumsum(0) - 1
    return torch.empty_like(ranks).scatter_(0, order, ranks).view(key.shape)


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
