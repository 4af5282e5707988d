"""Calibration, error detection, referral and regression metrics."""
from __future__ import annotations

import itertools
import math

import pytest
import torch

from regfw.uncertainty import classification_summary, regression_summary
from regfw.uncertainty.accumulators import MCClassificationMetrics, MCRegressionMetrics
from regfw.uncertainty.metrics import (
    auroc,
    bin_index,
    brier_score,
    calibration_bins,
    ece,
    error_auroc,
    gaussian_nll,
    interval_coverage,
    nll,
    referral,
    referral_curve,
    reliability_diagram,
    rmse,
)


def test_ece_edge_bins():
    conf = torch.tensor([0.0, 1.0, 1 / 15, 0.5, 14 / 15 + 1e-6])
    idx = bin_index(conf, 15)
    assert idx[0] == 0  # exactly 0 -> first bin
    assert idx[1] == 14  # exactly 1.0 -> last bin, not an out-of-range 16th
    assert idx[2] == 1 and idx[3] == 7 and idx[4] == 14
    count, _, _ = calibration_bins(conf, torch.ones(5), 15)
    assert count.sum() == 5 and count[14] == 2 and count[0] == 1


def test_ece_values():
    # confidence 1.0, always right: perfectly calibrated
    probs = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    assert ece(probs, torch.tensor([0, 1])) == 0.0
    # confidence 1.0, always wrong: gap 1
    assert ece(probs, torch.tensor([1, 0])) == pytest.approx(1.0)
    # two bins by hand: conf 0.9 (1 of 2 right) and conf 0.6 (2 of 2 right)
    probs = torch.tensor([[0.9, 0.1], [0.9, 0.1], [0.6, 0.4], [0.4, 0.6]])
    target = torch.tensor([0, 1, 0, 1])
    expected = (2 * abs(0.9 - 0.5) + 2 * abs(0.6 - 1.0)) / 4
    assert ece(probs, target) == pytest.approx(expected, abs=1e-6)  # float32 inputs
    rel = reliability_diagram(probs, target)
    assert rel.count.sum() == 4
    assert int(rel.count[13]) == 2 and rel.accuracy[13] == pytest.approx(0.5)
    assert int(rel.count[9]) == 2 and rel.accuracy[9] == pytest.approx(1.0)
    assert torch.isnan(rel.confidence[0]) and rel.count[0] == 0  # empty bins are NaN, not 0
    assert rel.ece == pytest.approx(expected, abs=1e-6)
    assert len(rel.edges) == 16 and rel.edges[0] == 0 and rel.edges[-1] == 1


def test_nll_and_brier_by_hand():
    probs = torch.tensor([[0.7, 0.2, 0.1], [0.1, 0.1, 0.8]])
    target = torch.tensor([0, 1])
    assert nll(probs, target) == pytest.approx(-(math.log(0.7) + math.log(0.1)) / 2)
    b1 = 0.3**2 + 0.2**2 + 0.1**2
    b2 = 0.1**2 + 0.9**2 + 0.8**2
    assert brier_score(probs, target) == pytest.approx((b1 + b2) / 2)
    # a zero probability on the target stays finite (clamped log)
    assert math.isfinite(nll(torch.tensor([[1.0, 0.0]]), torch.tensor([1])))


def brute_auroc(score, pos):
    ps = [s for s, p in zip(score, pos, strict=True) if p]
    ns = [s for s, p in zip(score, pos, strict=True) if not p]
    total = sum(1.0 if a > b else 0.5 if a == b else 0.0 for a, b in itertools.product(ps, ns))
    return total / (len(ps) * len(ns))


@pytest.mark.parametrize("seed", range(5))
def test_auroc_matches_brute_force_pair_count_with_ties(seed):
    g = torch.Generator().manual_seed(seed)
    score = torch.randint(0, 6, (60,), generator=g).float()  # many ties
    pos = torch.rand(60, generator=g) < 0.3
    assert auroc(score, pos) == pytest.approx(brute_auroc(score.tolist(), pos.tolist()), abs=1e-12)


