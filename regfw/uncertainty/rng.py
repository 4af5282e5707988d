"""The random stream of Monte Carlo sampling: isolated from training's, seeded reproducibly."""
from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator
from typing import Any

import torch
from torch import nn

from regfw.tensors import iter_tensors

__all__ = ["derive_seed", "isolated_rng", "model_devices", "resolve_seed"]


def model_devices(model: nn.Module, inputs: Any) -> set[torch.device]:
    found: set[torch.device] = set()
    for t in (*model.parameters(), *model.buffers()):
        found.add(t.device)
    for t in iter_tensors(inputs):
        found.add(t.device)
    return found


@contextlib.contextmanager
def isolated_rng(seed: int, devices: Iterable[torch.device] = ()) -> Iterator[None]:
    """Run the block on a random stream seeded by ``seed``, leaving the global RNG untouched.

    The CPU generator and the default generator of every accelerator device in ``devices``
    are forked (:func:`torch.random.fork_rng`) and reseeded; on exit their states are restored
    exactly, so a training run is bit-identical with or without the block.
    """
    by_type: dict[str, set[int]] = {}
    for d in devices:
        d = torch.device(d)
        if d.type in ("cpu", "meta"):
            continue
        mod = torch.get_device_module(d.type)
        index = d.index if d.index is not None else mod.current_device()
        by_type.setdefault(d.type, set()).add(int(index))
    with contextlib.ExitStack() as stack:
        # the CPU generator is always forked; device_type only matters with devices listed
        stack.enter_context(torch.random.fork_rng(devices=[], device_type="cuda"))
        for dtype, idx in sorted(by_type.items()):
            stack.enter_context(torch.random.fork_rng(devices=sorted(idx), device_type=dtype))
        torch.default_generator.manual_seed(seed)
        for dtype, idx in by_type.items():
            mod = torch.get_device_module(dtype)
            gens = getattr(mod, "default_generators", None)
            for i in idx:
                if gens is not None and i < len(gens):
                    gens[i].manual_seed(seed)
                else:  # pragma: no cover - accelerators without per-device generators
                    mod.manual_seed(seed)
        yield


_MASK64 = (1 << 64) - 1


def derive_seed(*values: int) -> int:
    """A seed in ``[0, 2**62)`` mixed from integers (SplitMix64), e.g. ``(seed, epoch, batch)``.

    Deterministic across processes and Python versions (no ``hash()``), so a run resumed from
    a checkpoint draws the same masks for the same epoch and batch.
    """
    x = 0x2545F4914F6CDD1D
    for v in values:
        x = (x ^ (int(v) & _MASK64)) & _MASK64
        x = (x + 0x9E3779B97F4A7C15) & _MASK64
        x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
        x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
        x ^= x >> 31
    return x & ((1 << 62) - 1)


def resolve_seed(seed: int | None, generator: torch.Generator | None) -> int:
    if seed is not None:
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise ValueError(f"seed must be an int or None, got {seed!r}")
        return seed
    if generator is not None:
        return int(torch.randint(0, 2**62, (1,), generator=generator).item())
    # a fresh, non-deterministic seed from a private generator: the global RNG is not used
    return int(torch.Generator().seed() % 2**62)
