"""DropPath / stochastic depth: one Bernoulli per sample, any rank, and the linear depth schedule."""
from __future__ import annotations

import math

import pytest
import torch

from regfw.layers import DropPath, drop_path, drop_path_schedule


@pytest.mark.parametrize("shape", [(4000,), (4000, 3), (4000, 3, 5), (4000, 2, 3, 3), (4000, 2, 2, 2, 2)])
def test_each_sample_is_dropped_or_scaled_as_a_whole(shape):
    torch.manual_seed(0)
    p = 0.25
    x = torch.ones(shape)
    out = DropPath(p).train()(x)
    ratio = out.reshape(shape[0], -1)
    assert torch.equal(ratio.amin(1), ratio.amax(1))  # one factor per sample
    factors = ratio[:, 0]
    kept = factors[factors != 0]
    assert torch.allclose(kept, torch.full_like(kept, 1 / (1 - p)))
    dropped = (factors == 0).float().mean().item()
    assert abs(dropped - p) < 5 * math.sqrt(p * (1 - p) / shape[0])  # 5 binomial std


def test_without_scale_by_keep_kept_samples_are_unchanged():
    torch.manual_seed(0)
    x = torch.randn(100, 4)
    out = drop_path(x, 0.5, scale_by_keep=False)
    keep = out.abs().sum(1) != 0
    assert torch.equal(out[keep], x[keep]) and 0 < keep.sum() < 100


def test_zero_dim_input_is_rejected():
    with pytest.raises(ValueError, match="batch dimension"):
        drop_path(torch.tensor(1.0), 0.5)


def test_schedule_is_linear_from_zero_to_p():
    assert drop_path_schedule(0.2, 5) == pytest.approx([0.0, 0.05, 0.1, 0.15, 0.2])
    sched = drop_path_schedule(0.1, 12)
    assert sched[0] == 0.0 and sched[-1] == 0.1
    assert sched == pytest.approx(torch.linspace(0, 0.1, 12).tolist())
    assert drop_path_schedule(0.3, 1) == [0.3]
    assert drop_path_schedule(0.3, 0) == []


@pytest.mark.parametrize("p,n", [(1.2, 3), (0.1, -1), (0.1, 2.5)])
def test_schedule_validates(p, n):
    with pytest.raises(ValueError):
        drop_path_schedule(p, n)
