"""The ``rdrop`` plugin: the symmetric KL between two dropout passes, lowering their disagreement.

Trained on digits through ``regularized_step`` and compared with the same model, seed and data
trained without it (see ``trained_digits``); seeds are fixed.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from regfw_plugins.rdrop import symmetric_kl
from torch import nn
from trained_digits import assert_rejects_regression, digits, held_out, mlp, trained

from regfw.registry.regularizers import build_regularizers
from regfw.train.steps import regularized_step


def _disagreement(model: nn.Module) -> float:
    """Symmetric KL between two dropout passes over the held-out digits (train mode)."""
    _, _, x, _ = digits()
    torch.manual_seed(1)
    with torch.no_grad():
        return symmetric_kl(model(x), model(x)).item()


def test_rdrop_term_is_positive_and_training_reduces_dropout_disagreement():
    x, y, _, _ = digits()
    regs = build_regularizers({"rdrop": {"alpha": 3.0}})
    torch.manual_seed(0)
    result = regularized_step(regs, mlp(0.3), x[:50], y[:50], F.cross_entropy, task="classification")
    assert result.outputs.shape == (100, 10)  # the second pass rides in the same forward call
    assert result.terms["rdrop"] > 0
    off = trained((), p=0.3)
    on = trained((("rdrop", (("alpha", 3.0),)),), p=0.3)
    # measured: 0.161 -> 0.10 nats (alpha 3)
    assert _disagreement(on) < 0.8 * _disagreement(off), (_disagreement(off), _disagreement(on))
    assert held_out(on)["acc"] > 0.93


def test_rdrop_batched_equals_two_separate_passes():
    """The concatenated batch draws the masks of both passes in the same order as two calls."""
    x, y, _, _ = digits()
    model = mlp(0.3)
    totals = []
    for batched in (True, False):
        regs = build_regularizers({"rdrop": {"alpha": 2.0, "batched": batched}})
        torch.manual_seed(5)
        totals.append(regularized_step(regs, model, x[:40], y[:40], F.cross_entropy).total)
    torch.testing.assert_close(totals[0], totals[1])


def test_rdrop_rejects_regression():
    assert_rejects_regression("rdrop")
