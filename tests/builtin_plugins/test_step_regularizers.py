"""The built-in step regularizers act: measured effects on trained digits classifiers (fixed seeds).

Each model trains through :func:`regfw.train.steps.regularized_step` with the regularizer built by the
registry from its config section, exactly as ``RegularizedModule`` does, and is compared with the
same model, seed and data trained without it.
"""
from __future__ import annotations

import functools

import pytest
import torch
import torch.nn.functional as F
from regfw_plugins.confidence_penalty import entropy
from regfw_plugins.rdrop import symmetric_kl
from sklearn.datasets import load_digits
from torch import nn

from regfw.errors import ConfigError
from regfw.registry.regularizers import build_regularizers
from regfw.train.steps import MixedTargets, Step, regularized_step

N_TRAIN = 1000


@functools.lru_cache(maxsize=1)
def digits() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    data = load_digits()
    x = torch.tensor(data.data, dtype=torch.float32) / 16
    y = torch.tensor(data.target)
    idx = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
    return x[idx[:N_TRAIN]], y[idx[:N_TRAIN]], x[idx[N_TRAIN:]], y[idx[N_TRAIN:]]


def mlp(p: float = 0.0) -> nn.Module:
    return nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Dropout(p), nn.Linear(64, 10))


@functools.cache
def trained(section: tuple, p: float = 0.0, epochs: int = 30) -> nn.Module:
    """An MLP trained on 1000 digits with the regularizers of ``section`` (a tuple of (name, settings items))."""
    x, y, _, _ = digits()
    torch.manual_seed(0)
    regs = build_regularizers({name: dict(items) for name, items in section})
    model = mlp(p)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(epochs):
        order = torch.randperm(N_TRAIN)
        for i in range(0, N_TRAIN, 100):
            b = order[i:i + 100]
            result = regularized_step(regs, model, x[b], y[b], F.cross_entropy, task="classification")
            opt.zero_grad()
            result.total.backward()
            opt.step()
    return model


def held_out(model: nn.Module) -> dict[str, float]:
    """Accuracy, mean max probability and mean entropy on the 797 held-out digits (eval mode)."""
    _, _, x, y = digits()
    model.eval()
    with torch.no_grad():
        logits = model(x)
    model.train()
    return {"acc": (logits.argmax(-1) == y).float().mean().item(),
            "max_prob": logits.softmax(-1).max(-1).values.mean().item(),
            "entropy": entropy(logits).mean().item()}


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


def test_rdrop_and_label_smoothing_reject_regression():
    for name in ("rdrop", "label_smoothing", "confidence_penalty"):
        (reg,) = build_regularizers({name: {}})
        step = Step(model=nn.Identity(), inputs=torch.zeros(2, 1), targets=torch.zeros(2, 1),
                    outputs=torch.zeros(2, 1), task="regression")
        with pytest.raises(ConfigError, match=rf"regularizers\.{name}: acts on class probabilities"):
            reg.transform_loss(F.mse_loss, step)
            reg.loss_term(step)  # the one of the two methods that the regularizer overrides raises
