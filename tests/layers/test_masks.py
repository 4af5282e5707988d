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


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("p", [2**-18, 0.01, 0.3, 0.5, 0.9, 1 - 2**-18])
def test_keep_mask_is_the_complement_of_the_drop_mask_under_the_same_seed(p, dtype):
    """keep_scale_mask compares the slices straight into the mask's dtype (``>=``); drop_mask keeps
    the boolean ``<``: the same entries, so the rate tested above holds for both."""
    like = torch.empty(1, dtype=dtype)
    torch.manual_seed(7)
    keep = masks.keep_scale_mask(like, (257, 33), p, scale=1.0)
    torch.manual_seed(7)
    drop = masks.drop_mask((257, 33), p)
    assert keep.dtype == dtype
    assert torch.equal(keep == 1.0, ~drop) and torch.equal(keep == 0.0, drop)


def test_results_without_gradients_never_share_the_reused_mask_buffer():
    """Without autograd the mask lives in a reused buffer: an earlier result must not change when the
    next mask is drawn, and the values are those of the fresh-mask path under the same seed."""
    x = torch.randn(64, 300)
    with torch.no_grad():
        torch.manual_seed(3)
        first = dropout(x, 0.4)
        kept = first.clone()
        second = dropout(x, 0.4)
    assert torch.equal(first, kept) and not torch.equal(first, second)
    torch.manual_seed(3)
    fresh = x * masks.keep_scale_mask(x, x.shape, 0.4)
    assert torch.equal(first, fresh)


def test_gradients_use_their_own_mask_when_more_masks_are_drawn_before_backward():
    x = torch.randn(32, 200, requires_grad=True)
    y = dropout(x, 0.5)
    with torch.no_grad():
        for _ in range(3):
            dropout(torch.randn(32, 200), 0.5)  # reuses the scratch buffer
    y.sum().backward()
    assert torch.equal(x.grad, (y != 0).float() * 2.0)


def test_scratch_buffers_made_under_inference_mode_work_outside_it():
    """Lightning validates under inference mode; a thread's first mask drawn there must not leave
    an inference tensor that the next training step cannot write."""
    import threading

    errors = []

    def work():
        try:
            with torch.inference_mode():
                dropout(torch.randn(16, 16), 0.3)
            dropout(torch.randn(16, 16), 0.3)
            with torch.no_grad():
                dropout(torch.randn(16, 16), 0.3)
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    thread = threading.Thread(target=work)
    thread.start()
    thread.join()
    assert not errors, errors
