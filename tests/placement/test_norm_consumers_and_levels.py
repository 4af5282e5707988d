"""Three placement rules read from the traced graph (docs/placement.md), each on a small hand-written model
whose classes regfw has never seen:

* a place whose output reaches a normalisation through shape ops only, on any of its consumers, gets no
  dropout (a downsampling conv feeding the next block's pre-norm and its residual add);
* the walk past the norm and activation follows a unit called several times when each of its calls pairs
  with one call of the layer (a detection head's tower applied once per feature level), and still stops
  before a unit shared with another path;
* a residual branch that reaches a model output with no weight layer between (two heads summed into the
  output) gets no stochastic depth: nothing goes after an output.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from regfw.placement.plan import apply_plan, make_plan
from regfw.registry.regularizers import build_regularizers


def plan_with(model: nn.Module, x, name: str = "dropout"):
    regs = build_regularizers({name: {}})
    return regs, make_plan(model, regs, n_examples=1000, example_input=x)


def places(plan) -> dict[str, str]:
    """``path -> anchor`` of the rows that insert a module after a layer or a residual branch."""
    return {r.path: r.anchor for r in plan.rows() if r.action == "after"}


def notes(plan) -> dict[str, str]:
    return {r.path: r.reason for r in plan.rows() if r.action == "note"}


# --------------------------------------------------------------------------- a norm among several consumers


class Shuffle(nn.Module):
    """Moves channels last and back: a reshape module (it computes nothing)."""

    def __init__(self, order: list[int]) -> None:
        super().__init__()
        self.order = order

    def forward(self, x):
        return x.permute(*self.order)


class PreNormStage(nn.Module):
    """A downsampling conv, then a pre-norm block ``x + mix(norm(x))`` (the MetaFormer / CoAtNet layout): the
    conv's output goes both to the block's norm and to the residual add. ``via`` says how the norm is reached:
    a norm module, a norm module after a reshape module and an identity, or a normalising function."""

    def __init__(self, via: str) -> None:
        super().__init__()
        self.via = via
        self.down = nn.Conv2d(3, 8, 3, stride=2)
        self.scale = nn.Identity()
        self.last = Shuffle([0, 2, 3, 1])
        self.first = Shuffle([0, 3, 1, 2])
        self.pre = nn.GroupNorm(1, 8)
        self.ln = nn.LayerNorm(8)
        self.mix = nn.Conv2d(8, 8, 1)
        self.act = nn.ReLU()
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        x = self.scale(self.down(x))
        if self.via == "module":
            y = self.pre(x)
        elif self.via == "reshape":
            y = self.first(self.ln(self.last(x)))
        else:
            y = F.layer_norm(x.permute(0, 2, 3, 1), (8,)).permute(0, 3, 1, 2)
        x = x + self.mix(y)
        return self.head(self.act(x).mean((2, 3)))


@pytest.mark.parametrize("via", ["module", "reshape", "function"])
@pytest.mark.parametrize("name", ["dropout", "spatial_dropout"])
def test_no_dropout_where_the_output_also_feeds_a_norm(via, name):
    """``down`` feeds the norm of the next block and the residual add: a dropout after it would be normalised
    by that norm (and shift its statistics at inference), so it gets none, and the plan says why. The
    block's own ``mix`` still gets its dropout."""
    model = PreNormStage(via).eval()
    x = torch.randn(2, 3, 11, 11)
    regs, plan = plan_with(model, x, name)
    got = places(plan)
    assert "down" not in got
    expected = {"module": "pre", "reshape": "ln", "function": "the function 'layer_norm'"}[via]
    assert f"the output of down feeds {expected}, a normalisation" in notes(plan)["down"]
    assert got["mix"] == "mix"
    apply_plan(model, regs, plan)
    assert not hasattr(model.down, f"regfw_{name}")  # (the input dropout before it is another place)


# --------------------------------------------------------------------------- a tower called once per level


class LevelTower(nn.Module):
    """One conv -> GroupNorm -> ReLU tower and a predictor applied to each feature level (a detection head)."""

    def __init__(self) -> None:
        super().__init__()
        self.tower = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.GroupNorm(2, 8), nn.ReLU())
        self.predict = nn.Conv2d(8, 2, 3, padding=1)

    def forward(self, levels):
        return torch.cat([self.predict(self.tower(f)).flatten(1) for f in levels], 1)


