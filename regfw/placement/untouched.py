"""Run analysis passes over a user's model and leave the model exactly as it was.

Planning runs the model's ``forward`` (an example-input trace, ``torch.fx`` traces) and Monte Carlo
sampling traces it too. A forward may write to its own module: timm's LeViT and EfficientFormer
keep an attention-bias *cache* dict that an eval-mode forward fills, so a ``torch.fx`` trace leaves
a proxy of that trace in the user's model, and the next trace fails on it (``KeyError:
getitem_6``); a training-mode pass updates BatchNorm statistics. :func:`untouched` snapshots every
module's attributes (``__dict__``), the contents of its dict / list / set attributes (caches, hook
tables, the ``_modules`` table), and its buffers' values, and puts all of them back afterwards, so
no traced object, hook, cache entry, attribute or statistic is left behind. :func:`fingerprint`
is the same snapshot in comparable form, for tests and checks.
"""
from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

_CONTAINERS = (dict, list, set)


def _contents(value: Any) -> Any:
    if isinstance(value, dict):
        return dict(value)
    if isinstance(value, list):
        return list(value)
    return set(value)


class _Snapshot:
    """Every module's ``__dict__`` (shallow), its containers' contents and its buffers' values."""

    def __init__(self, model: nn.Module) -> None:
        self.modules = list(model.modules())
        self.attrs = [dict(vars(m)) for m in self.modules]
        self.containers = [{k: _contents(v) for k, v in vars(m).items() if isinstance(v, _CONTAINERS)}
                           for m in self.modules]
        self.buffers = [{k: b.detach().clone() for k, b in m._buffers.items() if b is not None}
                        for m in self.modules]

    def restore(self) -> None:
        for module, attrs, containers, buffers in zip(self.modules, self.attrs, self.containers, self.buffers,
                                                      strict=True):
            now = vars(module)
            for key in [k for k in now if k not in attrs]:
                del now[key]
            for key, value in attrs.items():
                if now.get(key, _MISSING) is not value:
                    now[key] = value
            for key, content in containers.items():
                _refill(attrs[key], content)
            with torch.no_grad():
                for key, saved in buffers.items():
                    buf = module._buffers.get(key)
                    if buf is not None and buf.shape == saved.shape and not torch.equal(buf, saved):
                        buf.copy_(saved)


_MISSING = object()


def _refill(container: Any, content: Any) -> None:
    """Put ``content`` back into ``container`` in place (its identity is kept: others may hold it)."""
    if isinstance(container, dict):
        if container.keys() != content.keys() or any(container[k] is not v for k, v in content.items()):
            container.clear()
            container.update(content)
    elif isinstance(container, list):
        if len(container) != len(content) or any(a is not b for a, b in zip(container, content, strict=True)):
            container[:] = content
    elif container != content:
        container.clear()
        container.update(content)


@contextmanager
def untouched(model: nn.Module) -> Iterator[None]:
    """Run the body, then put every module of ``model`` back as it was (see the module docstring).

    Only the modules present at entry are restored: an analysis pass never adds or removes a
    module, and a module it added to a ``_modules`` table is dropped with the table's contents."""
    snapshot = _Snapshot(model)
    try:
        yield
    finally:
        snapshot.restore()


def fingerprint(model: nn.Module, skip: tuple[str, ...] = ()) -> dict[str, Any]:
    """A comparable picture of ``model``'s state: per module path, its attributes (by identity, and
    containers by their items' identities), registered hooks and buffer values. Modules whose path
    has a part starting with one of ``skip`` are left out."""
    out: dict[str, Any] = {}
    for path, module in model.named_modules():
        if skip and any(part.startswith(skip) for part in path.split(".")):
            continue
        for key, value in vars(module).items():
            if key == "_buffers":
                out[f"{path}:buffers"] = {k: (None if b is None else b.detach().clone()) for k, b in value.items()}
            elif key == "_modules":
                out[f"{path}:modules"] = {k: id(v) for k, v in value.items()
                                          if not (skip and k.startswith(skip))}
            elif isinstance(value, dict):
                out[f"{path}:{key}"] = {k: id(v) for k, v in value.items()}
            elif isinstance(value, set):
                out[f"{path}:{key}"] = sorted(id(v) for v in value)
            elif isinstance(value, list):
                out[f"{path}:{key}"] = [id(v) for v in value]
            elif isinstance(value, (bool, int, float, str, type(None))):
                out[f"{path}:{key}"] = value
            else:
                out[f"{path}:{key}"] = id(value)
    return out


def differences(before: dict[str, Any], after: dict[str, Any]) -> list[str]:
    """The keys of two :func:`fingerprint` results that differ, each with a few words on how."""
    out = []
    for key in sorted(before.keys() | after.keys()):
        a, b = before.get(key, _MISSING), after.get(key, _MISSING)
        if a is _MISSING or b is _MISSING:
            out.append(f"{key}: {'added' if a is _MISSING else 'removed'}")
        elif key.endswith(":buffers"):
            changed = [k for k in a.keys() | b.keys()
                       if (a.get(k) is None) != (b.get(k) is None)
                       or (a.get(k) is not None and not torch.equal(a[k], b[k]))]
            if changed:
                out.append(f"{key}: buffer(s) {', '.join(sorted(changed))} changed")
        elif a != b:
            out.append(f"{key}: changed")
    return out
