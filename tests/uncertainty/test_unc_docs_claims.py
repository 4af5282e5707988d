"""The claims of docs/theory.md section 8 about the regression likelihood and weight decay."""
from __future__ import annotations

import pytest
import torch

from regfw.registry.regularizers import build_regularizers


def test_l2_mode_with_twice_the_strength_is_reg_times_sum_of_squared_weights():
    reg = 0.01
    (wd,) = build_regularizers({"weight_decay": {"mode": "l2", "strength": 2 * reg}})
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    weights = sum(float((m.weight**2).sum()) for m in model if isinstance(m, torch.nn.Linear))
    assert float(wd.penalty(model)) == pytest.approx(reg * weights, rel=1e-6)  # biases not included
    (decoupled,) = build_regularizers({"weight_decay": {}})
    assert decoupled.penalty(model) is None  # the default adds nothing to the loss


def test_torch_weight_decay_is_the_gradient_of_half_its_value_times_all_squares():
    """optimizer.weight_decay (adam, sgd) = 2 * reg reproduces reg * sum(w**2) over every parameter."""
    torch.manual_seed(0)
    a = torch.nn.Linear(3, 2)
    b = torch.nn.Linear(3, 2)
    b.load_state_dict(a.state_dict())
    reg, lr = 0.05, 0.1
    opt_a = torch.optim.SGD(a.parameters(), lr=lr, weight_decay=2 * reg)
    opt_b = torch.optim.SGD(b.parameters(), lr=lr)
    x = torch.randn(5, 3)
    a(x).sum().backward()
    (b(x).sum() + reg * sum((p**2).sum() for p in b.parameters())).backward()
    opt_a.step()
    opt_b.step()
    for pa, pb in zip(a.parameters(), b.parameters(), strict=True):
        assert torch.allclose(pa, pb, atol=1e-7)
