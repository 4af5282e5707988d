"""The two rules of :mod:`regfw.model_io`: how a model is called on its inputs, and which tensor of its
output is read; and what a checkpoint keeps of a dict example input."""
from __future__ import annotations

from collections import namedtuple

import pytest
import torch
from transformers.modeling_outputs import SequenceClassifierOutput

from regfw.errors import ConfigError, RegfwError
from regfw.model_io import (
    OutputSelectionError,
    call_model,
    check_output_key,
    example_from_spec,
    example_spec,
    select_output,
)

Pair = namedtuple("Pair", ["logits", "hidden"])
Plain = namedtuple("Plain", ["mean", "note"])


def test_inputs_a_dict_is_keyword_a_tuple_positional_anything_else_one_argument():
    seen = []

    def model(*args, **kwargs):
        seen.append((len(args), sorted(kwargs)))
        return torch.zeros(1)

    call_model(model, {"input_ids": torch.zeros(1), "attention_mask": torch.zeros(1)})
    call_model(model, (torch.zeros(1), torch.zeros(1)))
    call_model(model, torch.zeros(1))
    call_model(model, [torch.zeros(1), torch.zeros(1)])  # a detection model's list of images: one argument
    assert seen == [(0, ["attention_mask", "input_ids"]), (2, []), (1, []), (1, [])]


def test_the_default_selector_reads_a_tensor_then_logits_then_a_lone_tensor():
    logits, loss, hidden = torch.randn(2, 3), torch.tensor(0.5), torch.randn(2, 4)
    assert select_output(logits) is logits
    assert select_output(SequenceClassifierOutput(loss=loss, logits=logits)) is logits
    assert select_output({"logits": logits, "hidden": hidden}) is logits
    assert select_output(Pair(logits, hidden)) is logits
    assert select_output((logits, None, "cache")) is logits  # the lone tensor among other values
    assert select_output({"out": logits, "extra": None}) is logits


def test_a_key_a_position_or_a_callable_selects_instead():
    logits, loss, hidden = torch.randn(2, 3), torch.tensor(0.5), torch.randn(2, 4)
    out = SequenceClassifierOutput(loss=loss, logits=logits)
    assert select_output(out, "loss") is loss
    assert select_output(out, 1) is logits  # a ModelOutput's positions count its fields that are set
    assert select_output((hidden, logits), 1) is logits
    assert select_output(Plain(hidden, "x"), "mean") is hidden
    assert select_output({"a": hidden, "b": logits}, "b") is logits
    assert select_output(out, lambda o: o.logits * 2).equal(logits * 2)


@pytest.mark.parametrize(("output", "key", "message"), [
    ((torch.zeros(2, 3), torch.zeros(2, 1)), None,
     r"model output: got a tuple of 2 \(Tensor\[2, 3\], Tensor\[2, 1\]\); expected one tensor, an output with a "
     r"'logits' entry, or one holding a lone tensor\. Choose the tensor to read with output_key=0 .*"
     r"split_mean_logvar"),
    ({"out": torch.zeros(2, 3), "aux": torch.zeros(2, 4)}, None,
     r"got a dict with keys 'out' \(Tensor\[2, 3\]\), 'aux' \(Tensor\[2, 4\]\).*output_key='out'"),
    (Plain(torch.zeros(2), torch.zeros(2)), "logits",
     r"output_key='logits': the model output has no such entry; it is a named tuple Plain with fields 'mean' "
     r"\(Tensor\[2\]\), 'note' \(Tensor\[2\]\)"),
    ((torch.zeros(2),), 3, r"output_key=3: the model output has no such position; it is a tuple of 1 \(Tensor\[2\]\)"),
    ({"out": torch.zeros(2)}, lambda o: "text", r"output_key=<lambda> selected a str from the model output, "
                                                  r"expected a tensor"),
    ([{"boxes": torch.zeros(1, 4), "labels": torch.zeros(1)}], None,
     r"got a list of 1 dicts with keys 'boxes', 'labels'.*cannot be stacked"),
    ("text", None, r"model output: got a str; .*make forward return one tensor"),
])
def test_a_selector_that_finds_nothing_is_one_error_naming_what_the_output_holds(output, key, message):
    with pytest.raises(OutputSelectionError, match=message) as caught:
        select_output(output, key)
    assert isinstance(caught.value, RegfwError) and isinstance(caught.value, TypeError)
    assert "\n" not in str(caught.value)


def test_an_output_key_that_is_not_a_selector_is_a_config_error():
    for good in (None, "logits", 0, len):
        assert check_output_key(good) is good
    with pytest.raises(ConfigError, match=r"model.output_key: got 1.5, expected the key \(e.g. 'logits'\), the "
                                          r"position \(e.g. 0\) or a callable"):
        check_output_key(1.5, "model.output_key")


def test_a_dict_example_keeps_its_shapes_and_dtypes_per_key_and_comes_back():
    example = {"input_ids": torch.ones(2, 7, dtype=torch.long), "attention_mask": torch.ones(2, 7),
               "return_dict": True}
    shapes, dtypes = example_spec(example)
    assert shapes == {"input_ids": [2, 7], "attention_mask": [2, 7], "return_dict": True}
    assert dtypes == {"input_ids": "int64", "attention_mask": "float32", "return_dict": None}
    back = example_from_spec(shapes, dtypes)
    assert back["input_ids"].dtype == torch.long and back["input_ids"].shape == (2, 7)
    assert back["attention_mask"].dtype == torch.float32 and back["return_dict"] is True
    pair = example_from_spec(*example_spec((torch.zeros(3, 2), torch.zeros(3, dtype=torch.bool))))
    assert isinstance(pair, tuple) and pair[1].dtype == torch.bool and pair[0].shape == (3, 2)
    tensor = example_from_spec(*example_spec(torch.zeros(4, 5, dtype=torch.float64)))
    assert tensor.shape == (4, 5) and tensor.dtype == torch.float64
