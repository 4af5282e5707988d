"""torch's own dropout modules on regfw's CPU word masks in Monte Carlo mode (regfw.layers.torch_dropout)."""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from regfw.layers import masks
from regfw.layers.dropout import alpha_dropout
from regfw.layers.torch_dropout import word_forward
from regfw.uncertainty import mc_mode, mc_predict

DRAWS = 10**7


@pytest.mark.parametrize("p", [0.01, 0.1, 0.3, 0.5, 0.9])
def test_nn_dropout_in_mc_mode_drops_p_within_five_standard_errors_over_ten_million_draws(p):
    """The fraction an ``nn.Dropout`` zeroes in MC mode on CPU is p within 5 standard errors over
    10^7 entries (the word path's rate is round(p * 65536) / 65536, under 0.25 standard errors from
    p here), and the kept entries are scaled by 1 / (1 - p)."""
    model = nn.Sequential(nn.Identity(), nn.Dropout(p)).eval()
    x = torch.ones(DRAWS)
    torch.manual_seed(0)
    with torch.no_grad(), mc_mode(model):
        y = model(x)
    dropped = (y == 0).double().mean().item()
    assert abs(dropped - p) < 5 * math.sqrt(p * (1 - p) / DRAWS)
    assert torch.allclose(y[y != 0], torch.tensor(1 / (1 - p)))


def test_nn_dropout_in_mc_mode_draws_the_word_masks_reproducibly():
    """In MC mode the module's output is x times regfw's word mask from the same generator state
    (not torch's bernoulli kernel), so a seed reproduces it; outside MC mode torch's forward is back."""
    drop = nn.Dropout(0.3)
    model = nn.Sequential(nn.Linear(4, 64), drop).eval()
    x = torch.randn(50, 4)
    with torch.no_grad():
        h = model[0](x)
        torch.manual_seed(7)
        expected = h * masks.keep_scale_mask(h, h.shape, 0.3)
        with mc_mode(model):
            assert "forward" in drop.__dict__
            torch.manual_seed(7)
            first = model(x)
            torch.manual_seed(7)
            again = model(x)
            torch.manual_seed(8)
            other = model(x)
    assert torch.equal(first, expected) and torch.equal(first, again) and not torch.equal(first, other)
    assert "forward" not in drop.__dict__ and not drop.training
    a = mc_predict(model, x, samples=4, seed=3)
    assert torch.equal(a.outputs, mc_predict(model, x, samples=4, seed=3).outputs)
    assert not torch.equal(a.outputs, mc_predict(model, x, samples=4, seed=4).outputs)


def test_the_routed_forward_is_removed_when_mc_mode_raises():
    drop = nn.Dropout(0.5)
    model = nn.Sequential(nn.Linear(3, 3), drop).train()
    with pytest.raises(RuntimeError, match="boom"), mc_mode(model):
        raise RuntimeError("boom")
    assert "forward" not in drop.__dict__ and drop.training and model[0].training


@pytest.mark.parametrize(("cls", "shape"), [(nn.Dropout1d, (6, 40, 5)), (nn.Dropout2d, (6, 40, 3, 3)),
                                            (nn.Dropout3d, (6, 40, 2, 2, 2))])
def test_channel_dropout_in_mc_mode_drops_whole_channels(cls, shape):
    drop = cls(0.4)
    model = nn.Sequential(nn.Identity(), drop).eval()
    x = torch.ones(shape)
    torch.manual_seed(0)
    with torch.no_grad(), mc_mode(model):
        assert "forward" in drop.__dict__
        y = model(x)
    per_channel = y.flatten(2)
    assert ((per_channel == 0).all(-1) | (per_channel == 1 / 0.6).all(-1)).all()  # one draw per (sample, channel)
    assert 0.2 < (per_channel[..., 0] == 0).double().mean().item() < 0.6


def test_inplace_alpha_and_other_cases():
    """inplace=True multiplies the input itself; AlphaDropout gets regfw's alpha_dropout (the same
    affine map as torch's); eval mode, p = 0 and unbatched channel inputs keep torch's forward."""
    inplace = nn.Dropout(0.5, inplace=True).train()
    fn = word_forward(inplace)
    assert fn is not None
    x = torch.ones(1000)
    torch.manual_seed(0)
    assert fn(x) is x and set(x.unique().tolist()) == {0.0, 2.0}

    alpha = nn.AlphaDropout(0.2).train()
    fn = word_forward(alpha)
    assert fn is not None
    x = torch.randn(500)
    torch.manual_seed(1)
    expected = alpha_dropout(x, 0.2, training=True)
    torch.manual_seed(1)
    assert torch.equal(fn(x), expected)

    d2 = nn.Dropout2d(0.5).train()
    fn = word_forward(d2)
    assert fn is not None
    x = torch.ones(4, 3, 3)  # unbatched for Dropout2d: torch's own forward (and its warning)
    torch.manual_seed(2)
    with pytest.warns(UserWarning):
        expected = d2(x.clone())
    torch.manual_seed(2)
    with pytest.warns(UserWarning):
        assert torch.equal(fn(x.clone()), expected)

    d = nn.Dropout(0.5).eval()
    x = torch.ones(10)
    fn = word_forward(d)
    assert fn is not None and torch.equal(fn(x), x)


def test_only_exact_torch_types_without_their_own_forward_are_routed():
    class MyDropout(nn.Dropout):
        def forward(self, x):
            return x * 0 + 7

    assert word_forward(MyDropout(0.5)) is None
    assert word_forward(nn.Linear(2, 2)) is None
    patched = nn.Dropout(0.5)
    patched.forward = lambda x: x  # type: ignore[method-assign]
    assert word_forward(patched) is None
    model = nn.Sequential(nn.Linear(2, 2), MyDropout(0.5)).eval()
    with torch.no_grad(), mc_mode(model):
        assert torch.equal(model(torch.ones(3, 2)), torch.full((3, 2), 7.0))  # its own forward, in MC mode


def test_a_copy_made_in_mc_mode_follows_its_own_flag_and_rate():
    """The routed forward is a method bound to its module, so a deepcopy made in MC mode (an
    averaging callback, an ensemble) binds it to the copy: the copy follows its own flag and rate."""
    import copy

    drop = nn.Dropout(0.5)
    model = nn.Sequential(nn.Identity(), drop).eval()
    with mc_mode(model):
        clone = copy.deepcopy(model)
    clone[1].p = 0.9
    clone.train()
    x = torch.ones(100_000)
    torch.manual_seed(0)
    y = clone(x)
    assert abs((y == 0).double().mean().item() - 0.9) < 0.01
    clone.eval()
    assert torch.equal(clone(x), x)
