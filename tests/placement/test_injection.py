"""The `dropout` regularizer end to end on the built-in models: kinds, rates, scaling."""
from __future__ import annotations

import pytest
import torch

from regfw.build.datasets import DigitsDataModule
from regfw.build.models import BUILTIN_MODELS
from regfw.placement import kinds as K
from regfw.train.module import RegularizedModule


@pytest.fixture(scope="module")
def digits():
    return DigitsDataModule(seed=0)


def build(name, digits, **dropout):
    return RegularizedModule(model_config={"name": name, "init_args": {"in_features": 64, "num_outputs": 10}},
                             regularizers={"dropout": dropout}, n_examples=digits.n_train,
                             example_input=digits.example_input())


@pytest.mark.parametrize("name, expected_kinds", [
    ("mlp", ["input", "hidden", "hidden"]),
    ("cnn", ["input", "conv", "conv", "hidden"]),
    ("lstm", ["input", "recurrent"]),
])
def test_rates_by_kind_come_from_the_table(digits, name, expected_kinds):
    module = build(name, digits)
    rows = module.plan.rows()
    assert [r.kind for r in rows] == expected_kinds
    for row in rows:
        rng = K.RATE_TABLE[row.kind]
        assert rng.low <= row.rate <= rng.high, row
        assert row.reason.startswith("policy")
    default = build(name, digits, policy="default")
    assert {r.kind: r.rate for r in default.plan.rows()} == {k: K.RATE_TABLE[k].default for k in expected_kinds}


def test_explicit_rate_wins_and_zero_switches_a_kind_off(digits):
    module = build("cnn", digits, conv=0.15, input=0.0)
    rows = {(r.path, r.kind): r for r in module.plan.rows()}
    assert all(r.kind != "input" for r in rows.values())
    conv = [r for r in rows.values() if r.kind == "conv"]
    assert conv and all(r.rate == 0.15 and r.reason.startswith("explicit") for r in conv)


def test_output_layer_gets_no_dropout_and_parameter_names_are_unchanged(digits):
    module = build("mlp", digits)
    assert all(r.path != "head" for r in module.plan.rows())
    plain = BUILTIN_MODELS["mlp"](in_features=64, num_outputs=10)
    assert list(module.model.state_dict()) == list(plain.state_dict())


def test_inverted_dropout_preserves_the_mean(digits):
    """E[m * x / (1 - p)] = x: with n = 200,000 units at p = 0.48 the sample mean of the output
    over a constant input has standard error sqrt(p / (1 - p) / n) ~ 0.0022; allow 5 sigma."""
    module = build("mlp", digits, policy="default")
    module.train()
    layer = module.model.body[1].regfw_dropout  # after the first hidden layer's ReLU
    torch.manual_seed(0)
    x = torch.ones(200_000)
    out = layer(x)
    p = layer.p
    assert abs(out.mean().item() - 1.0) < 5 * (p / (1 - p) / x.numel()) ** 0.5
    assert abs((out == 0).float().mean().item() - p) < 5 * (p * (1 - p) / x.numel()) ** 0.5
    module.eval()
    assert torch.equal(layer(x), x)


def test_keeping_an_existing_dropout_is_not_reported_as_nothing_found():
    import warnings

    from torch import nn

    net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Dropout(0.2), nn.Linear(8, 2))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # "found no layer" would be wrong here: the layer is kept as it is
        module = RegularizedModule(net, regularizers={"dropout": {"existing": "keep", "input": 0}},
                                   example_input=torch.zeros(2, 4))
    assert module.plan.rows() == [] and net[2].p == 0.2
    with pytest.warns(UserWarning, match="found no layer of kinds"):
        RegularizedModule(nn.Sequential(nn.Flatten()), regularizers={"dropout": {}}, example_input=torch.zeros(2, 4))
