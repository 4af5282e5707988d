"""How regfw calls a model on its inputs, and which tensor of the model's output it reads.

Two rules, each stated once and used by training (:class:`~regfw.train.module.RegularizedModule`,
the :class:`~regfw.train.regularize.Regularize` callback's steps), Monte Carlo dropout
(:func:`regfw.uncertainty.mc_predict`, the MC callback), ``regfw predict`` and ``regfw rank``:

**Calling** (:func:`call_model`): inputs are what :func:`regfw.train.batch.split_batch` gives.

* a dict (any mapping) is the model's keyword arguments: ``model(**inputs)``, as Hugging Face
  models take ``input_ids``, ``attention_mask``, ``pixel_values``, ``decoder_input_ids``;
* a tuple is its positional arguments: ``model(*inputs)``;
* anything else -- a tensor, a list (a detection model's list of images) -- is one argument:
  ``model(inputs)``.

This is the convention of planning's ``example_input`` and of Lightning's ``example_input_array``.

**Selecting** (:func:`select_output`): Monte Carlo dropout stacks one tensor per pass, and a loss
compares one tensor with the targets, so a model returning several values has one read. The
selector ``output_key`` is

* ``None`` (the default): a tensor as it is; otherwise the ``logits`` entry (a Hugging Face
  ``ModelOutput``, a dict, a named tuple with a ``logits`` field); otherwise the one tensor the
  output holds (a tuple or dict with a lone tensor among other values, e.g. ``(logits, cache)``);
* a string: that key of a mapping (a ``ModelOutput`` too) or that attribute (a named tuple);
* an integer: that position of a tuple or list (a ``ModelOutput`` counts its fields that are set);
* a callable ``output -> Tensor``.

A selector that finds no tensor raises :class:`OutputSelectionError` naming what the output holds.
An ``output_transform`` (:func:`regfw.uncertainty.mc_predict`) applies to the selected tensors.
"""
from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, Union

import torch
import torch.fx
from torch import Tensor, nn

from regfw.errors import ConfigError, RegfwError

__all__ = ["OutputKey", "OutputSelectionError", "DEFAULT_OUTPUT_ENTRY", "call_model", "select_output", "model_output",
           "describe_output", "check_output_key", "example_spec", "example_from_spec"]

#: What :func:`select_output` reads: None (the default rule), a key, a position or a function.
OutputKey = Union[str, int, Callable[[Any], Any], None]  # noqa: UP007 - a runtime alias (jsonargparse reads it)

#: The entry the default selector reads from a mapping or named tuple: the logits (Hugging Face's
#: name for the pre-softmax scores of every ``*For...`` head).
DEFAULT_OUTPUT_ENTRY = "logits"


class OutputSelectionError(RegfwError, TypeError):
    """The output selector found no tensor in a model's output. The message names what the output
    holds and how to choose (``output_key``)."""


def call_model(model: nn.Module | Callable[..., Any], inputs: Any) -> Any:
    """``model`` run on ``inputs``: a mapping as keyword arguments, a tuple as positional arguments,
    anything else as one argument (see the module docstring)."""
    if isinstance(inputs, Mapping):
        return model(**inputs)
    if isinstance(inputs, tuple):
        return model(*inputs)
    return model(inputs)


def _is_named_tuple(value: Any) -> bool:
    return isinstance(value, tuple) and hasattr(type(value), "_fields")


def _entries(output: Any) -> list[tuple[str, Any]]:
    """``(name, value)`` of the values an output holds at its top level: mapping keys, named-tuple
    fields, tuple/list positions."""
    if isinstance(output, Mapping):
        return [(repr(k), v) for k, v in output.items()]
    if _is_named_tuple(output):
        return [(repr(f), getattr(output, f)) for f in type(output)._fields]
    if isinstance(output, (tuple, list)):
        return [(str(i), v) for i, v in enumerate(output)]
    return []


