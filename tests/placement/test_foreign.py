"""Honest Monte Carlo dropout and foreign stochastic layers, on torch-only models (the zoo runs the
torchvision and timm ones): the Transformer fast path, functional dropout in a forward, zero spread
as an error, and the messages for outputs MC dropout cannot score as they are."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from regfw.model_io import OutputSelectionError
from regfw.placement import foreign
from regfw.placement.dataflow import call_with_example
from regfw.placement.plan import apply_plan, make_plan
from regfw.registry.regularizers import build_regularizers
from regfw.uncertainty import mc_predict


class TextClassifier(nn.Module):
    """Embedding -> nn.TransformerEncoder (dropout 0.1) -> mean -> Linear: the issue's example."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(30, 16)
        layer = nn.TransformerEncoderLayer(16, nhead=2, dim_feedforward=32, dropout=0.1, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, num_layers=2, enable_nested_tensor=False)
        self.head = nn.Linear(16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(self.embed(x)).mean(dim=1))


class FunctionalDropout(nn.Module):
    """Dropout written as ``F.dropout(h, self.p, self.training)`` inside forward."""

    def __init__(self, p: float = 0.3) -> None:
        super().__init__()
        self.fc1, self.fc2, self.p = nn.Linear(6, 16), nn.Linear(16, 3), p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.dropout(torch.relu(self.fc1(x)), self.p, self.training))


class UnusedDropout(nn.Module):
    """Owns an nn.Dropout(0.5) but never calls it: MC dropout would return zero spread."""

    def __init__(self) -> None:
        super().__init__()
        self.fc, self.drop = nn.Linear(6, 3), nn.Dropout(0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x)


@pytest.mark.parametrize("strategy", ["loop", "batched", "auto"])
def test_transformer_encoder_samples_are_random_in_every_strategy(strategy):
    torch.manual_seed(0)
    model = TextClassifier().eval()
    x = torch.randint(0, 30, (4, 7))
    res = mc_predict(model, x, samples=8, strategy=strategy, seed=0)
    # eval mode would take the fused fast path and skip the dropout: identical samples
    assert res.outputs.std(0).min() > 0
    assert not model.training and not any(m.training for m in model.modules())


def test_functional_dropout_is_sampled_and_planned_as_existing_dropout():
    torch.manual_seed(0)
    model = FunctionalDropout().eval()
    x = torch.randn(5, 6)
    res = mc_predict(model, x, samples=6, strategy="loop", seed=0)
    assert res.outputs.std(0).min() > 0
    assert [(p, name, rate) for p, _, name, rate in foreign.functional_hosts(model)] == [("", "dropout", 0.3)]
    regs = build_regularizers({"dropout": {"hidden": 0.45}})
    plan = make_plan(model, regs, example_input=x)
    rows = [r for r in plan.rows() if r.kind == "hidden"]
    assert [(r.path, r.action, r.anchor, r.rate, r.variant) for r in rows] == [
        ("fc1", "set", "", 0.45, "F.dropout in FunctionalDropout.forward (existing)")]
    apply_plan(model, regs, plan)
    assert model.p == 0.45 and "regfw_dropout" not in dict(model.named_modules())["fc1"]._modules


def test_zero_spread_with_a_positive_rate_is_an_error_naming_the_module():
    model = UnusedDropout().eval()
    with pytest.raises(RuntimeError, match=r"drew 4 identical samples although these modules have a rate > 0 and "
                                           r"should have been random: drop \(Dropout, rate 0.5\)"):
        mc_predict(model, torch.randn(3, 6), samples=4, strategy="loop", seed=0)


