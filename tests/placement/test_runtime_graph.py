"""The sweep's placement oracle (tests/runtime_graph.py, tests/model_checks.py) finds every failure
class on small models built to show it, and none on the same models with the dropout placed well."""
from __future__ import annotations

import pytest
import runtime_graph
import torch
from model_checks import placement_failures, stochastic
from torch import nn


class Gate(nn.Module):
    """Squeeze-excitation: the pooled branch multiplies the main path."""

    def __init__(self, c: int, drop_in_gate: bool) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(c, c), nn.Linear(c, c)
        self.drop = nn.Dropout(0.5) if drop_in_gate else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(self.fc2(self.drop(torch.relu(self.fc1(x)))))


class Attention(nn.Module):
    def __init__(self, c: int, drop_on_qkv: bool) -> None:
        super().__init__()
        self.proj = nn.Linear(c, 3 * c)  # a fused projection named neither qkv nor q/k/v
        self.drop = nn.Dropout(0.5) if drop_on_qkv else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.drop(self.proj(x)).chunk(3, dim=-1)
        return torch.softmax(q @ k.transpose(-2, -1), dim=-1) @ v


class Dead(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)
        self.drop = nn.Dropout(0.5)  # never called: the weights are used functionally

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.linear(x, self.fc.weight)


CASES = {
    # (bad model, good model, input, failure class)
    "weight->norm": (lambda: nn.Sequential(nn.Linear(4, 8), nn.Dropout(0.5), nn.BatchNorm1d(8), nn.Linear(8, 2)),
                     lambda: nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Dropout(0.5), nn.Linear(8, 2)),
                     (6, 4)),
    "gate": (lambda: nn.Sequential(Gate(4, True), nn.Linear(4, 2)),
             lambda: nn.Sequential(Gate(4, False), nn.Dropout(0.5), nn.Linear(4, 2)), (6, 4)),
    "qkv": (lambda: nn.Sequential(Attention(4, True), nn.Linear(4, 2)),
            lambda: nn.Sequential(nn.Dropout(0.5), Attention(4, False), nn.Linear(4, 2)), (2, 5, 4)),
    "output": (lambda: nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2), nn.Dropout(0.5)),
               lambda: nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Dropout(0.5), nn.Linear(8, 2)), (6, 4)),
    "series": (lambda: nn.Sequential(nn.Linear(4, 8), nn.Dropout(0.5), nn.ReLU(), nn.Dropout(0.3), nn.Linear(8, 2)),
               lambda: nn.Sequential(nn.Linear(4, 8), nn.Dropout(0.5), nn.Linear(8, 8), nn.Dropout(0.3),
                                     nn.Linear(8, 2)), (6, 4)),
    "dead": (Dead, lambda: nn.Sequential(nn.Linear(4, 4), nn.Dropout(0.5), nn.Linear(4, 4)), (6, 4)),
}


def failures(model: nn.Module, shape: tuple[int, ...]) -> dict[str, list[str]]:
    torch.manual_seed(0)
    model.train()
    paths = [p for p, m in model.named_modules() if isinstance(m, nn.Dropout)]
    graph = runtime_graph.record(model, torch.randn(*shape), stochastic)
    return placement_failures(model, graph, paths, {})


@pytest.mark.parametrize("cls", list(CASES))
def test_each_failure_class_is_found_and_a_good_placement_passes(cls):
    bad, good, shape = CASES[cls]
    found = failures(bad(), shape)
    assert cls in found, found
    assert failures(good(), shape) == {}, cls


class ScaledHead(nn.Module):
    """LRASPP's head: a main branch multiplied by a sigmoid scale branch of the same input."""

    def __init__(self, drop_in_scale: bool) -> None:
        super().__init__()
        self.main = nn.Sequential(nn.Linear(4, 4), nn.Dropout(0.5) if not drop_in_scale else nn.Identity())
        self.scale = nn.Sequential(nn.Linear(4, 4), nn.Dropout(0.5) if drop_in_scale else nn.Identity(),
                                   nn.Sigmoid())
        self.out = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.main(x) * self.scale(x))


def test_the_gate_is_the_squashed_branch_of_a_multiply():
    assert "gate" in failures(ScaledHead(drop_in_scale=True), (6, 4))
    assert failures(ScaledHead(drop_in_scale=False), (6, 4)) == {}


class SoftmaxPool(nn.Module):
    """Attention pooling (a global-context block): a softmax over the positions of one linear map of the
    tokens weights the tokens; the pooled context goes through a weight layer and is added back."""

    def __init__(self) -> None:
        super().__init__()
        self.score, self.transform = nn.Linear(4, 1), nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weights = self.score(x).softmax(dim=1)  # [B, N, 1]
        return x + self.transform((x.transpose(1, 2) @ weights).transpose(1, 2))


class Factorised(nn.Module):
    """``q (softmax(k)ᵀ v)``: the softmax is over the keys alone, no ``q kᵀ`` product is formed."""

    def __init__(self) -> None:
        super().__init__()
        self.mix = nn.Linear(4, 12)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.mix(x).chunk(3, dim=-1)
        return q @ (k.softmax(dim=1).transpose(-1, -2) @ v)


