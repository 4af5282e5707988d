"""``auto`` never loses to ``batched``: on the first call of a size it times both on the same random
state and keeps the faster (regfw/uncertainty/fast/strategy.py)."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from regfw.uncertainty import mc_predict
from regfw.uncertainty.fast import split_model, strategy

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
