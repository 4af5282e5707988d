"""The gate rule of docs/placement.md: a gating branch is every unit one operand of a product depends on
and the other does not, inside the module that multiplies (only the squashed side where exactly one
operand comes out of a sigmoid / tanh / softmax), and a matrix product weighted by a softmax counts.

The models are written the way libraries write these blocks (focal modulation, global-context
pooling, convolutional relative-position encoding), with class and attribute names regfw has never
seen; each checks the traced pass and, without an example input, the torch.fx graph.
"""
from __future__ import annotations

import pytest
import torch
from torch import nn

from regfw.placement.plan import make_plan
from regfw.placement.surgery import analyse
from regfw.registry.regularizers import build_regularizers


def plan_dropout(model: nn.Module, x):
    regs = build_regularizers({"dropout": {}})
    return make_plan(model, regs, n_examples=1000, example_input=x)


def places(plan) -> dict[str, str]:
    """``path -> anchor`` of the rows that insert a module after a layer."""
    return {r.path: r.anchor for r in plan.rows() if r.action == "after"}


class Lens(nn.Module):
    """Focal modulation: one projection split into a query, a context and per-level weights; each level
    of convolutions refines the context, weighted by its level's slice; the query times a projection of
    the sum. Every level lies on a gate (``ctx * weights`` and ``query * mix(total)``)."""

    def __init__(self, c: int = 6, levels: int = 2) -> None:
        super().__init__()
        self.c, self.levels = c, levels
        self.split_proj = nn.Conv2d(c, 2 * c + levels, 1)
        self.rungs = nn.ModuleList(nn.Sequential(nn.Conv2d(c, c, 3, padding=1, groups=c), nn.GELU())
                                   for _ in range(levels))
        self.mix = nn.Conv2d(c, c, 1)

    def forward(self, x):
        query, ctx, weights = torch.split(self.split_proj(x), (self.c, self.c, self.levels), 1)
        total = 0
        for level, rung in enumerate(self.rungs):
            ctx = rung(ctx)
            total = total + ctx * weights[:, level:level + 1]
        return query * self.mix(total)


class LensNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem, self.lens, self.head = nn.Conv2d(3, 6, 3), Lens(), nn.Linear(6, 3)

    def forward(self, x):
        return self.head(self.lens(torch.relu(self.stem(x))).mean((2, 3)))


class Context(nn.Module):
    """Global-context pooling: a softmax over positions of a one-channel convolution weights the
    features by a matrix product; an MLP of that context, through a sigmoid, scales the features."""

    def __init__(self, c: int = 6) -> None:
        super().__init__()
        self.score = nn.Conv2d(c, 1, 1)
        self.squeeze, self.expand = nn.Conv2d(c, 3, 1), nn.Conv2d(3, c, 1)

    def forward(self, x):
        b, c, h, w = x.shape
        weights = torch.softmax(self.score(x).reshape(b, 1, h * w), dim=-1).unsqueeze(3)
        ctx = (x.reshape(b, c, h * w).unsqueeze(1) @ weights).view(b, c, 1, 1)
        return x * torch.sigmoid(self.expand(torch.relu(self.squeeze(ctx))))


class ContextNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem, self.ctx, self.head = nn.Conv2d(3, 6, 3), Context(), nn.Linear(6, 3)

    def forward(self, x):
        return self.head(self.ctx(torch.relu(self.stem(x))).mean((2, 3)))


