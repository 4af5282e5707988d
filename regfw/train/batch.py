"""The one batch convention: how a batch splits into the model's inputs and the loss's targets.

Every place that unpacks a batch (the training and validation steps, evaluation, MC dropout,
``regfw predict``, active learning) calls :func:`split_batch`, so a dataset that yields dicts or
longer tuples is configured once, with a :class:`BatchFormat`, instead of in five places.

* a tuple or list ``(inputs, targets, *rest)``: element ``inputs`` (default 0) and element
  ``targets`` (default 1); the rest (sample weights, indices) is ignored;
* a mapping with keys named by the format (``BatchFormat(inputs="image", targets="label")``):
  those entries;
* a mapping by default: its ``"inputs"`` entry when it has one; otherwise the mapping itself
  *minus the label keys* is the inputs -- the model's keyword arguments, as Hugging Face batches
  are (``input_ids``, ``attention_mask``, ``pixel_values``, ``decoder_input_ids``...). The targets
  are the first of :data:`TARGET_KEYS` the batch has (``"targets"``, ``"labels"``, ``"label"``;
  or the key ``targets`` names), and every one of those keys is left out of the inputs, so the
  model never computes a loss of its own from them; no such key: targets None;
* a bare tensor: inputs without targets (``targets`` is None).

How the inputs are then passed to the model (a dict as keyword arguments, a tuple as positional
ones) is :func:`regfw.model_io.call_model`.

The helpers :func:`batch_size`, :func:`concat_batches` and :func:`index_batch` work on the
inputs' structure (a tensor, or tuples/lists/dicts of tensors along their first dimension),
for regularizers that mix or repeat examples (mixup, R-Drop) and for Monte Carlo sampling,
which repeats every tensor of a dict of keyword arguments (masks and ids come along).
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from regfw.errors import ConfigError

#: The keys a dict batch's targets are read from by default, in this order; all of them are left
#: out of the model's keyword inputs.
TARGET_KEYS: tuple[str, ...] = ("targets", "labels", "label")


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


def _split_mapping(batch: Mapping, fmt: BatchFormat) -> tuple[Any, Any]:
    """A dict batch by the rules of the module docstring."""
    if fmt.targets is None:
        label_keys: tuple = ()
        targets = None
    elif isinstance(fmt.targets, str):
        label_keys = (fmt.targets,)
        targets = _pick(batch, fmt.targets, "targets", fmt)
    else:
        label_keys = TARGET_KEYS
        targets = next((batch[k] for k in TARGET_KEYS if k in batch), None)
    if isinstance(fmt.inputs, str):
        return _pick(batch, fmt.inputs, "inputs", fmt), targets
    if "inputs" in batch:
        return batch["inputs"], targets
    inputs = {k: v for k, v in batch.items() if k not in label_keys}
    if not inputs:
        raise ConfigError(f"batch: a dict batch with only the label key(s) {', '.join(map(repr, batch))}: nothing is "
                          f"left for the model's inputs; name the inputs with BatchFormat(inputs=KEY).")
    return inputs, targets


def split_batch(batch: Any, fmt: BatchFormat | Mapping[str, Any] | None = None) -> tuple[Any, Any]:
    """``(inputs, targets)`` of ``batch`` by ``fmt`` (default: ``(x, y)`` tuples; dicts by the module docstring).

    A bare tensor is ``(batch, None)``. A problem is a :class:`~regfw.errors.ConfigError` saying
    what the batch looks like and how to describe it.
    """
    fmt = BatchFormat.coerce(fmt)
    if isinstance(batch, torch.Tensor):
        return batch, None
    if isinstance(batch, Mapping):
        return _split_mapping(batch, fmt)
    if isinstance(batch, Sequence) and not isinstance(batch, str):
        if len(batch) == 1 and fmt.targets == 1:
            return batch[0], None
        inputs = _pick(batch, fmt.inputs, "inputs", fmt)
        targets = None if fmt.targets is None else _pick(batch, fmt.targets, "targets", fmt)
        return inputs, targets
    raise ConfigError(f"batch: got a {type(batch).__name__}, expected a tensor, a tuple/list (inputs, targets) "
                      f"or a dict; describe other batches with a BatchFormat.")


def batch_size(inputs: Any) -> int:
    """The number of examples in ``inputs``: the first dimension of its first tensor (a 0-d tensor is
    one example; values that are not tensors, such as a flag among keyword arguments, are skipped)."""
    if isinstance(inputs, torch.Tensor):
        return int(inputs.shape[0]) if inputs.dim() else 1
    found = _first_rows(inputs)
    if found is not None:
        return found
    if isinstance(inputs, (list, tuple, Mapping)) and not any(True for _ in _leaves(inputs)):
        return 0
    raise TypeError(f"cannot tell the batch size of a {type(inputs).__name__}")


def _leaves(inputs: Any) -> Any:
    if isinstance(inputs, Mapping):
        for v in inputs.values():
            yield from _leaves(v)
    elif isinstance(inputs, (list, tuple)):
        for v in inputs:
            yield from _leaves(v)
    elif isinstance(inputs, torch.Tensor):
        yield inputs


def _first_rows(inputs: Any) -> int | None:
    for t in _leaves(inputs):
        return int(t.shape[0]) if t.dim() else 1
    return None


def concat_batches(first: Any, second: Any) -> Any:
    """``first`` and ``second`` (of one structure) joined along the batch dimension; values that are
    not tensors (flags among keyword arguments) are taken from ``first``."""
    if isinstance(first, torch.Tensor):
        return torch.cat([first, second], dim=0)
    if isinstance(first, Mapping):
        return {k: concat_batches(v, second[k]) for k, v in first.items()}
    if isinstance(first, (list, tuple)):
        return _rebuild(first, [concat_batches(a, b) for a, b in zip(first, second, strict=True)])
    if first is None or isinstance(first, (bool, int, float, str)):
        return first
    raise TypeError(f"cannot concatenate batches of type {type(first).__name__}")


def _rebuild(like: list | tuple, items: list) -> Any:
    """``items`` in a container of the type of ``like`` (a named tuple too)."""
    if isinstance(like, tuple) and hasattr(type(like), "_fields"):
        return type(like)(*items)
    return type(like)(items)


def index_batch(inputs: Any, index: torch.Tensor | slice, rows: int | None = None) -> Any:
    """The examples ``index`` of ``inputs`` (a tensor index or slice along the batch dimension).

    Every tensor whose first dimension is the batch size (``rows``; default :func:`batch_size`) is
    indexed; other values -- a flag or ``None`` among keyword arguments, a 0-d tensor, a tensor that
    broadcasts over the batch (first dimension 1 of a larger batch) -- are passed as they are.
    """
    if rows is None:
        rows = batch_size(inputs) if not isinstance(inputs, torch.Tensor) else None
    if isinstance(inputs, torch.Tensor):
        if rows is not None and (inputs.dim() == 0 or inputs.shape[0] != rows):
            return inputs
        return inputs[index]
    if isinstance(inputs, Mapping):
        return {k: index_batch(v, index, rows) for k, v in inputs.items()}
    if isinstance(inputs, (list, tuple)):
        return _rebuild(inputs, [index_batch(v, index, rows) for v in inputs])
    if inputs is None or isinstance(inputs, (bool, int, float, str)):
        return inputs
    raise TypeError(f"cannot index a batch of type {type(inputs).__name__}")
