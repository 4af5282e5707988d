"""The ``drop_path`` plugin: whole samples of a residual branch dropped at the depth-scheduled rate.

Seeds are fixed; every statistical test measures the injected layer inside the model (see
``injected_layers``) and states its tolerance next to its assertion.
"""
from __future__ import annotations

import pytest
import torch
from injected_layers import regularize, seen_after, sigma
from models_zoo import SmallResNet

from regfw.errors import ConfigError
from regfw.registry.regularizers import build_regularizers


def test_drop_path_drops_whole_samples_of_a_branch_at_the_scheduled_rate():
    torch.manual_seed(0)
    model = SmallResNet()
    x = torch.randn(4000, 3, 8, 8)
    plan = regularize(model, x, {"drop_path": {"rate": 0.2}})
    rates = {r.anchor: r.rate for r in plan.rows() if r.action == "after"}
    assert rates == pytest.approx({"layer1.1.bn2": 0.2 / 3, "layer2.0.bn2": 0.4 / 3, "layer2.1.bn2": 0.2})
    for path in ("layer1.1.bn2", "layer2.0.bn2"):  # measure the last block alone
        model.get_submodule(path).regfw_drop_path.p = 0.0
    ref, out = seen_after(model, "layer2.1.bn2", x, reference=True), seen_after(model, "layer2.1.bn2", x)
    dropped = out.flatten(1).abs().sum(1) == 0
    assert abs(dropped.float().mean().item() - 0.2) < 5 * sigma(0.2, len(x))  # n = 4,000 samples
    assert torch.allclose(out[~dropped], ref[~dropped] / 0.8, atol=1e-6)


def test_config_errors_name_the_key_and_the_value():
    with pytest.raises(ConfigError,
                       match=r"regularizers\.drop_path\.depth: got 'cosine', expected one of 'linear', 'uniform'"):
        build_regularizers({"drop_path": {"depth": "cosine"}})