class ConvPosition(nn.Module):
    """Convolutional relative-position encoding: the values, split by channels, each through its own
    depthwise convolution, concatenated and multiplied by the queries (``q * conv(v)``)."""

    def __init__(self, c: int = 6, side: int = 4) -> None:
        super().__init__()
        self.side, self.half = side, c // 2
        self.proj = nn.Linear(c, 2 * c)
        self.windows = nn.ModuleList(nn.Conv2d(c // 2, c // 2, k, padding=k // 2, groups=c // 2) for k in (3, 5))
        self.out = nn.Linear(c, c)

    def forward(self, tokens):
        q, v = self.proj(tokens).chunk(2, dim=-1)
        grid = v.transpose(1, 2).unflatten(2, (self.side, self.side))
        parts = [conv(grid[:, i * self.half:(i + 1) * self.half]) for i, conv in enumerate(self.windows)]
        return self.out(q * torch.cat(parts, dim=1).flatten(2).transpose(1, 2))


class ConvPositionNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed, self.pos, self.head = nn.Linear(5, 6), ConvPosition(), nn.Linear(6, 3)

    def forward(self, x):
        return self.head(self.pos(torch.relu(self.embed(x))).mean(1))


CASES = {
    # model, input, the units on a gate, units not on one
    "focal modulation": (LensNet, (2, 3, 9, 9), {"lens.rungs.0.0", "lens.rungs.0.1", "lens.rungs.1.0",
                                                 "lens.rungs.1.1", "lens.mix"}, {"stem"}),
    "global context": (ContextNet, (2, 3, 9, 9), {"ctx.score", "ctx.squeeze", "ctx.expand"}, {"stem"}),
    "convolutional position": (ConvPositionNet, (2, 16, 5), {"pos.windows.0", "pos.windows.1"}, {"embed", "pos.out"}),
}


@pytest.mark.parametrize("example", [True, False], ids=["traced", "fx"])
@pytest.mark.parametrize("case", list(CASES))
def test_every_unit_of_a_gating_branch_is_a_gate(case, example):
    """The whole branch the product's other operand does not depend on is a gate -- past a chain of
    single-consumer units: the levels of focal modulation, each feeding the next and the product, the
    score convolution before a softmax weighting, the parallel convolutions joined by a concatenation --
    and no dropout goes after any of its units."""
    build, shape, gated, free = CASES[case]
    torch.manual_seed(0)
    model = build().eval()
    x = torch.randn(*shape)
    mm = analyse(model, x if example else None)
    assert mm.flow.source == ("trace" if example else "fx")
    assert gated <= mm.gates, sorted(mm.gates)
    assert not free & mm.gates, sorted(mm.gates)
    placed = places(plan_dropout(model, x if example else None))
    assert not gated & set(placed), placed


class Mixer(nn.Module):
    """Two blocks, the second gating its input by a sigmoid of its own projection: the gate stops at the
    module that multiplies (the first block's layers feed both operands' common input)."""

    def __init__(self) -> None:
        super().__init__()
        self.first = nn.Sequential(nn.Linear(4, 8), nn.ReLU())
        self.score = nn.Linear(8, 8)
        self.head = nn.Linear(8, 2)

    def forward(self, x):
        h = self.first(x)
        return self.head(h * torch.sigmoid(self.score(h)))


def test_the_other_operand_s_own_path_and_the_common_input_are_no_gate():
    """Of ``h * sigmoid(score(h))`` only ``score`` is the gate: the layers before the fork feed both."""
    mm = analyse(Mixer().eval(), torch.randn(3, 4))
    assert mm.gates == {"score"}


class InplaceExcite(nn.Module):
    """Squeeze-excitation whose activation and gate are modules acting in place (``ReLU(inplace=True)``)
    and a squashing module (``nn.Hardsigmoid``): every unit of the branch is a gate."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 3)
        self.squeeze, self.act, self.expand = nn.Conv2d(6, 3, 1), nn.ReLU(inplace=True), nn.Conv2d(3, 6, 1)
        self.squash = nn.Hardsigmoid()
        self.head = nn.Linear(6, 3)

    def forward(self, x):
        x = self.conv(x)
        s = self.squash(self.expand(self.act(self.squeeze(x.mean((2, 3), keepdim=True)))))
        return self.head((x * s).mean((2, 3)))


def test_in_place_and_squashing_units_are_on_the_branch():
    mm = analyse(InplaceExcite().eval(), torch.randn(2, 3, 8, 8))
    assert mm.gates == {"squeeze", "act", "expand", "squash"}


class Decoder(nn.Module):
    """A detector's decoding in miniature: the box deltas of the best-scoring positions times the widths
    of the fixed anchors at those positions. The positions come from the scores (of the same features),
    but an index only picks elements: the anchors' values do not depend on the input, so nothing gates."""

    def __init__(self) -> None:
        super().__init__()
        self.trunk, self.score = nn.Linear(4, 8), nn.Linear(8, 1)
        self.delta = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2))
        self.register_buffer("widths", torch.linspace(1.0, 2.0, 6))

    def forward(self, x):
        h = torch.relu(self.trunk(x))
        best = self.score(h).squeeze(-1).topk(3).indices
        return self.delta(h)[best] * self.widths[best].unsqueeze(-1)


def test_an_index_is_no_path():
    mm = analyse(Decoder().eval(), torch.randn(6, 4))
    assert mm.gates == set()


