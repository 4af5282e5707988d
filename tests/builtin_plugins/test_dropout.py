"""The ``dropout`` plugin (``dropout``, ``gaussian_dropout``, ``alpha_dropout``): selected by name,
injected into a model, acting at the planned rate.

Seeds are fixed; every statistical test measures the injected layer inside the model (see
``injected_layers``) and states its tolerance next to its assertion.
"""
from __future__ import annotations

import math

import pytest
import torch
from injected_layers import builtin, only_injected_in_training, regularize, row, seen_after, sigma

from regfw.errors import ConfigError
from regfw.registry.regularizers import build_regularizers


def test_dropout_drops_the_planned_fraction_and_keeps_the_mean():
    model = builtin("mlp")
    x = torch.randn(4000, 64)
    plan = regularize(model, x, {"dropout": {"input": 0, "policy": "default"}})
    p = row(plan, path="body.0").rate
    assert p == 0.5
    ref, out = seen_after(model, "body.1", x, reference=True), seen_after(model, "body.1", x)
    alive = ref != 0
    n = int(alive.sum())  # ~ 512,000 units
    assert abs((out[alive] == 0).float().mean().item() - p) < 5 * sigma(p, n)
    kept = out[alive] != 0
    assert torch.allclose(out[alive][kept], ref[alive][kept] / (1 - p))  # inverted: kept units scaled up


def test_input_dropout_acts_on_the_first_layers_input_at_its_rate():
    model = builtin("mlp")
    x = torch.rand(4000, 64) + 0.1  # no zeros of its own
    plan = regularize(model, x, {"dropout": {"input": 0.15, "hidden": 0}})
    assert row(plan, kind="input").rate == 0.15
    got = []
    model.body[0].register_forward_pre_hook(lambda m, args: got.append(args[0]))
    only_injected_in_training(model)
    torch.manual_seed(1)
    model(x)
    assert abs((got[0] == 0).float().mean().item() - 0.15) < 5 * sigma(0.15, x.numel())  # n = 256,000


def test_classic_dropout_scales_at_inference_not_in_training():
    model = builtin("mlp")
    x = torch.randn(4000, 64)
    regularize(model, x, {"dropout": {"input": 0, "hidden": 0.3, "inverted": False}})
    layer = model.body[1].regfw_dropout
    assert layer.inverted is False and layer.p == 0.3
    relu = torch.relu(model.body[0](x)).detach()
    out = seen_after(model, "body.1", x)
    alive = relu != 0
    assert abs((out[alive] == 0).float().mean().item() - 0.3) < 5 * sigma(0.3, int(alive.sum()))
    kept = out != 0
    assert torch.equal(out[kept], relu[kept])  # training: no scaling
    assert torch.allclose(seen_after(model, "body.1", x, reference=True), relu * 0.7)  # inference: times 1 - p


def test_gaussian_dropout_has_the_moments_of_dropout_at_the_planned_rate():
    model = builtin("mlp")
    x = torch.randn(4000, 64)
    plan = regularize(model, x, {"gaussian_dropout": {"input": 0, "hidden": 0.3}})
    assert row(plan, path="body.0").rate == 0.3
    ref, out = seen_after(model, "body.1", x, reference=True), seen_after(model, "body.1", x)
    alive = ref > 1e-3
    ratio = out[alive] / ref[alive]
    n = ratio.numel()  # ~ 500,000 noise draws with variance v = p / (1 - p) = 0.4286
    v = 0.3 / 0.7
    assert abs(ratio.mean().item() - 1) < 5 * math.sqrt(v / n)
    # The sample variance has standard error ~ v * sqrt(2 / n) ~ 0.0009; allow 0.01.
    assert abs(ratio.var().item() - v) < 0.01


def test_alpha_dropout_uses_its_own_range_and_drops_that_fraction():
    model = builtin("mlp")
    x = torch.randn(4000, 64)
    plan = regularize(model, x, {"alpha_dropout": {"input": 0}}, n=1000)
    p = row(plan, path="body.0").rate
    assert 0.05 <= p <= 0.1 and "range 0.05-0.1" in row(plan, path="body.0").reason
    ref, out = seen_after(model, "body.1", x, reference=True), seen_after(model, "body.1", x)
    alive = ref > 0
    # Klambauer et al. 2017: a dropped unit becomes -alpha' * a * (1 - p), with alpha' = 1.7581 (SELU's
    # negative saturation) and a = ((alpha'^2 p + 1)(1 - p))^(-1/2); kept units become a x + alpha' a p.
    alpha = 1.7580993408473766
    a = ((alpha ** 2 * p + 1) * (1 - p)) ** -0.5
    dropped = torch.isclose(out[alive], torch.tensor(-alpha * a * (1 - p)), atol=1e-6)
    kept = torch.isclose(out[alive], a * ref[alive] + alpha * a * p, atol=1e-5)
    assert bool((dropped | kept).all())
    assert abs(dropped.float().mean().item() - p) < 5 * sigma(p, int(alive.sum()))  # n ~ 512,000


def test_config_errors_name_the_key_and_the_value():
    with pytest.raises(ConfigError, match=r"regularizers\.dropout\.inverted: got 'no', expected true or false"):
        build_regularizers({"dropout": {"inverted": "no"}})
