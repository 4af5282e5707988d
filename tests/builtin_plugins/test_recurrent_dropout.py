"""The ``recurrent_dropout`` plugin (``locked_dropout``, ``dropconnect``): one mask over time, and
dropped hidden-to-hidden weights, at the planned rate.

Seeds are fixed; every statistical test measures the injected layer inside the model (see
``injected_layers``) and states its tolerance next to its assertion.
"""
from __future__ import annotations

import torch
from injected_layers import builtin, only_injected_in_training, regularize, row, seen_after, sigma


def test_locked_dropout_shares_one_mask_over_time_at_the_planned_rate():
    model = builtin("lstm")  # batch_first=True
    x = torch.randn(3000, 64)
    plan = regularize(model, x, {"locked_dropout": {}, "dropout": {"recurrent": 0, "input": 0}})
    p = row(plan, path="rnn").rate
    assert 0.2 <= p <= 0.3 and row(plan, path="rnn").options == {"batch_first": True}
    out = seen_after(model, "rnn", x)[0]  # (N, T, H)
    zero = out == 0
    per_unit = zero.all(dim=1)  # one decision per (sample, unit), for every time step
    assert torch.equal(zero.any(dim=1), per_unit)
    assert abs(per_unit.float().mean().item() - p) < 5 * sigma(p, per_unit.numel())  # n = 192,000


def test_dropconnect_drops_the_planned_fraction_of_hidden_to_hidden_weights():
    model = builtin("lstm")
    x = torch.randn(16, 64)
    keys = list(model.state_dict())
    plan = regularize(model, x, {"dropconnect": {"recurrent": 0.4}})
    assert row(plan, path="rnn").action == "wrap" and "weight_hh_l0" in row(plan, path="rnn").reason
    assert list(model.state_dict()) == keys
    index = model.rnn._flat_weights_names.index("weight_hh_l0")
    seen = []
    model.rnn.register_forward_pre_hook(lambda m, args: seen.append(m._flat_weights[index].detach().clone()))
    only_injected_in_training(model)
    model.rnn.weight_drop.train()
    torch.manual_seed(0)
    for _ in range(10):
        model(x)
    dropped = torch.stack(seen) == 0
    assert abs(dropped.float().mean().item() - 0.4) < 5 * sigma(0.4, dropped.numel())  # n = 163,840
    assert torch.count_nonzero(model.rnn.weight_hh_l0) == model.rnn.weight_hh_l0.numel()  # parameter intact