class PositionConv(nn.Module):
    """A convolutional position encoding with its own residual add: ``proj(t) + t``."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Conv2d(1, 1, 3, padding=1)

    def forward(self, t):
        return self.proj(t) + t


class SpatialScale(nn.Module):
    """A block scaled by a spatial map computed from its own output: the map's branch (pooling, a
    convolution, a position encoding with a residual add) is a gate."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(4, 4, 3, padding=1), nn.ReLU())
        self.reduce, self.position = nn.Conv2d(1, 1, 3, padding=1), PositionConv()
        self.out = nn.Conv2d(4, 4, 1)

    def forward(self, x):
        h = self.body(x)
        m = self.position(self.reduce(h.mean(1, keepdim=True)))
        return x + self.out(h * m)


class SpatialNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem, self.block, self.head = nn.Conv2d(3, 4, 3), SpatialScale(), nn.Linear(4, 3)

    def forward(self, x):
        return self.head(self.block(self.stem(x)).mean((2, 3)))


def test_no_stochastic_depth_on_a_residual_branch_inside_a_gate():
    """The position encoding's ``proj(t) + t`` lies on the gate of ``h * m``: DropPath there would drop
    the gate for a sample, so that add gets a note; the block's own residual branch still gets one."""
    regs = build_regularizers({"drop_path": {"rate": 0.1}})
    plan = make_plan(SpatialNet().eval(), regs, n_examples=1000, example_input=torch.randn(2, 3, 10, 10))
    anchors = {r.anchor for r in plan.rows() if r.action == "after"}
    assert anchors == {"block.out"}, [(r.action, r.anchor, r.reason) for r in plan.rows()]
    assert any("on a gate" in r.reason for r in plan.rows() if r.action == "note"), [r.reason for r in plan.rows()]


class TwoStage(nn.Module):
    """A two-stage refinement: coarse boxes, detached (a constant to the second stage, as a detector's
    proposals are), feed a refining MLP whose deltas are scaled by the coarse boxes' widths. The widths
    depend on nothing the training would change through this product: a scale, no gate."""

    def __init__(self) -> None:
        super().__init__()
        self.trunk, self.coarse = nn.Linear(4, 8), nn.Linear(8, 4)
        self.fine = nn.Sequential(nn.Linear(12, 8), nn.ReLU(), nn.Linear(8, 2))

    def forward(self, x):
        h = torch.relu(self.trunk(x))
        boxes = self.coarse(h).detach()
        return self.fine(torch.cat([h, boxes], -1)) * (boxes[:, 2:] - boxes[:, :2])


def test_a_detached_operand_scales_and_gates_nothing():
    mm = analyse(TwoStage().eval(), torch.randn(6, 4))
    assert mm.gates == set()


class Positions(nn.Module):
    """Per-row positions built from the input's shape only (an anchor generator reads the feature maps'
    sizes, never their values)."""

    def forward(self, feats):
        return torch.arange(feats.shape[0], dtype=feats.dtype).unsqueeze(-1) + 1.0


class ScaledByPosition(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.trunk, self.positions = nn.Linear(4, 8), Positions()
        self.delta = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 1))

    def forward(self, x):
        h = torch.relu(self.trunk(x))
        return self.delta(h) * self.positions(h)


def test_a_unit_that_reads_shapes_only_gives_a_scale_not_a_gate():
    """``delta(h) * positions(h)``: the positions depend on ``h``'s shape, not on the input's values."""
    mm = analyse(ScaledByPosition().eval(), torch.randn(6, 4))
    assert mm.gates == set()


class BatchedExcite(nn.Module):
    """Squeeze-excitation behind a batching step written in place (``new_full``, then each image copied
    into its slice, as torchvision's detection transform does): the batch depends on the images."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.squeeze, self.expand = nn.Conv2d(3, 6, 3), nn.Conv2d(6, 3, 1), nn.Conv2d(3, 6, 1)
        self.head = nn.Linear(6, 3)

    def forward(self, images):
        batch = images[0].new_full((len(images), *images[0].shape), 0.0)
        for i, img in enumerate(images):
            batch[i].copy_(img)
        x = self.conv(batch)
        s = torch.sigmoid(self.expand(torch.relu(self.squeeze(x.mean((2, 3), keepdim=True)))))
        return self.head((x * s).mean((2, 3)))


def test_a_batch_written_in_place_depends_on_its_images():
    mm = analyse(BatchedExcite().eval(), [torch.randn(3, 8, 8), torch.randn(3, 8, 8)])
    assert mm.gates == {"squeeze", "expand"}
