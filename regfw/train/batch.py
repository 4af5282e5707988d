"""The one batch convention: how a batch splits into the model's inputs and the loss's targets.

Every place that unpacks a batch (the training and validation steps, evaluation, MC dropout,
active learning) calls :func:`split_batch`, so a dataset that yields dicts or longer tuples is
configured once, with a :class:`BatchFormat`, instead of in five places.

* a tuple or list ``(inputs, targets, *rest)``: element ``inputs`` (default 0) and element
  ``targets`` (default 1); the rest (sample weights, indices) is ignored;
* a mapping ``{"inputs": ..., "targets": ...}``: the keys named by ``inputs`` and ``targets``
  (defaults ``"inputs"`` and ``"targets"``; e.g. ``BatchFormat(inputs="image", targets="label")``);
* a bare tensor: inputs without targets (``targets`` is None).

The helpers :func:`batch_size`, :func:`concat_batches` and :func:`index_batch` work on the
inputs' structure (a tensor, or tuples/lists/dicts of tensors along their first dimension),
for regularizers that mix or repeat examples (mixup, R-Drop).
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from regfw.errors import ConfigError


@dataclass(frozen=True)
class BatchFormat:
    """Where the inputs and the targets sit in a batch: an index (tuples, lists) or a key (dicts).

    ``targets=None``: the batch holds inputs only.
    """

    inputs: int | str = 0
    targets: int | str | None = 1

    @classmethod
    def coerce(cls, value: BatchFormat | Mapping[str, Any] | None, key: str = "batch") -> BatchFormat:
        """A :class:`BatchFormat` from itself, a mapping ``{"inputs": ..., "targets": ...}`` or None."""
        if value is None:
            return cls()
        if isinstance(value, BatchFormat):
            return value
        if not isinstance(value, Mapping):
            raise ConfigError(f"{key}: got {value!r}, expected a mapping such as {{inputs: image, targets: label}}.")
        unknown = sorted(set(value) - {"inputs", "targets"})
        if unknown:
            raise ConfigError(f"{key}.{unknown[0]}: unknown key; a batch format has `inputs` and `targets` "
                              f"(an index for tuple batches, a key for dict batches).")
        for name in ("inputs", "targets"):
            item = value.get(name)
            if item is not None and (isinstance(item, bool) or not isinstance(item, (int, str))):
                raise ConfigError(f"{key}.{name}: got {item!r}, expected an index (0, 1, ...) or a dict key.")
        if value.get("inputs", 0) is None:
            raise ConfigError(f"{key}.inputs: got None, expected an index or a dict key.")
        return cls(inputs=value.get("inputs", 0), targets=value.get("targets", 1))

    def as_dict(self) -> dict:
        return {"inputs": self.inputs, "targets": self.targets}


def _pick(batch: Any, where: int | str, role: str, fmt: BatchFormat) -> Any:
    if isinstance(batch, Mapping):
        key = where if isinstance(where, str) else ("inputs" if role == "inputs" else "targets")
        if key not in batch:
            raise ConfigError(
                f"batch: a dict batch without the {role} key {key!r} (its keys: {', '.join(map(repr, batch))}); "
                f"name the key with BatchFormat({role}=KEY), e.g. RegularizedModule(batch={{'{role}': "
                f"{next(iter(batch), 'KEY')!r}}})."
            )
        return batch[key]
    if isinstance(where, str):
        raise ConfigError(f"batch: {role}={where!r} is a dict key but the batch is a {type(batch).__name__}; "
                          f"use an index for tuple batches.")
    if where >= len(batch) or where < -len(batch):
        raise ConfigError(f"batch: {role} index {where} but the batch has {len(batch)} element(s); "
                          f"set BatchFormat({role}=...) to where the {role} are.")
    return batch[where]


def split_batch(batch: Any, fmt: BatchFormat | Mapping[str, Any] | None = None) -> tuple[Any, Any]:
    """``(inputs, targets)`` of ``batch`` by ``fmt`` (default: ``(x, y)`` tuples, ``inputs``/``targets`` dicts).

    A bare tensor is ``(batch, None)``. A problem is a :class:`~regfw.errors.ConfigError` saying
    what the batch looks like and how to describe it.
    """
    fmt = BatchFormat.coerce(fmt)
    if isinstance(batch, torch.Tensor):
        return batch, None
    if isinstance(batch, Mapping) or (isinstance(batch, Sequence) and not isinstance(batch, str)):
        if not isinstance(batch, Mapping) and len(batch) == 1 and fmt.targets == 1:
            return batch[0], None
        inputs = _pick(batch, fmt.inputs, "inputs", fmt)
        targets = None if fmt.targets is None else _pick(batch, fmt.targets, "targets", fmt)
        return inputs, targets
    raise ConfigError(f"batch: got a {type(batch).__name__}, expected a tensor, a tuple/list (inputs, targets) "
                      f"or a dict; describe other batches with a BatchFormat.")


def batch_size(inputs: Any) -> int:
    """The number of examples in ``inputs`` (the first dimension of its first tensor)."""
    if isinstance(inputs, torch.Tensor):
        return int(inputs.shape[0]) if inputs.dim() else 1
    if isinstance(inputs, Mapping):
        for value in inputs.values():
            return batch_size(value)
    if isinstance(inputs, (list, tuple)) and inputs:
        return batch_size(inputs[0])
    if isinstance(inputs, (list, tuple)):
        return 0
    raise TypeError(f"cannot tell the batch size of a {type(inputs).__name__}")


def concat_batches(first: Any, second: Any) -> Any:
    """``first`` and ``second`` (of one structure) joined along the batch dimension."""
    if isinstance(first, torch.Tensor):
        return torch.cat([first, second], dim=0)
    if isinstance(first, Mapping):
        return {k: concat_batches(v, second[k]) for k, v in first.items()}
    if isinstance(first, (list, tuple)):
        return type(first)(concat_batches(a, b) for a, b in zip(first, second, strict=True))
    raise TypeError(f"cannot concatenate batches of type {type(first).__name__}")


def index_batch(inputs: Any, index: torch.Tensor | slice) -> Any:
    """The examples ``index`` of ``inputs`` (a tensor index or slice along the batch dimension)."""
    if isinstance(inputs, torch.Tensor):
        return inputs[index]
    if isinstance(inputs, Mapping):
        return {k: index_batch(v, index) for k, v in inputs.items()}
    if isinstance(inputs, (list, tuple)):
        return type(inputs)(index_batch(v, index) for v in inputs)
    raise TypeError(f"cannot index a batch of type {type(inputs).__name__}")
