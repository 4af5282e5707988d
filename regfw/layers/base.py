"""The common base of every stochastic layer in regfw."""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import Tensor, nn


def zeros_like_graph(x: Tensor) -> Tensor:
    """Zeros shaped like ``x`` that stay connected to the autograd graph (gradient 0), as torch
    does for p = 1: no division by zero, no NaN."""
    return x * x.new_zeros(())


def check_rate(p: float, name: str = "p") -> float:
    """Validate a drop rate and return it as a float.

    Raises ``ValueError`` naming the value and the allowed interval, as ``torch.nn.Dropout`` does.
    """
    try:
        value = float(p)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a number in [0, 1], got {p!r}") from None
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"{name} must be in [0, 1], got {value!r}")
    return value


class StochasticModule(nn.Module):
    """Marker base class: a module whose training-mode output is random.

    Monte Carlo dropout switches exactly these modules (plus torch's dropout modules and the
    types plugins declare through ``regfw_stochastic_types``) to training mode at inference.
    Subclasses keep their rate in the attribute ``p`` so that rate schedules can change it.
    """

    p: float
    #: True when one random draw serves the whole batch (weight drop draws one weight mask per
    #: forward pass): repeating the batch T times in one pass would then give T copies of one
    #: sample, so Monte Carlo dropout runs such models one pass per sample.
    batch_shared: bool = False


class Rate:
    """A validated drop-rate attribute for :class:`StochasticModule` subclasses.

    ``p = Rate()`` in a class body makes ``module.p = value`` go through :func:`check_rate`,
    so a rate schedule that computes a value outside [0, 1] fails at the assignment with the
    value in the message instead of producing silent garbage in the next forward pass.
    Forward passes read ``self.p`` each time, so a new value applies from the next call on.
    """

    def __set_name__(self, owner: type, name: str) -> None:
        self.name = name
        self.slot = "_" + name

    def __get__(self, obj: object, objtype: type | None = None) -> float:
        if obj is None:
            return self  # type: ignore[return-value]
        try:
            return obj.__dict__[self.slot]
        except KeyError:  # unset: an AttributeError, so getattr(module, "p", default) works
            raise AttributeError(self.name) from None

    def __set__(self, obj: object, value: float) -> None:
        obj.__dict__[self.slot] = check_rate(value, self.name)


def attach_child(host: nn.Module, name: str, child: nn.Module, *,
                 pre_hook: Callable[..., Any] | None = None, hook: Callable[..., Any] | None = None,
                 always_call: bool = False) -> nn.Module:
    """Hang ``child`` on ``host`` as child ``name``, called from ``host``'s forward pre-hook and/or
    forward hook; returns the child that is there afterwards.

    How regfw adds a layer without replacing one: parameter names and the host's own state dict
    entries are unchanged. When ``host`` already has a child ``name``, nothing changes and that
    child is returned (the caller updates its settings): a module is never attached twice. A new
    child moves to the host's device and takes its training flag. ``always_call`` runs the forward
    hook also when the forward raises (to undo what the pre-hook did).
    """
    existing = host._modules.get(name)
    if existing is not None:
        return existing
    ref: Tensor | None = next(iter(host.parameters()), None)
    if ref is None:
        ref = next(iter(host.buffers()), None)
    if ref is not None:
        child = child.to(device=ref.device)
    child.train(host.training)
    host.add_module(name, child)
    if pre_hook is not None:
        host.register_forward_pre_hook(pre_hook)
    if hook is not None:
        host.register_forward_hook(hook, always_call=always_call)
    return child