def test_auroc_extremes():
    correct = torch.tensor([True, True, False, False])
    assert error_auroc(torch.tensor([0.1, 0.2, 0.8, 0.9]), correct) == 1.0
    assert error_auroc(torch.tensor([0.9, 0.8, 0.1, 0.2]), correct) == 0.0
    assert error_auroc(torch.ones(4), correct) == 0.5
    assert math.isnan(error_auroc(torch.rand(3), torch.ones(3, dtype=torch.bool)))


def test_referral_threshold_and_fraction():
    score = torch.tensor([0.9, 0.1, 0.5, 0.7, 0.2])
    correct = torch.tensor([0, 1, 1, 0, 1]).bool()
    r = referral(score, correct, threshold=0.6)
    assert r.referred_fraction == pytest.approx(0.4) and r.retained_accuracy == 1.0
    assert (r.n_referred, r.n_retained) == (2, 3)
    r = referral(score, correct, fraction=0.2)
    assert r.n_referred == 1 and r.retained_accuracy == pytest.approx(3 / 4) and r.threshold == pytest.approx(0.9)
    r = referral(score, correct, fraction=0.0)
    assert r.referred_fraction == 0 and r.retained_accuracy == pytest.approx(3 / 5)
    assert math.isnan(referral(score, correct, fraction=1.0).retained_accuracy)
    with pytest.raises(ValueError, match="exactly one"):
        referral(score, correct)
    with pytest.raises(ValueError, match="exactly one"):
        referral(score, correct, threshold=0.5, fraction=0.1)


def test_referral_curve_facts():
    g = torch.Generator().manual_seed(0)
    n = 200
    correct = torch.rand(n, generator=g) > 0.2
    fr, acc = referral_curve(torch.rand(n, generator=g), correct)
    assert fr.shape == (n,) and fr[0] == 0 and torch.all(torch.diff(fr) > 0) and fr[-1] < 1
    assert acc[0] == pytest.approx(correct.double().mean().item())  # nothing referred: plain accuracy
    # an oracle score (errors most uncertain): accuracy never falls and reaches 1 once all
    # errors are referred
    oracle = (~correct).double() + 0.01 * torch.rand(n, generator=g, dtype=torch.float64)
    fr, acc = referral_curve(oracle, correct)
    assert torch.all(torch.diff(acc) >= -1e-12)
    n_err = int((~correct).sum())
    assert acc[n_err] == 1.0 and acc[n_err - 1] < 1.0
    # the adversarial score (correct ones referred first): accuracy never rises
    fr, acc = referral_curve(-oracle, correct)
    assert torch.all(torch.diff(acc) <= 1e-12)


def test_regression_metrics():
    g = torch.Generator().manual_seed(0)
    n = 20000
    mean = torch.randn(n, 1, generator=g, dtype=torch.float64)
    std = 0.5 + torch.rand(n, 1, generator=g, dtype=torch.float64)
    target = mean + std * torch.randn(n, 1, generator=g, dtype=torch.float64)
    cov = interval_coverage(mean, std**2, target)
    # calibrated Gaussian: coverage within 3 binomial standard errors of the level
    for level, c in cov.items():
        assert abs(c - level) < 3 * math.sqrt(level * (1 - level) / n), (level, c)
    ref = torch.nn.GaussianNLLLoss(full=True)(mean, target, std**2).item()
    assert gaussian_nll(mean, std**2, target) == pytest.approx(ref, rel=1e-9)
    assert rmse(torch.tensor([1.0, 2.0]), torch.tensor([1.0, 4.0])) == pytest.approx(math.sqrt(2.0))
    # over-confident intervals cover less than nominal
    assert interval_coverage(mean, (0.5 * std) ** 2, target)[0.9] < 0.8


