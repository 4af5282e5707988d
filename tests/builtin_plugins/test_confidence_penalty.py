"""The ``confidence_penalty`` plugin: minus the predictive entropy, raising it.

Trained on digits through ``regularized_step`` and compared with the same model, seed and data
trained without it (see ``trained_digits``); seeds are fixed.
"""
from __future__ import annotations

import torch
from regfw_plugins.confidence_penalty import entropy
from torch import nn
from trained_digits import assert_rejects_regression, held_out, trained

from regfw.registry.regularizers import build_regularizers
from regfw.train.steps import Step


def test_confidence_penalty_raises_predictive_entropy():
    (reg,) = build_regularizers({"confidence_penalty": {"strength": 0.5}})
    logits = torch.randn(8, 10)
    term = reg.loss_term(Step(model=nn.Identity(), inputs=None, targets=None, outputs=logits))
    torch.testing.assert_close(term, -0.5 * entropy(logits).mean())
    assert term < 0
    off, on = held_out(trained(())), held_out(trained((("confidence_penalty", (("strength", 0.5),)),)))
    # measured: entropy 0.10 -> 1.33 nats, max prob 0.97 -> 0.65
    assert on["entropy"] > off["entropy"] + 0.5, (off, on)
    assert on["max_prob"] < off["max_prob"] - 0.1, (off, on)
    assert on["acc"] > 0.93, on


def test_confidence_penalty_rejects_regression():
    assert_rejects_regression("confidence_penalty")
