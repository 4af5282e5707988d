"""The ``l1`` plugin: an L1 penalty on the weight-decay set."""
from __future__ import annotations

import pytest
import torch
from regfw_plugins.l1 import L1, L1Config
from torch import nn

from regfw.errors import ConfigError
from regfw.registry.regularizers import build_regularizers


def test_l1_penalty_and_its_gradient_on_the_decay_set_only():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 4), nn.LayerNorm(4), nn.Linear(4, 3))
    with torch.no_grad():
        model[0].weight[0, 0] = 0.0  # the subgradient at 0 is 0
    reg = L1(L1Config(strength=0.02, exclude=["2.weight"]))
    penalty = reg.penalty(model)
    assert torch.allclose(penalty, 0.02 * model[0].weight.detach().abs().sum(), rtol=1e-6, atol=0)
    penalty.backward()
    assert torch.equal(model[0].weight.grad, 0.02 * torch.sign(model[0].weight.detach()))
    assert model[0].weight.grad[0, 0] == 0.0
    assert all(p.grad is None for p in (model[0].bias, model[1].weight, model[2].weight, model[2].bias))
    assert L1(L1Config(strength=0.0)).penalty(model) is None
    assert reg.describe(model) == ["loss += 0.02 * sum(|w|) over 1 tensor(s), 20 values (the weight_decay decay group)"]


def test_l1_composes_with_weight_decay_and_its_config_is_checked():
    regs = build_regularizers({"l1": {"strength": 1e-4}, "weight_decay": {"mode": "l2"}})
    assert [r.name for r in regs] == ["l1", "weight_decay"]
    with pytest.raises(ConfigError, match=r"regularizers\.l1\.strength: got -1"):
        build_regularizers({"l1": {"strength": -1}})
    with pytest.raises(ConfigError, match=r"regularizers\.l1\.exclude\[0\]: pattern 'nothing' matches no parameter"):
        L1(build_regularizers({"l1": {"exclude": ["nothing"]}})[0].config).penalty(nn.Linear(2, 2))