def _batches(seed, n_batches=4, b=25, c=4, t=6):
    g = torch.Generator().manual_seed(seed)
    for _ in range(n_batches):
        probs = torch.softmax(2 * torch.randn(t, b, c, generator=g, dtype=torch.float64), -1)
        det = torch.softmax(torch.randn(b, c, generator=g, dtype=torch.float64), -1)
        yield classification_summary(probs, det), torch.randint(0, c, (b,), generator=g)


def test_torchmetrics_classification_equals_whole_set_functions():
    metric = MCClassificationMetrics(score="entropy", refer_fraction=0.2)
    summaries, targets = zip(*_batches(0), strict=True)
    for s, y in zip(summaries, targets, strict=True):
        metric.update(s, y)
    out = {k: float(v) for k, v in metric.compute().items()}
    probs = torch.cat([s.mean_probs for s in summaries])
    det = torch.cat([s.deterministic_probs for s in summaries])
    y = torch.cat(targets)
    score = torch.cat([s.predictive_entropy for s in summaries])
    correct = probs.argmax(-1) == y
    assert out["acc"] == pytest.approx(correct.double().mean().item())
    assert out["det_acc"] == pytest.approx((det.argmax(-1) == y).double().mean().item())
    assert out["nll"] == pytest.approx(nll(probs, y))
    assert out["brier"] == pytest.approx(brier_score(probs, y))
    assert out["ece"] == pytest.approx(ece(probs, y))
    assert out["auroc_error"] == pytest.approx(error_auroc(score, correct))
    r = referral(score, correct, fraction=0.2)
    assert out["referred_fraction"] == pytest.approx(0.2)
    assert out["retained_acc"] == pytest.approx(r.retained_accuracy)
    assert out["mean_entropy"] == pytest.approx(score.mean().item())
    assert out["mean_mi"] == pytest.approx(torch.cat([s.mutual_information for s in summaries]).mean().item())
    # the states are declared with a distributed reduction, so DDP sums / concatenates them
    assert metric._reductions["bin_count"] is not None and metric._defaults["scores"] == []
    metric.reset()
    assert float(metric.n) == 0


def test_torchmetrics_regression():
    metric = MCRegressionMetrics(levels=(0.5, 0.9))
    g = torch.Generator().manual_seed(1)
    all_mean, all_var, all_y = [], [], []
    for _ in range(3):
        means = torch.randn(8, 50, 1, generator=g, dtype=torch.float64)
        s = regression_summary(means, tau=2.0, deterministic_mean=means[0])
        y = torch.randn(50, generator=g, dtype=torch.float64)
        metric.update(s, y)
        all_mean.append(s.mean), all_var.append(s.variance), all_y.append(y.view(-1, 1))
    out = {k: float(v) for k, v in metric.compute().items()}
    mean, var, y = torch.cat(all_mean), torch.cat(all_var), torch.cat(all_y)
    assert out["rmse"] == pytest.approx(rmse(mean, y))
    assert out["nll"] == pytest.approx(gaussian_nll(mean, var, y))
    cov = interval_coverage(mean, var, y, (0.5, 0.9))
    assert out["coverage_50"] == pytest.approx(cov[0.5]) and out["coverage_90"] == pytest.approx(cov[0.9])
    assert out["mean_aleatoric"] == pytest.approx(0.5)
    assert out["mean_variance"] == pytest.approx(out["mean_aleatoric"] + out["mean_epistemic"])


def test_states_reduce_like_ddp():
    """merge_state applies each state's dist_reduce_fx, as the DDP sync does across ranks."""
    batches = list(_batches(2, n_batches=6))
    whole, rank0, rank1 = (MCClassificationMetrics(score="variation_ratio") for _ in range(3))
    for i, (s, y) in enumerate(batches):
        whole.update(s, y)
        (rank0 if i % 2 == 0 else rank1).update(s, y)
    rank0.merge_state(rank1)
    merged, expected = rank0.compute(), whole.compute()
    for k in expected:
        # order of the concatenated scores differs, every value must not
        assert torch.allclose(merged[k], expected[k], equal_nan=True), k
