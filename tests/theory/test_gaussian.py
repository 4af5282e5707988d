"""Claim 4: Gaussian dropout N(1, p / (1 - p)) has the mean and variance of Bernoulli dropout at rate p.

Srivastava et al. 2014, section 10: the inverted Bernoulli mask ξ = m / (1 - p), m ~ Bernoulli(1 - p),
has E[ξ] = 1 and Var[ξ] = (1 - p) / (1 - p)^2 - 1 = p / (1 - p); multiplicative noise
ξ ~ N(1, σ²) with σ² = p / (1 - p) matches both moments, so a unit y = Σ w_i ξ_i x_i has the same
mean Σ w_i x_i and variance p / (1 - p) Σ w_i² x_i² under either noise.
"""
from __future__ import annotations

import pytest
import torch

from regfw.layers import GaussianDropout, dropout, gaussian_dropout

N = 1_000_000


def _moments(sample: torch.Tensor) -> tuple[float, float]:
    return float(sample.mean()), float(sample.var())


@pytest.mark.parametrize("p", [0.1, 0.3, 0.5, 0.7])
def test_gaussian_and_bernoulli_noise_share_mean_and_variance(p):
    """Sample both noises from the project's layers (applied to ones) and compare with 1 and
    p / (1 - p). Tolerances are 5 standard errors: SE(mean) = σ / sqrt(N); SE(variance) =
    sqrt((μ4 - σ⁴) / N) with μ4 = 3σ⁴ (Gaussian) or the Bernoulli fourth central moment, plus
    5 σ² / N for the terms of order 1 / N."""
    torch.manual_seed(0)
    var = p / (1 - p)
    ones = torch.ones(N, dtype=torch.float64)
    gauss = gaussian_dropout(ones, p, training=True)
    bern = dropout(ones, p, training=True)
    # Bernoulli: ξ - 1 is 1/(1-p) - 1 = p/(1-p) with prob 1-p and -1 with prob p.
    mu4_bern = (1 - p) * var ** 4 + p * 1.0
    for sample, mu4 in ((gauss, 3 * var ** 2), (bern, mu4_bern)):
        mean, sample_var = _moments(sample)
        assert abs(mean - 1.0) < 5 * (var / N) ** 0.5
        # plus 5 var / N for the O(1/N) terms (the estimated mean), which dominate when μ4 = σ⁴ (p = 0.5)
        assert abs(sample_var - var) < 5 * ((mu4 - var ** 2) / N) ** 0.5 + 5 * var / N


def test_linear_unit_has_the_same_output_moments():
    """y = w · (ξ ⊙ x) under Gaussian and Bernoulli noise at p = 0.4: both sample means within 5 SE
    of w · x and both variances within 3% of p / (1 - p) Σ w_i² x_i² (200,000 draws each)."""
    torch.manual_seed(1)
    p, draws = 0.4, 200_000
    w = torch.randn(16, dtype=torch.float64)
    x = torch.randn(16, dtype=torch.float64)
    mean, var = float(w @ x), p / (1 - p) * float((w ** 2 * x ** 2).sum())
    layer = GaussianDropout(p)
    for y in (layer(x.expand(draws, 16)) @ w, dropout(x.expand(draws, 16), p, training=True) @ w):
        assert abs(float(y.mean()) - mean) < 5 * (var / draws) ** 0.5
        assert float(y.var()) == pytest.approx(var, rel=0.03)
    assert torch.equal(layer.eval()(x), x)  # like inverted dropout, no rescaling at inference
