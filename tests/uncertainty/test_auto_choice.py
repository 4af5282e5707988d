"""``auto`` never loses to ``batched``: by default it predicts from the work of the graph's nodes whether its split
beats ``batched`` (regfw/uncertainty/fast/work.py); with ``choose=True`` it times both on the first call of a size
and keeps the faster (regfw/uncertainty/fast/strategy.py)."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from regfw.uncertainty import mc_predict
from regfw.uncertainty.fast import split_model, strategy, work

pytestmark = pytest.mark.usefixtures("one_thread")


def head_only(width: int = 32, depth: int = 6) -> nn.Module:
    """A convolutional trunk (nothing random) and dropout before the classifier only."""
    torch.manual_seed(0)
    layers: list[nn.Module] = [nn.Conv2d(3, width, 3, padding=1), nn.ReLU()]
    for _ in range(depth):
        layers += [nn.Conv2d(width, width, 3, padding=1), nn.ReLU()]
    return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Dropout(0.5), nn.Linear(width, 10)).eval()


class FakeClock:
    """CPU seconds as the strategy reads them: each run takes the next given duration."""

    def __init__(self, *durations: float) -> None:
        self.now, self.durations, self.reads = 0.0, list(durations), 0

    def __call__(self) -> float:
        self.reads += 1
        if self.reads % 2 == 0:  # the end of a timed run
            self.now += self.durations.pop(0)
        return self.now


def inputs() -> torch.Tensor:
    return torch.randn(4, 3, 12, 12, generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize(("auto_s", "batched_s", "kept"), [(1.0, 2.0, "auto"), (1.0, 1.0, "batched"),
                                                           (0.96, 1.0, "batched"), (2.0, 1.0, "batched")])
def test_the_first_call_keeps_the_faster_and_later_calls_reproduce_its_samples(monkeypatch, auto_s, batched_s, kept):
    model, x = head_only(), inputs()
    clock = FakeClock(auto_s, batched_s)
    monkeypatch.setattr(strategy, "clock", clock)
    first = mc_predict(model, x, 8, strategy="auto", seed=5, choose=True)
    split = split_model(model, x)
    assert split.choices == {(4, 8): kept}
    assert split.timings[(4, 8)] == (auto_s, batched_s)
    assert clock.reads == 4  # both strategies timed once
    again = mc_predict(model, x, 8, strategy="auto", seed=5, choose=True)
    assert clock.reads == 4  # decided: not timed again
    assert torch.equal(first.outputs, again.outputs) and torch.equal(first.deterministic, again.deterministic)
    plain = mc_predict(model, x, 8, strategy=kept if kept == "batched" else "auto", seed=5,
                       **({} if kept == "batched" else {"choose": False}))
    assert torch.equal(first.outputs, plain.outputs), f"the first call did not return {kept}'s samples"


def test_a_new_call_size_is_decided_again(monkeypatch):
    model = head_only()
    monkeypatch.setattr(strategy, "clock", FakeClock(1.0, 2.0, 3.0, 1.0))
    mc_predict(model, inputs(), 8, strategy="auto", seed=0, choose=True)
    mc_predict(model, inputs(), 6, strategy="auto", seed=0, choose=True)
    assert split_model(model, inputs()).choices == {(4, 8): "auto", (4, 6): "batched"}


def test_head_only_dropout_keeps_the_split_at_least_twice_as_fast_as_batched():
    """Real CPU time: the trunk is nearly all of the work and runs once instead of T times."""
    model, x = head_only(width=48, depth=8), inputs()
    mc_predict(model, x, 30, strategy="auto", seed=0, choose=True)
    split = split_model(model, x)
    auto_s, batched_s = split.timings[(4, 30)]
    assert split.choices[(4, 30)] == "auto"
    assert batched_s >= 2 * auto_s, f"auto {auto_s:.3f} s CPU vs batched {batched_s:.3f} s"


# --------------------------------------------------------------------------- the default: predicted from the graph


class Centred(nn.Module):
    """Subtracts the batch mean: rows mix, so a split must replay one sample at a time."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x - x.mean(0, keepdim=True)


