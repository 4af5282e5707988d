"""OOD detection, selective prediction and the mixture likelihood."""
from __future__ import annotations

import math

import pytest
import torch
from unc_helpers import make_mlp, train_plain

from regfw.uncertainty import mc_predict
from regfw.uncertainty.metrics import gaussian_nll
from regfw.uncertainty.ood import average_precision, fpr_at_tpr, heldout_classes, ood_metrics, ood_scores
from regfw.uncertainty.selective import risk_coverage, selective_metrics
from regfw.uncertainty.summaries import mixture_nll_elements

# --------------------------------------------------------------------------- OOD


def test_mutual_information_detects_held_out_digits(digits):
    """Train on digits 0-4; the validation 5-9 are OOD. Chance is AUROC 0.5; we ask for 0.75."""
    xtr, ytr, xv, yv = digits
    torch.manual_seed(0)
    model = train_plain(make_mlp(p=0.5, out=5), xtr[ytr < 5], ytr[ytr < 5], epochs=10, seed=0, lr=3e-3)
    inside = mc_predict(model, xv[yv < 5], samples=30, seed=0)
    outside = mc_predict(model, xv[yv >= 5], samples=30, seed=1)
    res = ood_metrics(ood_scores(inside.summary, inside.outputs), ood_scores(outside.summary, outside.outputs))
    assert res.auroc["mutual_information"] >= 0.75  # measured 0.88 with this seed
    assert set(res.auroc) == {"msp", "entropy", "mutual_information", "variation_ratio", "energy"}
    for name in res.auroc:
        assert res.auroc[name] > 0.6 and res.aupr[name] > 0.6 and 0 <= res.fpr95[name] <= 1, name
        # the variation ratio takes T + 1 values: when more than 5% of the OOD inputs get unanimous
        # samples (ratio 0, tied with most in-distribution inputs), 95% TPR needs threshold 0 and the
        # FPR is 1 (5 of 6 seeds here, with either mask stream); the continuous scores stay below 1
        if name != "variation_ratio":
            assert res.fpr95[name] < 1, name
    assert (res.n_in, res.n_out) == (int((yv < 5).sum()), int((yv >= 5).sum()))
    assert "ood/auroc_energy" in res.as_metrics()


def test_average_precision_and_fpr95_on_hand_examples():
    from sklearn.metrics import average_precision_score

    gen = torch.Generator().manual_seed(0)
    s = torch.randint(0, 6, (300,), generator=gen).double()  # many ties
    y = torch.rand(300, generator=gen) < 0.3 + 0.1 * s
    assert average_precision(s, y) == pytest.approx(average_precision_score(y.numpy(), s.numpy()), abs=1e-12)
    # 20 positives 1..20, negatives 0..9 and 15: 95% TPR needs threshold 2 -> negatives >= 2 are 8 + 1 of 11
    pos = torch.arange(1, 21).double()
    neg = torch.tensor([*range(10), 15]).double()
    flag = torch.cat([torch.ones(20), torch.zeros(11)]).bool()
    assert fpr_at_tpr(torch.cat([pos, neg]), flag) == pytest.approx(9 / 11)


def test_ood_needs_both_sides():
    with pytest.raises(ValueError, match="got 3 in and 0 out"):
        ood_metrics({"msp": torch.ones(3)}, {"msp": torch.ones(0)})


def test_heldout_classes_protocol_on_digits():
    from regfw.build.datasets import DigitsDataModule

    dm = DigitsDataModule(seed=0)
    n_val_out = int((dm.y_val >= 5).sum())
    loader = heldout_classes(dm, None)
    assert dm.num_outputs == 5 and set(dm.y_train.tolist()) == set(dm.y_val.tolist()) == set(range(5))
    assert sum(b[0].shape[0] for b in loader) == n_val_out and dm.n_train == dm.x_train.shape[0]
    dm2 = DigitsDataModule(seed=0)
    heldout_classes(dm2, [7, 3])  # renumbered in the given order
    assert set(dm2.y_train.tolist()) == {0, 1} and dm2.num_outputs == 2
    with pytest.raises(ValueError, match=r"in_classes: got \[0, 11\], expected some but not all"):
        heldout_classes(DigitsDataModule(seed=0), [0, 11])


