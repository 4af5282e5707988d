"""The memory a forward pass holds at its peak, measured: what sizes the chunks of ``batched``.

Under ``no_grad`` a tensor is freed as soon as nothing refers to it, so a pass holds a few layers'
activations at a time, not the sum of every layer's output. :class:`LiveBytes` counts, while it is
active, every storage a torch operator creates, from that operator until the last tensor on the
storage is freed, and keeps the peak. A view or an in-place result shares the storage of its input
and is not counted again; a view of a tensor made before the block (a weight's transpose, the
input) is not counted at all.
"""
from __future__ import annotations

import weakref
from typing import Any

from torch import Tensor
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

__all__ = ["LiveBytes"]


def _storage(t: Tensor) -> tuple[int, int] | None:
    """``(address, bytes)`` of the storage under ``t``, or None (no storage: sparse, meta, empty)."""
    try:
        storage = t.untyped_storage()
        address = storage.data_ptr()
    except (RuntimeError, NotImplementedError):
        return None
    return (address, storage.nbytes()) if address else None


class LiveBytes(TorchDispatchMode):
    """Bytes of the storages created by torch operators while active that are still referenced
    (:attr:`live`), and the most of them at any moment (:attr:`peak`)."""

    def __init__(self) -> None:
        super().__init__()
        self.live = 0
        self.peak = 0
        self._held: dict[int, list[int]] = {}  # storage address -> [bytes, tensors on it alive]

    def _release(self, address: int) -> None:
        entry = self._held.get(address)
        if entry is None:
            return
        entry[1] -= 1
        if entry[1] == 0:
            self.live -= entry[0]
            del self._held[address]

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        out = func(*args, **(kwargs or {}))
        given = {s[0] for t in tree_flatten((args, kwargs))[0] if isinstance(t, Tensor) for s in (_storage(t),) if s}
        for t in tree_flatten(out)[0]:
            if not isinstance(t, Tensor):
                continue
            storage = _storage(t)
            if storage is None:
                continue
            address, nbytes = storage
            entry = self._held.get(address)
            if entry is None:
                if address in given:  # a view of (or a write into) a tensor made before the block
                    continue
                entry = self._held[address] = [nbytes, 0]
                self.live += nbytes
                self.peak = max(self.peak, self.live)
            entry[1] += 1
            weakref.finalize(t, self._release, address)
        return out
