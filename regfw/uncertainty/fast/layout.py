"""Where the batch is in each value of the graph (its *layout*), and the row operations the replay
needs on such values: gather a chunk's rows, allocate and fill a whole-batch buffer, repeat a row.

A layout is found from the same value at two probe batch sizes (:func:`_layout`): the batch
dimension is the one that grows with the rows, and rows must not mix.
"""
from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from regfw.tensors import iter_tensors


@dataclass(frozen=True)
class _Batch:
    """A tensor whose dimension ``d`` holds ``k`` entries per batch row, batch outermost."""

    d: int
    k: int


@dataclass(frozen=True)
class _Seq:
    type: type
    items: tuple


_UNCLEAN = "unclean"  # a tensor whose batch rows cannot be told apart or are mixed




def _has_tensor(v: Any) -> bool:
    return next(iter_tensors(v), None) is not None


def _nbytes(v: Any) -> int:
    return sum(t.numel() * t.element_size() for t in iter_tensors(v))


def _same(a: Tensor, b: Tensor) -> bool:
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    if not a.is_floating_point() and not a.is_complex():
        return bool(torch.equal(a, b))
    tol = 1e-4 if a.dtype in (torch.float32, torch.float64, torch.complex64, torch.complex128) else 1e-2
    scale = float(b.abs().max()) if b.numel() else 0.0
    return bool(torch.allclose(a, b, rtol=tol, atol=tol * max(1.0, scale) * 0.1, equal_nan=True))


def _layout(v1: Any, v2: Any, n1: int, n2: int) -> Any:
    """Where the batch is in a value, from the same value at ``n1`` and ``n2`` (> n1) rows.

    ``_Batch(d, k)``: dimension ``d`` has ``k * rows`` entries and its first ``k * n1`` entries at
    ``n2`` rows equal the value at ``n1`` rows (the batch is outermost in that dimension and rows
    do not mix); ``None``: a value of fixed shape; ``_UNCLEAN``: anything else.
    """
    if isinstance(v1, Tensor) or isinstance(v2, Tensor):
        if not (isinstance(v1, Tensor) and isinstance(v2, Tensor)) or v1.dim() != v2.dim():
            return _UNCLEAN
        diff = [i for i, (a, b) in enumerate(zip(v1.shape, v2.shape, strict=False)) if a != b]
        if not diff:
            return None
        if len(diff) != 1:
            return _UNCLEAN
        d = diff[0]
        a, b = v1.shape[d], v2.shape[d]
        if a % n1 or b % n2 or a // n1 != b // n2:
            return _UNCLEAN
        if not _same(v1, v2.narrow(d, 0, a)):
            return _UNCLEAN
        return _Batch(d, a // n1)
    if type(v1) in (tuple, list) and type(v2) is type(v1) and len(v1) == len(v2):
        return _Seq(type(v1), tuple(_layout(a, b, n1, n2) for a, b in zip(v1, v2, strict=False)))
    if _has_tensor(v1) or _has_tensor(v2):
        return _UNCLEAN
    return None


def _layout_leaves(layout: Any) -> Iterator[Any]:
    if isinstance(layout, _Seq):
        for item in layout.items:
            yield from _layout_leaves(item)
    else:
        yield layout


def _clean(layout: Any) -> bool:
    return all(x is not _UNCLEAN for x in _layout_leaves(layout))


def _batched(layout: Any) -> bool:
    """Every tensor in the value carries the batch (clean, no fixed-shape tensor)."""
    return all(isinstance(x, _Batch) for x in _layout_leaves(layout))


def _gather(v: Any, layout: Any, rows: Tensor | None, clone: bool) -> Any:
    """The chunk's rows of a boundary value (``rows``: batch index of each chunk row)."""
    if isinstance(layout, _Batch) and rows is not None:
        idx = rows
        if layout.k != 1:
            idx = (rows[:, None] * layout.k + torch.arange(layout.k, device=rows.device)).reshape(-1)
        return v.index_select(layout.d, idx.to(v.device))
    if isinstance(layout, _Seq):
        return layout.type(_gather(x, item, rows, clone) for x, item in zip(v, layout.items, strict=False))
    if clone:
        return _clone(v)
    return v


def _clone(v: Any) -> Any:
    if isinstance(v, Tensor):
        return v.clone()
    if type(v) in (tuple, list):
        return type(v)(_clone(x) for x in v)
    return v


def _alloc(v: Any, layout: Any, rows: int, total: int) -> Any:
    """A buffer for the whole batch (``total`` rows) shaped like chunk value ``v`` of ``rows`` rows."""
    if isinstance(layout, _Batch):
        shape = list(v.shape)
        shape[layout.d] = layout.k * total
        return v.new_empty(shape)
    if isinstance(layout, _Seq):
        return layout.type(_alloc(x, item, rows, total) for x, item in zip(v, layout.items, strict=False))
    return v


def _write(buf: Any, v: Any, layout: Any, start: int) -> None:
    if isinstance(layout, _Batch):
        n = v.shape[layout.d]
        buf.narrow(layout.d, start * layout.k, n).copy_(v)
    elif isinstance(layout, _Seq):
        for b, x, item in zip(buf, v, layout.items, strict=False):
            _write(b, x, item, start)


def _repeat_row(v: Any, layout: Any, row: int, copies: int) -> Any:
    """``copies`` identical rows: row ``row`` of ``v`` repeated along its batch dimension."""
    if isinstance(layout, _Batch):
        piece = v.narrow(layout.d, row * layout.k, layout.k)
        reps = [1] * v.dim()
        reps[layout.d] = copies
        return piece.repeat(*reps)
    if isinstance(layout, _Seq):
        return layout.type(_repeat_row(x, item, row, copies) for x, item in zip(v, layout.items, strict=False))
    return v


def _rows_differ(v: Any, layout: Any, copies: int) -> bool:
    for t, item in zip(iter_tensors(v), _layout_leaves(layout), strict=False):
        if not isinstance(item, _Batch):
            continue
        pieces = t.reshape(*t.shape[: item.d], copies, item.k, *t.shape[item.d + 1:])
        first = pieces.narrow(item.d, 0, 1)
        if not bool((pieces == first).all()):
            return True
    return False
