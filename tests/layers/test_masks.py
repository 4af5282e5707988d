"""Masks from sliced random words (regfw.layers.masks): rate, uniform slices, seeds, gradients."""
from __future__ import annotations

import math

import pytest
import torch

from regfw.layers import masks
from regfw.layers.dropout import alpha_dropout, dropout
from regfw.layers.recurrent import drop_connect

DRAWS = 10**7


@pytest.mark.parametrize("p", [0.01, 0.1, 0.3, 0.5, 0.9])
def test_drop_fraction_is_within_five_standard_errors_over_ten_million_draws(p):
    """The fraction dropped over 10^7 entries is p within 5 standard errors, overall and in each of
    the four 16-bit slices of the words (a slice that lacked a random bit would drop at another rate).
    The word path's rate is round(p * 65536) / 65536, at most 2**-17 from p: under 0.25 standard
    errors at these sizes, so the test is against p itself."""
    torch.manual_seed(0)
    mask = masks.drop_mask((DRAWS,), p)
    assert mask.dtype == torch.bool and mask.shape == (DRAWS,)
    se = math.sqrt(p * (1 - p) / DRAWS)
    assert abs(mask.double().mean().item() - p) < 5 * se
    per_slice = mask[: DRAWS // 4 * 4].view(-1, 4).double().mean(0)
    assert ((per_slice - p).abs() < 5 * se * 2).all(), per_slice  # 2.5e6 draws each: twice the SE


def test_masks_are_reproducible_under_a_seed_and_differ_between_seeds():
    torch.manual_seed(123)
    a = masks.drop_mask((1000,), 0.3)
    b = masks.keep_scale_mask(torch.empty(3), (7, 5), 0.3)
    torch.manual_seed(123)
    assert torch.equal(a, masks.drop_mask((1000,), 0.3))
    assert torch.equal(b, masks.keep_scale_mask(torch.empty(3), (7, 5), 0.3))
    torch.manual_seed(124)
    assert not torch.equal(a, masks.drop_mask((1000,), 0.3))


def test_rates_at_the_resolution_limits():
    assert not masks.drop_mask((10_000,), 2**-18).any()  # below 2**-17: nothing dropped
    assert masks.drop_mask((10_000,), 1 - 2**-18).all()
    assert masks.drop_mask((0, 3), 0.5).shape == (0, 3)


def test_keep_scale_mask_values_and_dtype():
    torch.manual_seed(0)
    like = torch.empty(2, dtype=torch.float64)
    m = masks.keep_scale_mask(like, (4, 1000), 0.25)
    assert m.dtype == torch.float64 and m.shape == (4, 1000)
    assert set(m.unique().tolist()) == {0.0, 1 / 0.75}
    unscaled = masks.keep_scale_mask(like, (100,), 0.25, scale=1.0)
    assert set(unscaled.unique().tolist()) <= {0.0, 1.0}


def test_dropout_on_cpu_uses_the_word_masks_and_passes_gradients():
    x = torch.randn(4, 1000, requires_grad=True)
    torch.manual_seed(5)
    y = dropout(x, 0.4)
    torch.manual_seed(5)
    dropped = masks.drop_mask(x.shape, 0.4)
    assert torch.equal(y == 0, dropped | (x == 0))
    assert torch.allclose(y[~dropped], x[~dropped] / 0.6)
    y.sum().backward()
    assert torch.allclose(x.grad, (~dropped).double().float() / 0.6)


def test_drop_connect_on_cpu_drops_weights_at_the_rate():
    torch.manual_seed(0)
    w = torch.ones(1000, 1000)
    out = drop_connect(w, 0.5)
    assert abs((out == 0).double().mean().item() - 0.5) < 5 * math.sqrt(0.25 / w.numel())
    assert torch.equal(out.unique(), torch.tensor([0.0, 2.0]))


def test_alpha_dropout_word_path_matches_torch_in_distribution():
    """Same affine map as F.alpha_dropout: mean 0 and variance 1 kept for standard normal inputs
    (10^6 entries: standard errors 0.001 and 0.0014; tolerance 0.01), two values for a constant."""
    torch.manual_seed(0)
    x = torch.randn(1000, 1000)
    y = alpha_dropout(x, 0.2)
    assert abs(y.mean().item()) < 0.01 and abs(y.var().item() - 1) < 0.01
    torch.manual_seed(1)
    ours = alpha_dropout(torch.zeros(10_000), 0.2).unique()
    theirs = torch.nn.functional.alpha_dropout(torch.zeros(10_000), 0.2, training=True).unique()
    assert torch.allclose(ours, theirs)