def row_mixing(depth: int = 12) -> nn.Module:
    """Dropout on the input, then rows that mix, then a deep narrow stack: nothing to reuse, and a replay
    of T passes over a few rows, each paying every layer's call again."""
    torch.manual_seed(0)
    layers: list[nn.Module] = [nn.Flatten(), nn.Dropout(0.2), Centred(), nn.Linear(3 * 12 * 12, 16)]
    for _ in range(depth):
        layers += [nn.ReLU(), nn.Linear(16, 16)]
    return nn.Sequential(*layers).eval()


def test_the_work_meter_counts_a_linear_layers_flops_and_the_bytes_it_writes():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 32), nn.Dropout(0.5), nn.Linear(32, 10)).eval()
    split = split_model(model, torch.randn(5, 64))
    # prefix: the first Linear, 2 x 64 x 32 flops and 32 float32 outputs per row
    assert split.prefix_work == pytest.approx((0.0, 2 * 64 * 32 + work.BYTE_COST * 32 * 4))
    # replay per row: the dropout writes its output (and its mask), the last Linear 2 x 32 x 10 flops
    assert split.replay_work[1] >= 2 * 32 * 10 + work.BYTE_COST * 10 * 4


def test_by_default_auto_runs_the_split_where_the_prediction_says_it_pays(monkeypatch):
    model, x = head_only(width=48, depth=8), inputs()
    monkeypatch.setattr(strategy, "clock", lambda: pytest.fail("the default choice must not read a clock"))
    got = mc_predict(model, x, 30, strategy="auto", seed=3)
    split = split_model(model, x)
    assert split.predicted_ratio(4, 30) < 0.2  # the trunk is nearly all of the work: computed once, not 30 times
    assert split.pays(4, 30) and split.last_run.chunks > 0
    forced = mc_predict(model, x, 30, strategy="auto", seed=3, choose=False)
    assert torch.equal(got.outputs, forced.outputs)


def test_by_default_auto_runs_batched_where_a_replay_one_sample_at_a_time_costs_more(monkeypatch):
    model, x = row_mixing(), inputs()
    monkeypatch.setattr(strategy, "clock", lambda: pytest.fail("the default choice must not read a clock"))
    got = mc_predict(model, x, 30, strategy="auto", seed=3)
    split = split_model(model, x)
    assert split.ok and split.mode == "samples" and not split.pays(4, 30)
    assert split.predicted_ratio(4, 30) > work.MARGIN
    plain = mc_predict(model, x, 30, strategy="batched", seed=3)
    assert torch.equal(got.outputs, plain.outputs) and torch.equal(got.deterministic, plain.deterministic)


def test_by_default_auto_runs_batched_where_its_split_computes_too_little_once(monkeypatch):
    """Dropout on the input: nothing is computed once, so the split can only tie (its prediction is within
    MARGIN) while its node-by-node replay and gathered copies cost more; auto runs batched."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Dropout(0.2), nn.Linear(3 * 12 * 12, 256), nn.ReLU(),
                          nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 10)).eval()
    x = inputs()
    monkeypatch.setattr(strategy, "clock", lambda: pytest.fail("the default choice must not read a clock"))
    got = mc_predict(model, x, 30, strategy="auto", seed=3)
    split = split_model(model, x)
    assert split.ok and split.mode == "rows" and split.reused_share(4) < work.MIN_REUSED
    assert split.predicted_ratio(4, 30) <= work.MARGIN  # the work alone would have kept the split
    assert not split.pays(4, 30)
    plain = mc_predict(model, x, 30, strategy="batched", seed=3)
    assert torch.equal(got.outputs, plain.outputs) and torch.equal(got.deterministic, plain.deterministic)


def test_the_prediction_is_the_same_for_two_builds_of_one_model():
    """A seed's samples may not depend on the machine: the choice is a function of the graph and the sizes."""
    ratios = {split_model(head_only(), inputs()).predicted_ratio(4, 30) for _ in range(2)}
    assert len(ratios) == 1
    ratios = {split_model(row_mixing(), inputs()).predicted_ratio(4, 30) for _ in range(2)}
    assert len(ratios) == 1


def test_an_unknown_choose_value_is_refused():
    with pytest.raises(ValueError, match=r"choose must be 'predict', True or False, got 'fastest'"):
        mc_predict(head_only(), inputs(), 4, strategy="auto", choose="fastest")