def _value_kind(value: Any) -> str:
    if isinstance(value, Tensor):
        return f"Tensor{list(value.shape)}"
    return type(value).__name__


def describe_output(output: Any) -> str:
    """``a SequenceClassifierOutput with keys 'loss' (Tensor[]), 'logits' (Tensor[2, 3])`` and the
    like: what a model returned, for messages."""
    name = type(output).__name__
    if isinstance(output, Mapping):
        if not output:
            return f"an empty {name}"
        inner = ", ".join(f"{k} ({_value_kind(v)})" for k, v in _entries(output))
        return f"a {name} with keys {inner}"
    if _is_named_tuple(output):
        inner = ", ".join(f"{k} ({_value_kind(v)})" for k, v in _entries(output))
        return f"a named tuple {name} with fields {inner}"
    if isinstance(output, (tuple, list)):
        if output and all(isinstance(v, Mapping) for v in output):
            keys = ", ".join(repr(k) for k in output[0])
            return f"a {name} of {len(output)} dicts with keys {keys}"
        inner = ", ".join(_value_kind(v) for v in output)
        return f"a {name} of {len(output)} ({inner or 'empty'})"
    if isinstance(output, Tensor):
        return f"a Tensor{list(output.shape)}"
    return f"a {name}"


def _tensors(output: Any) -> list[tuple[str, Tensor]]:
    return [(k, v) for k, v in _entries(output) if isinstance(v, Tensor)]


def _how_to_choose(output: Any) -> str:
    tensors = _tensors(output)
    if isinstance(output, list) and output and all(isinstance(v, Mapping) for v in output):
        return (" A detection model's per-image results have a number of boxes that changes from sample to sample, "
                "so T samples cannot be stacked and averaged position by position: sample a tensor of fixed shape "
                "instead (wrap the model so that forward returns, e.g., the class logits for fixed proposals).")
    if tensors:
        pair = (" A regression model's (mean, log-variance) pair: return them concatenated along the last "
                "dimension and sample with output_transform=regfw.uncertainty.split_mean_logvar."
                if isinstance(output, tuple) and len(tensors) == 2 else "")
        return (f" Choose the tensor to read with output_key={tensors[0][0]} (a key, a position, or a callable "
                f"output -> Tensor; model.output_key in a regfw config).{pair}")
    return (" Choose the tensor to read with output_key=<a callable output -> Tensor> (or a key or a position), "
            "or make forward return one tensor.")


def check_output_key(output_key: Any, where: str = "output_key") -> OutputKey:
    """``output_key`` if it is a selector (None, a string, an integer or a callable), else a
    :class:`~regfw.errors.ConfigError` naming ``where``."""
    if output_key is None or callable(output_key) or isinstance(output_key, str):
        return output_key
    if isinstance(output_key, int) and not isinstance(output_key, bool):
        return output_key

    raise ConfigError(f"{where}: got {output_key!r}, expected the key (e.g. 'logits'), the position (e.g. 0) or a "
                      f"callable output -> Tensor that picks the tensor to read from the model's output.", key=where)


def _default(output: Any) -> Tensor | None:
    if isinstance(output, Tensor):
        return output
    if isinstance(output, Mapping):
        found = output.get(DEFAULT_OUTPUT_ENTRY)
        if isinstance(found, Tensor):
            return found
    elif _is_named_tuple(output):
        found = getattr(output, DEFAULT_OUTPUT_ENTRY, None)
        if isinstance(found, Tensor):
            return found
    tensors = _tensors(output)
    return tensors[0][1] if len(tensors) == 1 else None


