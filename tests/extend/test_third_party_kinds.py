"""What a third-party InjectingRegularizer gets through regfw.extend: residual branches and a rate per layer."""
from __future__ import annotations

import torch
from torch import nn

from regfw.extend import HIDDEN, RESIDUAL, InjectingRegularizer, LayerInfo, PlanContext, PlanItem
from regfw.layers import DropPath
from regfw.placement.plan import apply_plan, make_plan


class Block(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(width, width), nn.ReLU(), nn.Linear(width, width))

    def forward(self, x):
        return x + self.body(x)


def resnet_mlp(blocks: int = 3, width: int = 8) -> nn.Module:
    return nn.Sequential(nn.Linear(4, width), *[Block(width) for _ in range(blocks)], nn.Linear(width, 2))


class BranchNoise(InjectingRegularizer):
    """Residual kind only: rates from the table, the same on every block (the default profile)."""

    name = "branch_noise"
    kinds = (RESIDUAL,)

    def make_module(self, kind: str, rate: float, item: PlanItem) -> nn.Module:
        return DropPath(rate)


class WidthScaled(InjectingRegularizer):
    """Hidden kind: the rate depends on the layer (its width), which rate_for sees."""

    name = "width_scaled"
    kinds = (HIDDEN,)

    def rate_for(self, kind: str, ctx: PlanContext, layer: LayerInfo | None = None) -> tuple[float | None, str]:
        assert layer is not None
        width = layer.module.out_features
        return min(0.5, width / 64), f"{width} units / 64"

    def make_module(self, kind: str, rate: float, item: PlanItem) -> nn.Module:
        return nn.Dropout(rate)


def _ctx_plan(model, regs):
    return make_plan(model, regs, example_input=torch.randn(2, 4), n_examples=1000)


def test_a_third_party_residual_regularizer_gets_every_branch():
    torch.manual_seed(0)
    model = resnet_mlp()
    reg = BranchNoise(BranchNoise.Config(residual=0.2))
    plan = _ctx_plan(model, [reg])
    rows = [r for r in plan.rows() if r.action == "after"]
    assert [r.kind for r in rows] == [RESIDUAL] * 3
    assert [r.rate for r in rows] == [0.2, 0.2, 0.2]
    assert all(r.anchor.startswith(f"{i}.body") for i, r in zip((1, 2, 3), rows, strict=True)), rows
    before = model.eval()(x := torch.randn(5, 4)).clone()
    apply_plan(model, [reg], plan)
    assert torch.equal(model.eval()(x), before)  # eval unchanged
    assert sum(isinstance(m, DropPath) for m in model.modules()) == 3


def test_rate_for_sees_the_layer():
    model = nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 2))
    plan = _ctx_plan(model, [WidthScaled()])
    rates = {r.path: (r.rate, r.reason.split(";")[0]) for r in plan.rows() if r.action == "after"}
    assert rates == {"0": (0.25, "16 units / 64"), "2": (0.5, "32 units / 64")}


def test_an_override_of_rate_for_without_the_layer_still_works():
    class Old(WidthScaled):
        name = "old_style"

        def rate_for(self, kind, ctx):  # written before rate_for took the layer
            return 0.3, "fixed"

    model = nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 2))
    plan = _ctx_plan(model, [Old()])
    assert [(r.rate, r.reason.split(";")[0]) for r in plan.rows() if r.action == "after"] == [(0.3, "fixed")]
