"""The ``conv_dropout`` plugin (``spatial_dropout``, ``dropblock``): whole channels and blocks of
convolutional maps dropped at the planned rate.

Seeds are fixed; every statistical test measures the injected layer inside the model (see
``injected_layers``) and states its tolerance next to its assertion.
"""
from __future__ import annotations

import pytest
import torch
from injected_layers import builtin, regularize, row, seen_after, sigma

from regfw.errors import ConfigError
from regfw.registry.regularizers import build_regularizers


def test_spatial_dropout_drops_the_planned_share_of_whole_channels():
    model = builtin("cnn")
    x = torch.randn(2000, 64)
    plan = regularize(model, x, {"spatial_dropout": {"conv": 0.2}, "dropout": {"conv": 0, "input": 0, "hidden": 0}})
    assert row(plan, path="features.0").anchor == "features.2"
    ref, out = seen_after(model, "features.2", x, reference=True), seen_after(model, "features.2", x)
    live = ref.flatten(2).abs().sum(-1) > 0  # (N, C) maps with any activation
    dead = out.flatten(2).abs().sum(-1) == 0
    partly = ((out == 0) & (ref != 0)).flatten(2).any(-1) & ~dead
    assert not partly.any()  # whole channels or nothing
    n = int(live.sum())  # ~ 32,000 channels
    assert abs(dead[live].float().mean().item() - 0.2) < 5 * sigma(0.2, n)


@pytest.mark.parametrize("block", [3, 5])
def test_dropblock_drops_the_planned_fraction_on_small_maps(block):
    model = builtin("cnn")  # 8x8 maps
    x = torch.randn(1000, 64)
    plan = regularize(model, x, {"dropblock": {"block_size": block}, "dropout": {"conv": 0, "input": 0, "hidden": 0}})
    p = row(plan, path="features.0").rate  # policy: 0.2988 for N=1000, P=13,802
    ref, out = seen_after(model, "features.2", x, reference=True), seen_after(model, "features.2", x)
    alive = ref != 0
    # The claim: the target fraction within 1.5 percentage points (here 16,000 maps).
    assert abs((out[alive] == 0).float().mean().item() - p) < 0.015


def test_config_errors_name_the_key_and_the_value():
    with pytest.raises(ConfigError,
                       match=r"regularizers\.spatial_dropout\.conv: got 1\.5, expected a value in \[0, 1\)"):
        build_regularizers({"spatial_dropout": {"conv": 1.5}})
    with pytest.raises(ConfigError, match=r"regularizers\.dropblock\.block_size: got \[3, 0\], expected a positive"):
        build_regularizers({"dropblock": {"block_size": [3, 0]}})
    (dropblock,) = build_regularizers({"dropblock": {"block_size": [3, 5]}})
    assert dropblock.make_module("conv", 0.1, None).block_size == (3, 5)
