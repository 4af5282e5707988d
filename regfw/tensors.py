"""Small helpers on nested containers of tensors."""
from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from torch import Tensor


def iter_tensors(obj: Any) -> Iterator[Tensor]:
    """Every tensor inside nested tuples, lists and dicts (dict values), in order."""
    if isinstance(obj, Tensor):
        yield obj
    elif isinstance(obj, (list, tuple)):
        for item in obj:
            yield from iter_tensors(item)
    elif isinstance(obj, dict):
        for item in obj.values():
            yield from iter_tensors(item)
