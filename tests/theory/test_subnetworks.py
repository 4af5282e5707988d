"""Claim 2: a layer of n units under dropout has 2^n thinned subnetworks, and dropout samples them.

Srivastava et al. 2014, section 2: "a neural net with n units can be seen as a collection of 2^n
possible thinned neural networks"; training with dropout trains all of them with shared weights.
"""
from __future__ import annotations

import pytest
import torch
from scipy.stats import chi2
from torch import nn

from regfw.layers import Dropout

from .masks import all_masks, mask_probs


@pytest.mark.parametrize("n", [1, 4, 8, 12])
def test_two_to_the_n_distinct_subnetworks(n):
    """For a hidden layer of n units with generic weights, the 2^n masks give 2^n different
    functions: enumerate every thinned network on a probe batch and count the distinct outputs."""
    torch.manual_seed(n)
    d = 5
    first = nn.Linear(d, n, dtype=torch.float64)
    head = nn.Linear(n, 1, dtype=torch.float64)
    x = torch.randn(3, d, dtype=torch.float64)
    h = torch.nn.functional.softplus(first(x))  # every unit active, so every unit matters
    masks = all_masks(n)
    outputs = head(masks[:, None, :] * h).squeeze(-1)  # [2^n, 3]: one row per subnetwork
    distinct = torch.unique(torch.round(outputs * 1e9), dim=0)
    assert masks.shape[0] == 2 ** n
    assert distinct.shape[0] == 2 ** n


@pytest.mark.parametrize("p", [0.5, 0.3])
def test_dropout_layer_samples_each_subnetwork_with_its_probability(p):
    """Draw 40,000 masks of 4 units from the project's Dropout layer: all 16 subnetworks occur, with
    frequencies matching (1 - p)^kept * p^dropped (chi-square test, 15 degrees of freedom, p-value
    above 0.001)."""
    torch.manual_seed(7)
    n, draws = 4, 40_000
    out = Dropout(p)(torch.ones(draws, n))
    kept = (out != 0).long()
    codes = (kept << torch.arange(n)).sum(-1)
    counts = torch.bincount(codes, minlength=2 ** n).double()
    expected = mask_probs(all_masks(n), p) * draws
    assert torch.all(counts > 0)
    statistic = float(((counts - expected) ** 2 / expected).sum())
    assert chi2.sf(statistic, df=2 ** n - 1) > 1e-3