class Pyramid(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.smooth = nn.Conv2d(8, 8, 1)
        self.reduce = nn.Conv2d(8, 8, 3, stride=2, padding=1)
        self.heads = LevelTower()

    def forward(self, x):
        f = self.stem(x)
        return self.heads([self.smooth(f), self.reduce(f)])


class SharedAct(nn.Module):
    """A conv called on two levels whose activation module is also called on a third path (a shared module)."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.conv = nn.Conv2d(8, 8, 3, padding=1)
        self.act = nn.ReLU()
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        f = self.stem(x)
        a, b = self.act(self.conv(f)), self.act(self.conv(f[..., ::2, ::2]))
        c = self.act(f * 2)
        return self.head(a.mean((2, 3)) + b.mean((2, 3)) + c.mean((2, 3)))


def test_the_walk_follows_a_tower_called_once_per_level():
    """conv -> GroupNorm -> ReLU, each called twice, each call of the norm and the activation fed by one call of
    the one before: the dropout goes after the activation (a hook there acts at every level), never between
    the conv and its norm."""
    model = Pyramid().eval()
    x = torch.randn(2, 3, 8, 8)
    regs, plan = plan_with(model, x, "spatial_dropout")
    assert plan.context.model_map.flow.calls["heads.tower.1"] == 2
    assert places(plan)["heads.tower.0"] == "heads.tower.2"
    apply_plan(model, regs, plan)
    assert hasattr(model.heads.tower[2], "regfw_spatial_dropout")
    assert not hasattr(model.heads.tower[0], "regfw_spatial_dropout")


def test_the_walk_still_stops_before_a_unit_shared_with_another_path():
    """The activation runs three times for a conv that runs twice: it is shared, so the dropout stays on the
    conv (a hook on the activation would also act on the third path)."""
    regs, plan = plan_with(SharedAct().eval(), torch.randn(2, 3, 8, 8), "spatial_dropout")
    assert plan.context.model_map.flow.calls["act"] == 3
    assert places(plan)["conv"] == "conv"


# --------------------------------------------------------------------------- a residual branch at an output


class SummedHeads(nn.Module):
    """Two classifiers on two depths summed into the output (LR-ASPP's ``low(f) + high(g)``): the add has a
    longer operand, but both operands are outputs."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.deep = nn.Conv2d(8, 8, 3, padding=1)
        self.low = nn.Conv2d(8, 3, 1)
        self.high = nn.Conv2d(8, 3, 1)

    def forward(self, x):
        f = torch.relu(self.stem(x))
        g = torch.relu(self.deep(f))
        return self.low(f) + self.high(g)


class Residual(nn.Module):
    """The same add with a head after it: a residual block, whose branch gets stochastic depth."""

    def __init__(self) -> None:
        super().__init__()
        self.body = SummedHeads()
        self.head = nn.Conv2d(3, 2, 1)

    def forward(self, x):
        return self.head(self.body(x))


def test_no_stochastic_depth_on_a_branch_that_is_an_output():
    regs, plan = plan_with(SummedHeads().eval(), torch.randn(2, 3, 8, 8), "drop_path")
    assert places(plan) == {}
    assert any("the branch's high reaches a model output with no weight layer between" in why
               for why in notes(plan).values())
    regs, plan = plan_with(Residual().eval(), torch.randn(2, 3, 8, 8), "drop_path")
    assert places(plan) == {"body": "body.high"}


# --------------------------------------------------------------------------- a model no capture takes whole


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.conv2 = nn.Conv2d(8, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1)

    def forward(self, x):
        return x + self.conv2(torch.relu(self.conv1(x)))


class Body(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.blocks = nn.Sequential(Block(), Block())

    def forward(self, x):
        return self.blocks(self.stem(x))


class ListDetector(nn.Module):
    """A detector's shape: its forward iterates a list of images (torch.fx cannot trace that) and keeps the
    boxes whose score passes a threshold (a data-dependent branch torch.export cannot capture); its body is a
    plain residual network."""

    def __init__(self) -> None:
        super().__init__()
        self.body = Body()
        self.score = nn.Conv2d(8, 1, 1)

    def forward(self, images):
        x = torch.stack([im for im in images])
        scores = self.score(self.body(x)).flatten(1)
        if bool((scores > 0).any()):
            return scores[scores > 0]
        return scores[:, :1]


def test_residual_adds_are_found_in_the_parts_that_can_be_traced():
    """The whole model cannot be captured: each residual block of the traceable body still gets its stochastic
    depth, and the plan says how the adds were found."""
    model = ListDetector().eval()
    images = [torch.randn(3, 8, 8, generator=torch.Generator().manual_seed(i)) for i in range(2)]
    regs, plan = plan_with(model, images, "drop_path")
    assert places(plan) == {"body.blocks.1": "body.blocks.1.conv2"}
    assert notes(plan)["body.blocks.0"].endswith("block 1 of 2; residual add 'add in body'; rate 0, nothing "
                                                 "inserted")  # the linear depth schedule starts at 0
    assert any(why.startswith("graph: torch.fx of the parts it can trace (body); ListDetector as a whole cannot be "
                              "captured") for why in notes(plan).values())
    with torch.no_grad():
        reference = model(images)
    apply_plan(model, regs, plan)
    with torch.no_grad():
        assert torch.equal(model.eval()(images), reference)
