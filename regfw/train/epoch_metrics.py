"""Epoch means of per-step values, accumulated on the device and synchronised once per epoch.

``self.log(..., on_epoch=True, sync_dist=True)`` in every step costs far more than the step of a
small model (Lightning builds and checks its metadata on each call). :class:`EpochMeans` keeps
one running sum and count per name instead (two tensor additions a step, no host sync) and,
at epoch end, reduces all sums and counts of all names across processes in one ``all_reduce``:
the logged value is the mean over every example every process saw, weighted by batch size,
exactly what the per-step logging computed.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import Tensor


class EpochMeans:
    """Weighted running means by name; :meth:`pop` returns them (global under DDP) and resets."""

    def __init__(self) -> None:
        self._sums: dict[str, Tensor] = {}
        self._counts: dict[str, int] = {}

    def add(self, name: str, value: Tensor, n: int) -> None:
        """Add the batch mean ``value`` of ``n`` examples to the running mean ``name``."""
        v = value.detach().reshape(()).to(torch.float64 if value.device.type == "cpu" else torch.float32) * n
        if name in self._sums:
            self._sums[name] += v
            self._counts[name] += n
        else:
            self._sums[name] = v
            self._counts[name] = n

    def __bool__(self) -> bool:
        return bool(self._sums)

    def state_dict(self) -> dict[str, Any]:
        """The running sums and counts, for a checkpoint written mid-epoch: Lightning's own
        epoch-metric state never sees them, and a resumed run must log the same epoch means."""
        return {"sums": {k: v.detach().clone() for k, v in self._sums.items()}, "counts": dict(self._counts)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue the sums of :meth:`state_dict` (the same additions in the same order as a run
        that was never stopped, so the means are bitwise the same)."""
        self._sums = {k: v.detach().clone() for k, v in (state.get("sums") or {}).items()}
        self._counts = {k: int(v) for k, v in (state.get("counts") or {}).items()}

    def pop(self, strategy: Any = None, prefix: str = "") -> dict[str, Tensor]:
        """The means of the names starting with ``prefix``, which are reset.

        With a Lightning ``strategy`` of several processes, the sums and counts of every name are
        reduced across processes in one ``all_reduce`` (every process must have added the same
        names, as every process runs the same steps)."""
        names = sorted(k for k in self._sums if k.startswith(prefix))
        if not names:
            return {}
        sums = torch.stack([self._sums[k] for k in names])
        counts = torch.tensor([float(self._counts[k]) for k in names], dtype=sums.dtype, device=sums.device)
        if strategy is not None and getattr(strategy, "world_size", 1) > 1:
            both = strategy.reduce(torch.cat([sums, counts]), reduce_op="sum")
            sums, counts = both[: len(names)], both[len(names):]
        for k in names:
            del self._sums[k], self._counts[k]
        means = (sums / counts.clamp_min(1)).float()
        return {k: means[i] for i, k in enumerate(names)}
