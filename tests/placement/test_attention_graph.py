"""Attention found by what the forward computes, on hand-written blocks of classes regfw has never seen
(docs/placement.md, rows "attention" and "q/k/v"):

* scores mixed across heads by a weight layer (talking heads) and q/k/v projections wrapped with a
  BatchNorm: still attention; the BatchNorm and the talking-heads layers feed q/k/v/probabilities and
  get no dropout;
* a position-bias module with a table of its own added to the scores: still attention;
* a query read off a convolutional stream with no projection of its own: every unit on that stream's
  residual path feeds q (no dropout after it, no stochastic depth on its branches);
* factorised attention ``q (softmax(k)ᵀ v)``: attention;
* a gated sum of ``softmax(q kᵀ)`` and a positional softmax, renormalised, weighting the values: attention;
* attention pooling (a softmax over one conv's output weighting the features): not attention.

A model with attention takes the Transformer range (0-0.1) for every row, and the sweep's own check
(tests/runtime_graph.py) finds nothing on q/k/v after the plan is applied.
"""
from __future__ import annotations

import warnings

import pytest
import runtime_graph
import torch
from model_checks import injected, placement_failures, stochastic
from torch import nn

from regfw.placement.attention import detect, find
from regfw.placement.kinds import TRANSFORMER_RANGE
from regfw.placement.plan import apply_plan, make_plan
from regfw.placement.surgery import analyse
from regfw.registry.regularizers import build_regularizers

C = 8


