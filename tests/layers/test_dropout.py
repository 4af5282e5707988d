"""Dropout, spatial, Gaussian and alpha dropout: statistics with fixed seeds and stated tolerances."""
from __future__ import annotations

import math

import pytest
import torch

from regfw.layers import (
    AlphaDropout,
    Dropout,
    GaussianDropout,
    SpatialDropout,
    SpatialDropout1d,
    SpatialDropout2d,
    SpatialDropout3d,
    dropout,
    spatial_dropout,
)

N = 1_000_000


@pytest.mark.parametrize("p", [0.1, 0.3, 0.5, 0.9])
def test_inverted_dropout_preserves_the_mean(p):
    # mean of Bernoulli(1-p)/(1-p) over N draws: std sqrt(p / ((1-p) N)); allow 5 std.
    torch.manual_seed(0)
    out = Dropout(p).train()(torch.ones(N))
    tol = 5 * math.sqrt(p / ((1 - p) * N))
    assert abs(out.mean().item() - 1.0) < tol
    kept = out[out != 0]
    assert torch.allclose(kept, torch.full_like(kept, 1 / (1 - p)))
    # dropped fraction: binomial std sqrt(p(1-p)/N)
    assert abs((out == 0).float().mean().item() - p) < 5 * math.sqrt(p * (1 - p) / N)


@pytest.mark.parametrize("p", [0.2, 0.5])
def test_classic_dropout_scales_at_inference_and_matches_inverted_in_expectation(p):
    torch.manual_seed(0)
    x = torch.full((N,), 2.0)
    m = Dropout(p, inverted=False)
    train_out = m.train()(x)
    assert set(train_out.unique().tolist()) == {0.0, 2.0}  # no scaling in training
    eval_out = m.eval()(x)
    assert eval_out is not x and torch.allclose(eval_out, x * (1 - p))  # the documented exception
    # E[train] = (1 - p) x = eval output; the inverted scheme has E[train] = x = eval output.
    tol = 5 * 2.0 * math.sqrt(p * (1 - p) / N)
    assert abs(train_out.mean().item() - 2.0 * (1 - p)) < tol
    assert "inverted=False" in repr(m)


def test_dropout_function_defaults_match_module():
    x = torch.randn(1000)
    torch.manual_seed(5)
    a = dropout(x, 0.3)
    torch.manual_seed(5)
    b = Dropout(0.3)(x)
    assert torch.equal(a, b)


# Gaussian dropout's mean and variance against Bernoulli dropout's: tests/theory/test_gaussian.py.


def test_gaussian_dropout_at_rate_one_is_zeros_not_nan():
    out = GaussianDropout(1.0).train()(torch.randn(100))
    assert torch.equal(out, torch.zeros(100))


def test_spatial_dropout_drops_whole_channels_with_inverted_scaling():
    torch.manual_seed(0)
    p = 0.3
    x = torch.ones(200, 50, 4, 4)
    out = spatial_dropout(x, p)
    per_channel = out.flatten(2)
    # each (sample, channel) map is constant: all 0 or all 1/(1-p)
    assert torch.equal(per_channel.amin(-1), per_channel.amax(-1))
    kept = per_channel[..., 0][per_channel[..., 0] != 0]
    assert torch.allclose(kept, torch.full_like(kept, 1 / (1 - p)))
    dropped = (per_channel[..., 0] == 0).float().mean().item()
    assert abs(dropped - p) < 5 * math.sqrt(p * (1 - p) / (200 * 50))


@pytest.mark.parametrize(
    "cls,good,bad",
    [
        (SpatialDropout1d, (2, 3, 5), (2, 3, 5, 5)),
        (SpatialDropout2d, (2, 3, 5, 5), (3, 5, 5)),
        (SpatialDropout3d, (2, 3, 2, 5, 5), (2, 3, 5, 5)),
        (SpatialDropout, (2, 3, 5), (2, 3)),
    ],
)
def test_spatial_dropout_checks_the_rank(cls, good, bad):
    m = cls(0.5).train()
    assert m(torch.ones(good)).shape == good
    with pytest.raises(ValueError, match=str(tuple(bad)).replace("(", r"\(").replace(")", r"\)")):
        m(torch.ones(bad))


def test_alpha_dropout_keeps_selu_normalisation():
    # Klambauer et al. 2017: for zero-mean, unit-variance input the output keeps mean 0 and variance 1.
    torch.manual_seed(0)
    x = torch.randn(N)
    out = AlphaDropout(0.2).train()(x)
    # 5 standard errors: of the mean, sqrt(1/N); of the variance, about sqrt(2/N) for unit variance
    assert abs(out.mean().item()) < 5 * math.sqrt(1 / N)
    assert out.var().item() == pytest.approx(1.0, abs=5 * math.sqrt(2 / N))
    assert not torch.equal(out, x)