# --------------------------------------------------------------------------- selective prediction


def test_risk_coverage_hand_example():
    score = torch.tensor([0.1, 0.2, 0.3, 0.4])  # least sure last
    correct = torch.tensor([1, 1, 0, 0])
    rc = risk_coverage(score, correct)
    assert rc.coverage.tolist() == [0.25, 0.5, 0.75, 1.0]
    assert rc.risk.tolist() == pytest.approx([0, 0, 1 / 3, 1 / 2])
    assert rc.aurc == pytest.approx((1 / 3 + 1 / 2) / 4)
    assert rc.augrc == pytest.approx((1 / 3 * 0.75 + 1 / 2) / 4)
    m = selective_metrics(score, correct)
    assert m["risk_80"] == pytest.approx(0.5) and m["risk_95"] == pytest.approx(0.5)
    # an uninformative score (reversed) has a larger AURC
    assert selective_metrics(-score, correct)["aurc"] > m["aurc"]


# --------------------------------------------------------------------------- mixture likelihood


def test_mixture_nll_hand_computed():
    means = torch.tensor([[[0.0]], [[2.0]]])  # T = 2, B = 1, D = 1
    y = torch.tensor([[0.5]])
    tau = 4.0  # variance 0.25
    dens = [math.exp(-0.5 * (0.5 - m) ** 2 * tau) * math.sqrt(tau / (2 * math.pi)) for m in (0.0, 2.0)]
    expected = -math.log(sum(dens) / 2)
    assert float(mixture_nll_elements(means, y, tau=tau)[0]) == pytest.approx(expected, rel=1e-12)
    # identical samples: the mixture is one Gaussian, the same as the moment-matched NLL
    same = torch.full((5, 3, 1), 1.5)
    target = torch.tensor([[1.0], [2.0], [0.0]])
    assert float(mixture_nll_elements(same, target, tau=tau).mean()) == pytest.approx(
        gaussian_nll(same[0], torch.full((3, 1), 1 / tau), target), rel=1e-12)
    with pytest.raises(ValueError, match="exactly one of variances"):
        mixture_nll_elements(means, y)


def test_mc_result_nll_mixture_for_given_targets():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 16), torch.nn.ReLU(), torch.nn.Dropout(0.3), torch.nn.Linear(16, 1))
    x, y = torch.randn(40, 3), torch.randn(40, 1)
    r = mc_predict(model, x, samples=10, seed=0, task="regression", tau=2.0)
    per_input = r.nll_mixture(y, tau=2.0)
    assert per_input.shape == (40,) and torch.isfinite(per_input).all()
    expected = mixture_nll_elements(r.outputs, y, tau=2.0)
    assert torch.allclose(per_input, expected)
    with pytest.raises(ValueError, match="regression likelihood"):
        mc_predict(torch.nn.Sequential(torch.nn.Dropout(0.5), torch.nn.Linear(3, 2)), x, samples=2).nll_mixture(y)


def test_risk_coverage_does_not_depend_on_the_order_of_tied_scores():
    score = torch.tensor([0.0, 0.0, 0.5, 0.5, 0.5, 1.0])
    correct = torch.tensor([1, 0, 1, 1, 0, 0])
    perm = torch.tensor([5, 3, 1, 0, 4, 2])
    a, b = risk_coverage(score, correct), risk_coverage(score[perm], correct[perm])
    assert torch.allclose(a.risk, b.risk) and a.aurc == pytest.approx(b.aurc) and a.augrc == pytest.approx(b.augrc)
    assert a.risk[1] == pytest.approx(0.5)  # the two tied most-certain inputs hold one error
