"""What Monte Carlo sampling accepts, and the one-line refusals for what it does not.

:func:`regfw.uncertainty.mc_predict` stacks the T outputs of one input batch into ``[T, B, ...]``
and averages them position by position, so it needs one tensor in (the batch, first dimension B)
and one tensor out of fixed shape. Detection models fail both: torchvision's take a list of
images and return a list of per-image dicts (``boxes``, ``labels``, ``scores``) whose number of
boxes changes from one sample to the next, so there is nothing to stack. Those are refused with a
message saying what is accepted, never with an ``AttributeError`` from deep inside a strategy.
"""
from __future__ import annotations

from typing import Any

from torch import Tensor

ACCEPTED = ("one tensor of logits [B, C], [B, L, V] or [B, C, H, W], or of regression means [B, ...] "
            "(mean and log-variance concatenated with output_transform=regfw.uncertainty.split_mean_logvar)")


def _kind(value: Any) -> str:
    """``a list of 2 dicts with keys 'boxes', 'labels'`` and the like, for messages."""
    if isinstance(value, (list, tuple)):
        name = type(value).__name__
        if value and all(isinstance(v, dict) for v in value):
            keys = ", ".join(repr(k) for k in value[0])
            return f"a {name} of {len(value)} dicts with keys {keys}"
        inner = sorted({type(v).__name__ for v in value})
        return f"a {name} of {len(value)} ({', '.join(inner) or 'empty'})"
    return f"a {type(value).__name__}"


def check_inputs(inputs: Any, strategy: str) -> None:
    """A ``TypeError`` unless ``inputs`` is one batch tensor (what ``batched`` and ``auto`` repeat and
    slice); ``loop`` hands any input to the model as it is."""
    if isinstance(inputs, Tensor) or strategy == "loop":
        return
    detection = isinstance(inputs, (list, tuple)) and bool(inputs) and all(isinstance(v, Tensor) for v in inputs)
    hint = (" A detection model's list of images gives per-image dicts of boxes whose number changes from sample "
            "to sample, which cannot be stacked: sample a tensor of fixed shape instead (wrap the model so that "
            "forward(batch) returns, e.g., the box head's class logits for fixed proposals).") if detection else ""
    raise TypeError(f"mc_predict: inputs: got {_kind(inputs)}, expected one input batch as a tensor [B, ...] for "
                    f"strategy {strategy!r} (strategy='loop' passes any input to the model as it is), for a model "
                    f"returning {ACCEPTED}.{hint}")


def output_error(out: Any) -> TypeError:
    """The refusal of a forward that returned something other than one tensor."""
    if isinstance(out, dict):
        keys = ", ".join(repr(k) for k in out)
        return TypeError(
            f"Monte Carlo sampling needs a model whose forward returns one tensor, got a dict with keys {keys} "
            f"(as torchvision segmentation models return). Wrap the model so that forward returns the tensor "
            f"to sample, e.g. forward(x) = model(x)[{next(iter(out), 'out')!r}]."
        )
    per_image = isinstance(out, (list, tuple)) and bool(out) and all(isinstance(v, dict) for v in out)
    why = (" (a detection model's per-image results: their number of boxes changes from sample to sample, so T "
           "samples cannot be stacked and averaged position by position)") if per_image else ""
    return TypeError(f"Monte Carlo sampling needs a model whose forward returns {ACCEPTED}; got {_kind(out)}{why}. "
                     f"Wrap the model so that forward returns one such tensor (for a dict, forward(x) = "
                     f"model(x)[key]).")
