"""The inputs of a call as the split sees them: one tensor, or the tensors of a dict or tuple of
arguments (:mod:`regfw.model_io`: Hugging Face's ``input_ids``, ``attention_mask``...) as one flat
tuple, the values that are not tensors (flags, ``None``) kept aside as constants of the structure.

The graph of a split has one input: the tensor itself, or that flat tuple (a tuple value, whose
tensors each carry the batch or not, :mod:`.layout`). Every tensor whose first dimension is the batch
size follows the batch through the replay: masks and ids come along with the rows they belong to.
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from torch import Tensor

from regfw.train.batch import batch_size


@dataclass(frozen=True)
class _Slot:
    """Where the ``index``-th tensor of the flat tuple goes in the structure."""

    index: int


def _template(value: Any, tensors: list[Tensor]) -> Any:
    if isinstance(value, Tensor):
        tensors.append(value)
        return _Slot(len(tensors) - 1)
    if isinstance(value, Mapping):
        return ("mapping", tuple((k, _template(v, tensors)) for k, v in value.items()))
    if isinstance(value, (tuple, list)):
        return ("list" if isinstance(value, list) else "tuple", tuple(_template(v, tensors) for v in value))
    return ("const", value)


def _fill(template: Any, flat: Any) -> Any:
    if isinstance(template, _Slot):
        return flat[template.index]
    kind, body = template
    if kind == "mapping":
        return {k: _fill(v, flat) for k, v in body}
    if kind in ("tuple", "list"):
        items = [_fill(v, flat) for v in body]
        return items if kind == "list" else tuple(items)
    return body


@dataclass(frozen=True)
class Packed:
    """``inputs`` as the split's graph takes them (:attr:`value`) and how to call the model with them."""

    value: Any  #: the tensor itself, or the flat tuple of the tensors of a dict / tuple
    template: Any  #: None for one tensor; else the structure with :class:`_Slot` for each tensor
    batched: tuple[bool, ...]  #: per tensor of the flat tuple: its first dimension is the batch
    rows: int  #: the batch size B

    @property
    def tensors(self) -> tuple[Tensor, ...]:
        return (self.value,) if self.template is None else tuple(self.value)

    def unpack(self, flat: Any) -> tuple[tuple, dict]:
        """``(args, kwargs)`` of the model call for a graph input ``flat`` (a tensor, a tuple or its
        proxy while ``torch.fx`` traces)."""
        if self.template is None:
            return (flat,), {}
        kind, body = self.template
        value = _fill(self.template, flat)
        if kind == "mapping":
            return (), value
        if kind == "tuple":
            return tuple(value), {}
        return (value,), {}

    def signature(self) -> tuple:
        """What a split depends on: the structure, the constants, and per tensor its shape past the
        batch dimension (the whole shape for a tensor without one), dtype and device."""
        shapes = tuple((tuple(t.shape[1:]) if b else ("fixed", *t.shape), t.dtype, t.device)
                       for t, b in zip(self.tensors, self.batched, strict=True))
        return (_hashable(self.template), shapes)


def _hashable(template: Any) -> Any:
    try:
        hash(template)
        return template
    except TypeError:
        return repr(template)


def pack(inputs: Any) -> Packed:
    """:class:`Packed` of a tensor, or of a dict / tuple of arguments holding tensors with a batch
    dimension; a ``TypeError`` naming what is missing otherwise."""
    if isinstance(inputs, Tensor):
        if inputs.dim() == 0 or inputs.shape[0] == 0:
            raise TypeError("the inputs are a tensor without batch rows")
        return Packed(inputs, None, (True,), int(inputs.shape[0]))
    if not isinstance(inputs, (Mapping, tuple)):
        raise TypeError(f"the inputs are a {type(inputs).__name__}, not a tensor, dict or tuple of tensors")
    tensors: list[Tensor] = []
    template = _template(inputs, tensors)
    rows = batch_size(inputs) if tensors else 0
    batched = tuple(t.dim() > 0 and t.shape[0] == rows for t in tensors)
    if rows == 0 or not any(batched):
        raise TypeError("the inputs hold no tensor with batch rows")
    return Packed(tuple(tensors), template, batched, rows)


def with_value(packed: Packed, value: Any) -> Packed:
    """``packed`` with another graph input of the same structure (other rows)."""
    rows = int(next(t for t, b in zip((value,) if packed.template is None else value, packed.batched, strict=True)
                    if b).shape[0])
    return Packed(value, packed.template, packed.batched, rows)

