"""What Monte Carlo sampling accepts as inputs, and the one-line refusal for what it does not.

:func:`regfw.uncertainty.mc_predict` repeats one input batch T times and stacks the T outputs into
``[T, B, ...]``. Its inputs are a tensor (first dimension B), a dict of keyword arguments or a
tuple of positional arguments whose tensors have B rows (:mod:`regfw.model_io`: Hugging Face's
``input_ids``, ``attention_mask``...); the ``batched`` and ``auto`` strategies repeat every one of
those tensors. A list is one argument of the model -- a detection model's list of images, one
image per element -- which cannot be repeated row by row; ``loop`` passes it as it is. What each
pass returns is read by :func:`regfw.model_io.select_output`, which refuses an output holding no
tensor to sample (a detection model's per-image dicts of boxes) naming what it holds.
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch import Tensor

from regfw.model_io import describe_output
from regfw.tensors import iter_tensors

ACCEPTED = ("one tensor of logits [B, C], [B, L, V] or [B, C, H, W], or of regression means [B, ...] "
            "(mean and log-variance concatenated with output_transform=regfw.uncertainty.split_mean_logvar)")


def _batch_like(inputs: Any) -> bool:
    """A tensor with a batch dimension, or a dict / tuple holding at least one."""
    if isinstance(inputs, Tensor):
        return inputs.dim() > 0
    if isinstance(inputs, (Mapping, tuple)):
        return any(t.dim() > 0 for t in iter_tensors(inputs))
    return False


def check_inputs(inputs: Any, strategy: str) -> None:
    """A ``TypeError`` unless ``inputs`` is a batch that ``batched`` and ``auto`` can repeat (a tensor,
    or a dict or tuple of tensors with a batch dimension); ``loop`` hands any input to the model as
    it is."""
    if strategy == "loop" or _batch_like(inputs):
        return
    detection = isinstance(inputs, list) and bool(inputs) and all(isinstance(v, Tensor) for v in inputs)
    hint = (" A detection model's list of images gives per-image dicts of boxes whose number changes from sample "
            "to sample, which cannot be stacked: sample a tensor of fixed shape instead (wrap the model so that "
            "forward(batch) returns, e.g., the box head's class logits for fixed proposals).") if detection else ""
    raise TypeError(f"mc_predict: inputs: got {describe_output(inputs)}, expected one input batch for strategy "
                    f"{strategy!r}: a tensor [B, ...], a dict of keyword arguments or a tuple of positional arguments "
                    f"whose tensors have B rows (strategy='loop' passes any input to the model as it is), for a "
                    f"model returning {ACCEPTED}.{hint}")