def _operands(model: nn.Module) -> list[int]:
    graph = runtime_graph.record(model.eval(), torch.randn(2, 5, 4, generator=torch.Generator().manual_seed(0)),
                                 stochastic)
    return runtime_graph.attention_operands(graph, graph.consumers())


def test_attention_pooling_is_not_attention_even_after_an_earlier_pooling_product():
    # Walking back from the second softmax past its weight op reached the first block's pooling
    # product, and called the second block attention (with the first block's operands as q and k).
    assert _operands(nn.Sequential(SoftmaxPool(), nn.Linear(4, 4), SoftmaxPool())) == []


def test_factorised_attention_is_attention():
    # The softmax of the keys is fed by no product: a walk back from it found no scores.
    assert _operands(Factorised())
    assert _operands(nn.Sequential(SoftmaxPool(), Factorised()))


class TalkingHeads(nn.Module):
    """Scores mixed by a weight layer before the softmax: still attention."""

    def __init__(self) -> None:
        super().__init__()
        self.mix, self.heads = nn.Linear(4, 12), nn.Linear(5, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.mix(x).chunk(3, dim=-1)
        return self.heads(q @ k.transpose(-1, -2)).softmax(dim=-1) @ v


def test_scores_through_a_weight_layer_are_still_scores():
    assert _operands(TalkingHeads())


class MatchedLoss(nn.Module):
    """A detection loss in miniature: the regression of the positions a comparison selects, times a
    per-position constant table (anchor widths) picked by the same indices. The indices only select
    positions: the table's values do not come from the features, so nothing here is a gate."""

    def __init__(self, drop: bool) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)
        self.drop = nn.Dropout(0.5) if drop else nn.Identity()
        self.register_buffer("widths", torch.arange(1.0, 7.0))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        reg = self.drop(torch.relu(self.fc(x)))
        fg = (x[:, 0] > 0).nonzero().squeeze(1)  # the matched positions, computed from the input
        return reg[fg, 0] * self.widths[fg]


class FactoryScale(nn.Module):
    """``h * ramp`` where the ramp is built by ``ones_like(x)``: the factory reads ``x``'s shape only."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)
        self.drop = nn.Dropout(0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(torch.relu(self.fc(x))) * torch.ones_like(x).cumsum(-1)


class WeightedLoss(nn.Module):
    """A focal loss in miniature: the per-element loss of the logits against a target scattered into
    ``zeros_like(logits)`` at matched positions, times class weights computed from that target alone.
    The weights depend on the labels, not on the input: a scale of the loss, no gate."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)
        self.drop = nn.Dropout(0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.fc(self.drop(torch.relu(self.fc(x))))
        target = torch.zeros_like(logits)
        target[torch.arange(len(x)), (x[:, 0] > 0).long()] = 1.0
        loss = nn.functional.binary_cross_entropy_with_logits(logits, target, reduction="none")
        return (0.25 * target + 0.75 * (1 - target)) * loss


class IndexedGate(nn.Module):
    """The positive control: both operands are values of ``x`` (indexed alike), one squashed: a gate."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)
        self.drop = nn.Dropout(0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        fg = (x[:, 0] > 0).nonzero().squeeze(1)
        return x[fg] * torch.sigmoid(self.drop(torch.relu(self.fc(x))))[fg]


class Batched(nn.Module):
    """A squeeze-excitation gate with a dropout inside, behind a batching step as torchvision's detection
    transform writes it: ``new_full`` of the batch shape, then each image copied into its slice."""

    def __init__(self) -> None:
        super().__init__()
        self.gate = Gate(4, True)

    def forward(self, images: list[torch.Tensor]) -> torch.Tensor:
        batch = images[0].new_full((len(images), *images[0].shape), 0.0)
        for i, img in enumerate(images):
            batch[i].copy_(img)
        return self.gate(batch)


def test_a_batch_written_in_place_depends_on_its_images():
    torch.manual_seed(0)
    graph = runtime_graph.record(Batched().train(), [torch.randn(4), torch.randn(4)], stochastic)
    assert graph.modules["gate.drop"][0] in runtime_graph.gate_nodes(graph)


def test_shared_indices_shape_factories_and_labels_make_no_gate():
    """An index or mask selects positions, a ``*_like`` factory reads a shape, a target holds labels:
    none is a path of the input, so a dropout on a path multiplied by a value they produce is on no gate
    (the recorded training pass of RetinaNet put its whole backbone "on a gate" through its box loss's
    matched indices and its focal loss's class weights); a dropout on a sigmoid branch indexed the same
    way still is."""
    x = torch.tensor([[1.0, 0, 0, 0], [-1, 0, 0, 0], [2, 1, 0, 0], [3, 0, 1, 0], [-2, 1, 1, 1], [1, 1, 1, 1]])
    for model in (MatchedLoss(drop=True), FactoryScale(), WeightedLoss()):
        model.train()
        graph = runtime_graph.record(model, x, stochastic)
        drop = graph.modules["drop"][0]
        assert drop not in runtime_graph.gate_nodes(graph), type(model).__name__
    graph = runtime_graph.record(IndexedGate().train(), x, stochastic)
    assert graph.modules["drop"][0] in runtime_graph.gate_nodes(graph)
