"""The ``mixup`` plugin: mixup and CutMix of inputs and targets.

Trained on digits through ``regularized_step`` and compared with the same model, seed and data
trained without it (see ``trained_digits``); seeds are fixed.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from trained_digits import held_out, trained

from regfw.errors import ConfigError
from regfw.registry.regularizers import build_regularizers
from regfw.train.steps import MixedTargets, Step, regularized_step


def test_mixup_mixes_inputs_and_targets_as_the_paper_says():
    (reg,) = build_regularizers({"mixup": {"alpha": 0.4}})
    x, y = torch.randn(16, 5), torch.randint(0, 3, (16,))
    torch.manual_seed(3)
    mixed, targets = reg.transform_batch(x, y, Step(model=nn.Identity(), inputs=x, targets=y))
    torch.manual_seed(3)
    lam = float(torch.distributions.Beta(0.4, 0.4).sample())
    perm = torch.randperm(16)
    assert isinstance(targets, MixedTargets) and targets.lam == pytest.approx(lam)
    torch.testing.assert_close(mixed, lam * x + (1 - lam) * x[perm])
    assert torch.equal(targets.first, y) and torch.equal(targets.second, y[perm])
    # the loss of mixed targets is the cross-entropy against the mixed one-hot targets
    logits = torch.randn(16, 3, requires_grad=True)
    result = regularized_step([reg], nn.Identity(), logits, y, F.cross_entropy)
    assert isinstance(result.targets, MixedTargets)
    t = result.targets
    soft = t.lam * F.one_hot(t.first, 3).float() + (1 - t.lam) * F.one_hot(t.second, 3).float()
    torch.testing.assert_close(result.data_loss, F.cross_entropy(result.outputs, soft))


def test_cutmix_pastes_one_box_of_the_partner_and_lam_is_the_kept_area():
    (reg,) = build_regularizers({"mixup": {"alpha": 1.0, "cutmix": True}})
    x = torch.arange(8 * 2 * 10 * 10, dtype=torch.float32).reshape(8, 2, 10, 10)  # every pixel distinct
    y = torch.arange(8)
    for seed in range(5):
        torch.manual_seed(seed)
        out, t = reg.transform_batch(x, y, Step(model=nn.Identity(), inputs=x, targets=y))
        changed = (out != x).any(dim=1)  # (N, H, W): pixels taken from the partner
        partner = x[t.second]
        assert torch.equal(out[changed.unsqueeze(1).expand_as(x)], partner[changed.unsqueeze(1).expand_as(x)])
        rows, cols = changed.any(0).any(1).nonzero(), changed.any(0).any(0).nonzero()
        box = changed.any(0)
        if rows.numel():  # one rectangle, the same for every image
            assert box[rows.min():rows.max() + 1, cols.min():cols.max() + 1].all()
        fixed_points = (t.second == y)  # an image paired with itself keeps its pixels
        kept = 1 - box.float().mean().item()
        assert t.lam == pytest.approx(kept), seed
        assert not changed[fixed_points].any()


def test_mixup_trains_and_softens_predictions():
    off, on = held_out(trained(())), held_out(trained((("mixup", (("alpha", 0.4),)),)))
    # measured: accuracy 0.97 both, max prob 0.97 -> 0.87
    assert on["acc"] > 0.93, on
    assert on["max_prob"] < off["max_prob"] - 0.05, (off, on)


def test_mixup_rejects_inputs_it_cannot_mix():
    (reg,) = build_regularizers({"mixup": {"cutmix": True}})
    x = torch.randn(4, 5)
    with pytest.raises(ConfigError, match=r"regularizers\.mixup\.cutmix: .*shape \[4, 5\]; set cutmix: false"):
        reg.transform_batch(x, None, Step(model=nn.Identity(), inputs=x, targets=None))
    (plain,) = build_regularizers({"mixup": {}})
    ids = torch.randint(0, 9, (4, 5))
    with pytest.raises(ConfigError, match=r"regularizers\.mixup: .*torch\.int64 tensors"):
        plain.transform_batch(ids, None, Step(model=nn.Identity(), inputs=ids, targets=None))
    with pytest.raises(ConfigError, match=r"regularizers\.mixup\.prob: got 1\.5, expected a probability"):
        build_regularizers({"mixup": {"prob": 1.5}})