def select_output(output: Any, output_key: OutputKey = None) -> Tensor:
    """The tensor of ``output`` that ``output_key`` selects (see the module docstring).

    Raises:
        OutputSelectionError: nothing selected, or what was selected is not a tensor; the message
            names what ``output`` holds and how to choose.
    """
    if isinstance(output, torch.fx.Proxy):  # symbolic tracing (MC dropout's ``auto`` split): stands for a tensor
        traced: Any = output
        if output_key is None:
            return traced
        return output_key(traced) if callable(output_key) else traced[output_key]
    if output_key is None:
        found = _default(output)
        if found is not None:
            return found
        raise OutputSelectionError(
            f"model output: got {describe_output(output)}; expected one tensor, an output with a "
            f"{DEFAULT_OUTPUT_ENTRY!r} entry, or one holding a lone tensor.{_how_to_choose(output)}")
    if callable(output_key):
        picked = output_key(output)
        what = f"output_key={getattr(output_key, '__name__', type(output_key).__name__)}"
    elif isinstance(output_key, str):
        if isinstance(output, Mapping) and output_key in output:
            picked = output[output_key]
        elif not isinstance(output, (Mapping, Tensor)) and hasattr(output, output_key):
            picked = getattr(output, output_key)
        else:
            raise OutputSelectionError(
                f"output_key={output_key!r}: the model output has no such entry; it is "
                f"{describe_output(output)}.{_how_to_choose(output)}")
        what = f"output_key={output_key!r}"
    else:
        try:
            picked = output[output_key] if isinstance(output, (tuple, list)) or hasattr(output, "to_tuple") else None
            if picked is None:
                raise IndexError
        except (IndexError, KeyError, TypeError):
            raise OutputSelectionError(
                f"output_key={output_key!r}: the model output has no such position; it is "
                f"{describe_output(output)}.{_how_to_choose(output)}") from None
        what = f"output_key={output_key!r}"
    if not isinstance(picked, Tensor):
        raise OutputSelectionError(
            f"{what} selected {describe_output(picked)} from the model output, expected a tensor; the output is "
            f"{describe_output(output)}.{_how_to_choose(output)}")
    return picked


def model_output(model: nn.Module | Callable[..., Any], inputs: Any, output_key: OutputKey = None) -> Tensor:
    """One pass: ``model`` called on ``inputs`` (:func:`call_model`) and the tensor ``output_key``
    selects from its output (:func:`select_output`)."""
    return select_output(call_model(model, inputs), output_key)


# --------------------------------------------------------------------------- example inputs


def example_spec(example: Any) -> tuple[Any, Any]:
    """``(shapes, dtypes)`` of an example input, what a checkpoint keeps of it: a list and a dtype
    name for a tensor, dicts of them for a dict of keyword arguments, lists for a tuple of
    positional arguments (non-tensor values are kept as they are, in ``shapes``)."""
    if isinstance(example, Tensor):
        return list(example.shape), str(example.dtype).replace("torch.", "")
    if isinstance(example, Mapping):
        pairs = {k: example_spec(v) for k, v in example.items()}
        return {k: s for k, (s, _) in pairs.items()}, {k: d for k, (_, d) in pairs.items()}
    if isinstance(example, tuple):
        pairs_list = [example_spec(v) for v in example]
        return [s for s, _ in pairs_list], [d for _, d in pairs_list]
    return example, None


def example_from_spec(shapes: Any, dtypes: Any) -> Any:
    """An input of the recorded shapes and dtypes (zeros), the inverse of :func:`example_spec`:
    a dict spec gives a dict, a list of lists a tuple."""
    if isinstance(shapes, Mapping):
        dt = dtypes if isinstance(dtypes, Mapping) else {}
        return {k: example_from_spec(v, dt.get(k)) for k, v in shapes.items()}
    if isinstance(shapes, (list, tuple)) and shapes and isinstance(dtypes, (list, tuple)):
        return tuple(example_from_spec(s, d) for s, d in zip(shapes, dtypes, strict=True))
    if isinstance(shapes, (list, tuple)) and all(isinstance(n, int) and not isinstance(n, bool) for n in shapes):
        return torch.zeros(list(shapes), dtype=getattr(torch, dtypes or "float32"))
    return shapes