def test_sequence_logits_are_summarised_per_position_or_flattened_by_a_transform():
    class LM(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc, self.drop = nn.Linear(4, 9), nn.Dropout(0.3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc(self.drop(x))

    torch.manual_seed(0)
    lm, x = LM(), torch.randn(2, 5, 4)
    dense = mc_predict(lm, x, samples=3, seed=0)  # [B, L, V]: one summary per position
    assert dense.summary.mean_probs.shape == (2, 5, 9)
    assert dense.summary.mutual_information.shape == (2, 5)
    res = mc_predict(lm, x, samples=3, seed=0, output_transform=lambda o: o.reshape(o.shape[0], -1, o.shape[-1]))
    assert res.probs.shape == (3, 10, 9)
    torch.testing.assert_close(res.summary.mean_probs, dense.summary.mean_probs.reshape(10, 9))


def test_dict_output_message_names_the_keys():
    class Seg(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc, self.drop = nn.Linear(4, 3), nn.Dropout(0.3)

        def forward(self, x: torch.Tensor) -> dict:
            return {"out": self.fc(self.drop(x)), "aux": x}

    with pytest.raises(OutputSelectionError, match=r"got a dict with keys 'out' \(Tensor\[2, 3\]\), 'aux' "
                                                   r"\(Tensor\[2, 4\]\).*output_key='out'"):
        mc_predict(Seg(), torch.randn(2, 4), samples=3, seed=0, strategy="batched")
    assert mc_predict(Seg(), torch.randn(2, 4), samples=3, seed=0, strategy="batched",
                      output_key="out").outputs.shape == (3, 2, 3)


def test_example_input_forms_and_the_message_for_others():
    seen = []

    class Any_(nn.Module):
        def forward(self, *args, **kwargs):
            seen.append((len(args), sorted(kwargs)))
            return torch.zeros(1)

    m = Any_()
    call_with_example(m, torch.zeros(1))
    call_with_example(m, (torch.zeros(1), torch.zeros(1)))
    call_with_example(m, {"a": torch.zeros(1)})
    call_with_example(m, [torch.zeros(1), torch.zeros(1)])  # one argument: a list of images
    assert seen == [(1, []), (2, []), (0, ["a"]), (1, [])]
    with pytest.raises(TypeError, match=r"example_input: got int, expected a tensor \(one input batch\), a tuple "
                                        r"of positional arguments, a dict of keyword arguments or a list"):
        call_with_example(m, 3)


def test_a_list_example_input_to_the_lightning_module_says_what_is_accepted():
    from regfw.train.module import RegularizedModule

    with pytest.raises(TypeError, match=r"example_input: got list, expected one input batch as a tensor.*"
                                        r"make_plan\(model, regularizers, example_input=\.\.\.\), which accepts a "
                                        r"tensor, a tuple of positional arguments, a dict of keyword arguments "
                                        r"or a list"):
        RegularizedModule(nn.Linear(3, 2), regularizers={"dropout": {}}, example_input=[torch.zeros(3)])


def test_attention_dropout_that_finds_nothing_names_the_attention_like_modules_it_saw():
    class MyAttention(nn.Module):  # attention by name only: no q/k/v children, no attn_drop
        def __init__(self) -> None:
            super().__init__()
            self.mix = nn.Linear(4, 4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.mix(x)

    model = nn.Sequential(MyAttention(), nn.Linear(4, 2))
    regs = build_regularizers({"attention_dropout": {}})
    plan = make_plan(model, regs, example_input=torch.randn(2, 4))
    assert any("found no attention layer in Sequential; nothing was changed; attention-like modules seen: "
               "MyAttention" in w for w in plan.warnings), plan.warnings


class InPlaceAttention(nn.Module):
    """Attention whose probabilities go through the model's own in-place dropout, built at rate 0 (timm's TNT)."""

    def __init__(self) -> None:
        super().__init__()
        self.qkv, self.attn_drop, self.proj = nn.Linear(8, 24), nn.Dropout(0.0, inplace=True), nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        attn = self.attn_drop((q @ k.transpose(-2, -1)).softmax(dim=-1))
        return self.proj((attn @ v).mean(1))


def test_a_rate_set_on_an_in_place_dropout_keeps_the_training_step_working():
    """The softmax saves its output for the backward pass: masked in place, the backward pass would fail
    ("modified by an inplace operation"). The set row drops out of place, with the same values."""
    model = InPlaceAttention()
    x = torch.randn(4, 5, 8)
    regs = build_regularizers({"attention_dropout": {}})
    plan = make_plan(model, regs, n_examples=1000, example_input=x)
    assert [(r.action, r.anchor) for r in plan.rows()] == [("set", "attn_drop")]
    apply_plan(model, regs, plan)
    assert model.attn_drop.p == plan.rows()[0].rate > 0 and model.attn_drop.inplace is False
    model.train()
    model(x).sum().backward()
    assert model.qkv.weight.grad is not None


class DropRateHead(nn.Module):
    """A classifier head's dropout as timm writes it: ``F.dropout(h, p=self.drop_rate, training=self.training)``."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2, self.drop_rate = nn.Linear(6, 16), nn.Linear(16, 3), 0.3

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.dropout(torch.relu(self.fc1(x)), p=self.drop_rate, training=self.training))


def test_a_functional_hosts_rate_follows_an_assignment_to_its_attribute():
    model = DropRateHead().eval()
    mc_predict(model, torch.randn(4, 6), samples=2, strategy="loop", seed=0)  # finds the host
    assert [(p, rate) for p, _, _, rate in foreign.functional_hosts(model)] == [("", 0.3)]
    assert foreign.get_rate(model) == 0.3 and foreign.rate_attr(model) == "drop_rate"
    model.drop_rate = 0.7  # no longer the value the call was found with: still the attribute that holds the rate
    assert foreign.get_rate(model) == 0.7 and foreign.rate_attr(model) == "drop_rate"
