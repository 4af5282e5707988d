"""A regularizer declares its own rate range per kind (``rate_ranges``) and the plan uses it."""
from __future__ import annotations

import sys
import types
from dataclasses import dataclass

import pytest
from torch import nn

import regfw
from regfw.config.schema import rate
from regfw.extend.regularizer import InjectingRegularizer, InjectionConfig
from regfw.layers import Dropout
from regfw.placement.kinds import HIDDEN
from regfw.placement.plan import make_plan
from regfw.registry.discovery import register_plugin, unregister_plugin
from regfw.registry.regularizers import build_regularizers


@dataclass
class NarrowConfig(InjectionConfig):
    hidden: float | None = rate()


class Narrow(InjectingRegularizer):
    """A third-party variant whose hidden rate lives in 0.05-0.15, not the table's 0.3-0.5."""

    name = "narrow_dropout"
    family = "narrow"
    Config = NarrowConfig
    kinds = (HIDDEN,)
    rate_ranges = {HIDDEN: (0.05, 0.15)}

    def make_module(self, kind, rate, item):
        return Dropout(rate)


@pytest.fixture
def narrow_plugin(monkeypatch):
    module = types.ModuleType("regfw_narrow")
    monkeypatch.setitem(sys.modules, "regfw_narrow", module)

    @regfw.hookimpl
    def regfw_register_regularizers(register):
        register(Narrow)

    module.regfw_register_regularizers = regfw_register_regularizers
    register_plugin(module, "narrow")
    yield
    unregister_plugin("narrow")


def mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 2))


@pytest.mark.usefixtures("narrow_plugin")
# A 450-parameter MLP scores 1 on model size; 100 examples score 1 on data size, 1e7 score 0: the
# policy puts the rate at the top of the range, then half way (see regfw.placement.kinds.policy_rate).
@pytest.mark.parametrize("n_examples, expected", [(100, 0.15), (10**7, 0.10)])
def test_a_third_party_range_feeds_the_plan(n_examples, expected):
    regs = build_regularizers({"narrow_dropout": {}, "dropout": {"input": 0}})
    plan = make_plan(mlp(), regs, n_examples=n_examples)
    narrow = [r for r in plan.rows() if r.regularizer == "narrow_dropout"]
    table = [r for r in plan.rows() if r.regularizer == "dropout"]
    assert [r.path for r in narrow] == ["0", "2"]
    assert all(r.rate == pytest.approx(expected, abs=1e-4) for r in narrow)
    assert all("range 0.05-0.15" in r.reason for r in narrow)
    # The table's own regularizer on the same model still gets the table's range.
    assert table and all(0.3 <= r.rate <= 0.5 and "range 0.3-0.5" in r.reason for r in table)


@pytest.mark.usefixtures("narrow_plugin")
def test_policy_default_takes_the_middle_of_a_two_number_range():
    plan = make_plan(mlp(), build_regularizers({"narrow_dropout": {"policy": "default"}}), n_examples=100)
    assert [r.rate for r in plan.rows()] == pytest.approx([0.1, 0.1])
    assert all(r.reason.startswith("default (rate table)") for r in plan.rows())
