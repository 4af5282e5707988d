"""Claim 1: inverted dropout keeps the expectation; classic dropout needs weight scaling at inference.

Srivastava et al. 2014, section 4 (classic: scale weights by the keep probability at test time);
inverted dropout moves the ``1 / (1 - p)`` into training so inference is the identity.
"""
from __future__ import annotations

import pytest
import torch
from torch import nn

from regfw.layers import Dropout, dropout

from .masks import all_masks, mask_probs


@pytest.mark.parametrize("p", [0.1, 0.5, 0.8])
def test_inverted_expectation_exact_by_enumeration(p):
    """E[m * x / (1 - p)] = x, summing over all 2^10 masks with their probabilities (exact)."""
    torch.manual_seed(0)
    x = torch.randn(10, dtype=torch.float64)
    masks = all_masks(10)
    probs = mask_probs(masks, p)
    assert float(probs.sum()) == pytest.approx(1.0, abs=1e-12)
    expectation = (probs[:, None] * masks * x / (1 - p)).sum(0)
    torch.testing.assert_close(expectation, x, rtol=0, atol=1e-12)
    classic = (probs[:, None] * masks * x).sum(0)  # no scaling in training
    torch.testing.assert_close(classic, (1 - p) * x, rtol=0, atol=1e-12)


@pytest.mark.parametrize("p", [0.2, 0.5])
def test_inverted_layer_mean_matches_input(p):
    """The project's inverted dropout: the sample mean over N draws is x within 5 standard errors.

    Each output is x_i * m / (1 - p) with m ~ Bernoulli(1 - p): variance x_i^2 p / (1 - p), so the
    standard error of the mean of N draws is |x_i| sqrt(p / (1 - p) / N).
    """
    torch.manual_seed(1)
    n_draws = 200_000
    x = torch.randn(8, dtype=torch.float64)
    out = dropout(x.expand(n_draws, 8), p, training=True)
    kept = out != 0
    torch.testing.assert_close(out[kept], (x.expand(n_draws, 8) / (1 - p))[kept])  # values: 0 or x / (1 - p)
    se = x.abs() * (p / (1 - p) / n_draws) ** 0.5
    assert torch.all((out.mean(0) - x).abs() < 5 * se)
    assert torch.equal(Dropout(p).eval()(x), x)  # inference is the identity


@pytest.mark.parametrize("p", [0.2, 0.5])
def test_classic_dropout_scales_at_inference(p):
    """Classic dropout (``inverted=False``) gives (1 - p) x in expectation during training, and its
    inference output is exactly (1 - p) x: the expected training activation."""
    torch.manual_seed(2)
    n_draws = 200_000
    x = torch.randn(8, dtype=torch.float64)
    layer = Dropout(p, inverted=False)
    out = layer(x.expand(n_draws, 8))
    se = x.abs() * (p * (1 - p) / n_draws) ** 0.5
    assert torch.all((out.mean(0) - (1 - p) * x).abs() < 5 * se)
    torch.testing.assert_close(layer.eval()(x), (1 - p) * x, rtol=0, atol=1e-15)


def test_classic_inference_equals_weight_scaling():
    """Classic dropout before a linear layer, at inference, is the same network with its weights
    multiplied by the keep probability (the paper's weight-scaling rule); without the scaling the
    inference output is off by a factor 1 / (1 - p) from the expected training output."""
    torch.manual_seed(3)
    p = 0.4
    linear = nn.Linear(6, 3, dtype=torch.float64)
    net = nn.Sequential(Dropout(p, inverted=False), linear).eval()
    scaled = nn.Linear(6, 3, dtype=torch.float64)
    with torch.no_grad():
        scaled.weight.copy_(linear.weight * (1 - p))
        scaled.bias.copy_(linear.bias)
    x = torch.randn(5, 6, dtype=torch.float64)
    torch.testing.assert_close(net(x), scaled(x), rtol=0, atol=1e-12)
    masks = all_masks(6)
    probs = mask_probs(masks, p)
    expected_train = torch.einsum("k,kbj->bj", probs, linear(masks[:, None, :] * x))
    torch.testing.assert_close(net(x), expected_train, rtol=0, atol=1e-12)
    unscaled = linear(x)
    assert (unscaled - expected_train).abs().max() > 0.05  # forgetting the scaling is visibly wrong