class ConvNormProjection(nn.Module):
    """A 1x1 conv and a BatchNorm, one module: a projection wrapped with its norm."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.norm = nn.Conv2d(C, C, 1), nn.BatchNorm2d(C)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.conv(x))


class TalkingHeadsMixer(nn.Module):
    """Two heads; scores mixed across heads by a 1x1 conv before the softmax and another after it."""

    def __init__(self, heads: int = 2) -> None:
        super().__init__()
        self.heads = heads
        self.to_query, self.to_key, self.to_value = ConvNormProjection(), ConvNormProjection(), ConvNormProjection()
        self.mix_before, self.mix_after = nn.Conv2d(heads, heads, 1), nn.Conv2d(heads, heads, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        q = self.to_query(x).reshape(b, self.heads, c // self.heads, h * w).transpose(-1, -2)
        k = self.to_key(x).reshape(b, self.heads, c // self.heads, h * w)
        v = self.to_value(x).reshape(b, self.heads, c // self.heads, h * w).transpose(-1, -2)
        weights = self.mix_after(self.mix_before((q @ k) * 0.5).softmax(dim=-1))
        return (weights @ v).transpose(-1, -2).reshape(b, c, h, w)


class PositionBias(nn.Module):
    """Adds a learned table of its own (a 2-d parameter) to the scores."""

    def __init__(self, n: int) -> None:
        super().__init__()
        self.table = nn.Parameter(torch.randn(n, n) * 0.1)

    def forward(self, scores: torch.Tensor) -> torch.Tensor:
        return scores + self.table


class ConvResidual(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.act, self.conv2 = nn.Conv2d(C, C, 3, padding=1), nn.ReLU(), nn.Conv2d(C, C, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv2(self.act(self.conv1(x)))


class StreamQueryMixer(nn.Module):
    """Keys and values projected from the tokens; the query is a convolutional stream's output, with no
    projection of its own; a position bias module on the scores."""

    def __init__(self, n: int) -> None:
        super().__init__()
        self.stream = nn.Sequential(ConvResidual(), ConvResidual())
        self.to_kv = nn.Linear(C, 2 * C)
        self.bias = PositionBias(n)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        q = self.stream(x).flatten(2).transpose(1, 2)
        k, v = self.to_kv(x.flatten(2).transpose(1, 2)).chunk(2, dim=-1)
        weights = self.bias(q @ k.transpose(-1, -2)).softmax(dim=-1)
        return (weights @ v).transpose(1, 2).reshape(b, c, h, w)


class FactorisedMixer(nn.Module):
    """``q (softmax(k)ᵀ v)`` from one fused projection named after nothing attention-like."""

    def __init__(self) -> None:
        super().__init__()
        self.mix, self.out = nn.Linear(C, 3 * C), nn.Linear(C, C)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.mix(x).chunk(3, dim=-1)
        return self.out(q @ (k.softmax(dim=1).transpose(-1, -2) @ v))


class GatedPositionalMixer(nn.Module):
    """A gated sum of ``softmax(q kᵀ)`` and a softmax of positions, renormalised, weighting the values."""

    def __init__(self, n: int) -> None:
        super().__init__()
        self.pair, self.values, self.where = nn.Linear(C, 2 * C), nn.Linear(C, C), nn.Linear(2, 1)
        self.gate = nn.Parameter(torch.zeros(1))
        self.register_buffer("offsets", torch.randn(n, n, 2, generator=torch.Generator().manual_seed(1)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k = self.pair(x).chunk(2, dim=-1)
        content = (q @ k.transpose(-1, -2)).softmax(dim=-1)
        position = self.where(self.offsets).squeeze(-1).softmax(dim=-1)
        g = torch.sigmoid(self.gate)
        weights = (1 - g) * content + g * position
        weights = weights / weights.sum(dim=-1, keepdim=True)
        return weights @ self.values(x)


class SoftmaxPool(nn.Module):
    """Attention pooling: a softmax over the positions of one conv's output weights the features."""

    def __init__(self) -> None:
        super().__init__()
        self.score, self.transform = nn.Conv2d(C, 1, 1), nn.Conv2d(C, C, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        weights = self.score(x).reshape(b, h * w, 1).softmax(dim=1)
        context = x.reshape(b, c, h * w) @ weights
        return x + self.transform(context.reshape(b, c, 1, 1))


class ConvNet(nn.Module):
    """stem conv -> BN -> ReLU -> ``block`` -> conv -> ReLU -> mean -> Linear."""

    def __init__(self, block: nn.Module) -> None:
        super().__init__()
        self.stem, self.stem_norm, self.stem_act = nn.Conv2d(3, C, 3, padding=1), nn.BatchNorm2d(C), nn.ReLU()
        self.block = block
        self.body, self.body_act = nn.Conv2d(C, C, 3, padding=1), nn.ReLU()
        self.head = nn.Linear(C, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.block(self.stem_act(self.stem_norm(self.stem(x))))
        return self.head(self.body_act(self.body(x)).mean((2, 3)))


class TokenNet(nn.Module):
    """Linear -> ReLU -> ``block`` -> Linear -> ReLU -> mean -> Linear, on (batch, tokens, features)."""

    def __init__(self, block: nn.Module) -> None:
        super().__init__()
        self.embed, self.act, self.block = nn.Linear(6, C), nn.ReLU(), block
        self.body, self.body_act, self.head = nn.Linear(C, C), nn.ReLU(), nn.Linear(C, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body_act(self.body(self.block(self.act(self.embed(x))))).mean(1))


def _image() -> torch.Tensor:
    return torch.randn(4, 3, 4, 4, generator=torch.Generator().manual_seed(0))


def _tokens() -> torch.Tensor:
    return torch.randn(4, 5, 6, generator=torch.Generator().manual_seed(0))


def _plan(model: nn.Module, x: torch.Tensor, section: dict):
    torch.manual_seed(0)
    regs = build_regularizers(section)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        plan = make_plan(model, regs, 10_000, x)
    return regs, plan


def _rows(plan) -> list:
    return [r for r in plan.rows() if r.action in ("after", "before", "set")]


ATTENDING = {
    # name: (model, input, the modules that feed q/k/v, scores or probabilities: nothing after them)
    "talking heads, BN-wrapped projections": (
        lambda: ConvNet(TalkingHeadsMixer()), _image,
        {"block.to_query.conv", "block.to_key.conv", "block.to_value.conv", "block.mix_before", "block.mix_after"}),
    "position bias module, query from a conv stream": (
        lambda: ConvNet(StreamQueryMixer(16)), _image,
        {"block.stream.0.conv2", "block.stream.1.conv2", "block.to_kv", "stem"}),
    "factorised": (lambda: TokenNet(FactorisedMixer()), _tokens, {"block.mix"}),
    "gated sum with a positional softmax": (lambda: TokenNet(GatedPositionalMixer(5)), _tokens,
                                            {"block.pair", "block.values", "block.where"}),
}


@pytest.mark.parametrize("name", list(ATTENDING))
def test_attention_found_by_its_computation_takes_the_transformer_range_and_nothing_goes_on_qkv(name):
    build, make_input, feeders = ATTENDING[name]
    model, x = build(), make_input()
    mm = analyse(model, x)
    assert mm.attention == ["block"], mm.attention_sites
    assert feeders <= mm.qkv, sorted(mm.qkv)
    regs, plan = _plan(model, x, {"dropout": {}})
    rows = _rows(plan)
    assert rows, "the plan places nothing"
    assert not [r.path for r in rows if r.path in feeders and r.kind != "input"]  # input dropout goes before
    high = [f"{r.path} {r.kind} {r.rate}" for r in rows if r.rate > TRANSFORMER_RANGE.high]
    assert not high, high
    apply_plan(model, regs, plan)
    recorded = model.train()
    graph = runtime_graph.record(recorded, x, stochastic)
    assert runtime_graph.attention_operands(graph, graph.consumers())  # the check sees the attention too
    assert "qkv" not in placement_failures(recorded, graph, injected(model), {})


def test_no_stochastic_depth_on_a_branch_that_feeds_a_query():
    model, x = ConvNet(StreamQueryMixer(16)), _image()
    _regs, plan = _plan(model, x, {"drop_path": {}})
    placed = {r.anchor for r in _rows(plan)}
    assert not placed & {"block.stream.0.conv2", "block.stream.1.conv2"}, placed
    notes = [r.reason for r in plan.rows() if r.action == "note" and r.path.startswith("block.stream")]
    assert notes and all("reaches attention's query, key or value" in n for n in notes), notes


def test_attention_pooling_is_not_attention_and_keeps_the_cnn_ranges():
    model, x = ConvNet(nn.Sequential(SoftmaxPool(), SoftmaxPool())), _image()
    mm = analyse(model, x)
    assert mm.attention == [] and mm.qkv == set()
    _regs, plan = _plan(model, x, {"spatial_dropout": {}})
    conv = [r for r in _rows(plan) if r.kind == "conv"]
    assert conv and all(r.rate > TRANSFORMER_RANGE.high for r in conv), [(r.path, r.rate) for r in conv]


@pytest.mark.parametrize("name", list(ATTENDING))
def test_the_fx_graph_finds_the_same_attention_and_feeders_as_a_pass(name):
    build, make_input, _feeders = ATTENDING[name]
    model = build()
    from_pass = detect(model, make_input())
    from_graph, note = find(model)  # no example input: the torch.fx graph
    assert note is None
    leaves = {p for p, m in model.named_modules() if not any(True for _ in m.children())}
    assert ([(s.host, s.how, s.feeders & leaves) for s in from_graph]
            == [(s.host, s.how, s.feeders & leaves) for s in from_pass])  # fx does not call containers
