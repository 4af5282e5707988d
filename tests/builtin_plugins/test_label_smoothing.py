"""The ``label_smoothing`` plugin: torch's label smoothing, lowering confidence.

Trained on digits through ``regularized_step`` and compared with the same model, seed and data
trained without it (see ``trained_digits``); seeds are fixed.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from trained_digits import assert_rejects_regression, held_out, trained

from regfw.registry.regularizers import build_regularizers
from regfw.train.steps import Step


def test_label_smoothing_is_torch_label_smoothing_and_lowers_confidence():
    (reg,) = build_regularizers({"label_smoothing": {"epsilon": 0.2}})
    logits, y = torch.randn(32, 10), torch.randint(0, 10, (32,))
    fn = reg.transform_loss(F.cross_entropy, Step(model=nn.Identity(), inputs=None, targets=None))
    torch.testing.assert_close(fn(logits, y), F.cross_entropy(logits, y, label_smoothing=0.2))
    off, on = held_out(trained(())), held_out(trained((("label_smoothing", (("epsilon", 0.2),)),)))
    # measured: max prob 0.97 -> 0.75, entropy 0.10 -> 1.01 nats, accuracy 0.97 -> 0.99
    assert on["max_prob"] < off["max_prob"] - 0.1, (off, on)
    assert on["entropy"] > off["entropy"] + 0.5, (off, on)
    assert on["acc"] > 0.93, on


def test_label_smoothing_rejects_regression():
    assert_rejects_regression("label_smoothing")
