"""Claim 3: the weight-scaled network is the normalised geometric mean of the 2^n subnetworks --
exactly for a single softmax layer, approximately for deeper networks.

Hinton et al. 2012 and Srivastava et al. 2014 (section 7.5); Baldi & Sadowski, "Understanding
Dropout", NeurIPS 2013, prove the single-layer identity. With masks weighted by their
probabilities P(m), the normalised weighted geometric mean of softmax predictions is

    G_c  ∝  exp( Σ_m P(m) log softmax(W (m ⊙ x) + b)_c )  =  softmax(W E[m ⊙ x] + b)_c

because log softmax(z)_c = z_c - logsumexp(z) is linear in z up to a term that does not depend on
the class c and cancels in the normalisation. With p = 0.5 every mask has the same weight and G is
the plain geometric mean over the 2^n subnetworks.
"""
from __future__ import annotations

import pytest
import torch
from torch import nn

from regfw.layers import Dropout

from .masks import all_masks, mask_probs


def normalized_geometric_mean(log_probs: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """``log_probs [K, B, C]`` of K subnetworks, ``weights [K]`` summing to 1 -> ``[B, C]``."""
    return torch.softmax(torch.einsum("k,kbc->bc", weights, log_probs), dim=-1)


@pytest.mark.parametrize("inverted", [False, True])
@pytest.mark.parametrize("p", [0.5, 0.2])
def test_single_softmax_layer_is_exactly_the_geometric_mean(p, inverted):
    """n = 12 inputs: all 4,096 subnetworks enumerated at once; the project's dropout layer followed by
    the linear layer, in eval mode (weight scaling), equals their geometric mean to 1e-12."""
    torch.manual_seed(0)
    n, classes = 12, 5
    linear = nn.Linear(n, classes, dtype=torch.float64)
    net = nn.Sequential(Dropout(p, inverted=inverted), linear).eval()
    x = torch.randn(8, n, dtype=torch.float64)
    masks = all_masks(n)
    scale = 1 / (1 - p) if inverted else 1.0  # what the layer does to kept units in training
    with torch.no_grad():
        log_probs = torch.log_softmax(linear(masks[:, None, :] * x * scale), dim=-1)  # [4096, 8, 5]
        geometric = normalized_geometric_mean(log_probs, mask_probs(masks, p))
        weight_scaled = torch.softmax(net(x), dim=-1)
        arithmetic = torch.einsum("k,kbc->bc", mask_probs(masks, p), log_probs.exp())
    torch.testing.assert_close(weight_scaled, geometric, rtol=0, atol=1e-12)
    # It is the geometric mean specifically: the arithmetic mean of the predictions differs.
    assert (arithmetic - weight_scaled).abs().max() > 1e-3


def _deep_gap(p: float) -> float:
    """Max |G - weight-scaled| over a batch, for input (6 units) and hidden (6 units) dropout in a
    ReLU network: all 2^12 joint masks enumerated."""
    torch.manual_seed(0)
    d, h, classes = 6, 6, 4
    first = nn.Linear(d, h, dtype=torch.float64)
    second = nn.Linear(h, classes, dtype=torch.float64)
    x = torch.randn(32, d, dtype=torch.float64)
    masks = all_masks(d + h)
    m_in, m_hid = masks[:, None, :d], masks[:, None, d:]
    with torch.no_grad():
        hidden = torch.relu(first(m_in * x / (1 - p)))
        log_probs = torch.log_softmax(second(m_hid * hidden / (1 - p)), dim=-1)
        geometric = normalized_geometric_mean(log_probs, mask_probs(masks, p))
        net = nn.Sequential(Dropout(p), first, nn.ReLU(), Dropout(p), second).eval()
        weight_scaled = torch.softmax(net(x), dim=-1)
    return float((geometric - weight_scaled).abs().max())


def test_deeper_network_is_only_approximately_the_geometric_mean():
    """Through a ReLU the identity breaks: E[relu(W m x)] != relu(W E[m x]). Measured (seeded
    nn.Linear initialisation, 32 inputs): the largest probability gap is 5.2e-4 at p = 0.01, 7.8e-3 at
    p = 0.1 and 0.043 at p = 0.5 -- orders of magnitude above the 1e-12 of the single-layer case,
    growing with p, and small enough that weight scaling is a good approximation."""
    gaps = {p: _deep_gap(p) for p in (0.01, 0.1, 0.5)}
    assert gaps[0.01] > 1e-4  # not exact even for a small rate (the exact case agrees to 1e-12)
    assert gaps[0.01] < gaps[0.1] < gaps[0.5]
    assert gaps[0.5] < 0.1  # but a close approximation
