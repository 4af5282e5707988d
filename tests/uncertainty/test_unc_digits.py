"""MC dropout on a trained digits MLP: uncertainty flags errors, BALD finds informative inputs."""
from __future__ import annotations

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from regfw.uncertainty import error_auroc, mc_predict, rank


@pytest.fixture(scope="module")
def mc(trained_mlp, digits):
    _, _, xv, yv = digits
    return mc_predict(trained_mlp, xv, samples=50, seed=0), yv


def test_uncertainty_is_higher_on_errors(mc):
    res, yv = mc
    correct = res.prediction == yv
    n_err = int((~correct).sum())
    assert n_err >= 5  # enough errors for the AUROC to mean something
    for score in ("entropy", "mutual_information", "variation_ratio"):
        auc = error_auroc(res.score(score), correct)
        assert auc > 0.75, (score, auc)
        assert res.score(score)[~correct].mean() > res.score(score)[correct].mean()


def test_mc_accuracy_within_one_point_of_deterministic(mc):
    res, yv = mc
    mc_acc = (res.prediction == yv).float().mean().item()
    det_acc = (res.deterministic_prediction == yv).float().mean().item()
    assert mc_acc > 0.9
    assert abs(mc_acc - det_acc) <= 0.01, (mc_acc, det_acc)


def test_bald_selects_more_errors_than_random(trained_mlp, digits):
    _, _, xv, yv = digits
    loader = DataLoader(TensorDataset(xv, yv), batch_size=64, shuffle=False)
    k = 40
    bald = rank(trained_mlp, loader, acquisition="bald", k=k, samples=30, seed=0)
    assert bald.indices.shape == (k,) and torch.all(torch.diff(bald.scores) <= 0)
    with torch.no_grad():
        wrong = trained_mlp(xv).argmax(-1) != yv
    bald_err = wrong[bald.indices].float().mean().item()
    # the random baseline, averaged over 5 seeds so that one lucky draw cannot pass the test
    rand_err = sum(
        wrong[rank(trained_mlp, loader, acquisition="random", k=k, seed=s).indices].float().mean().item()
        for s in range(5)
    ) / 5
    overall = wrong.float().mean().item()
    assert bald_err >= 3 * max(rand_err, overall), (bald_err, rand_err, overall)
    entropy = rank(trained_mlp, loader, acquisition="entropy", k=k, samples=30, seed=0)
    assert wrong[entropy.indices].float().mean().item() > overall


def test_rank_indices_follow_dataset_order(trained_mlp, digits):
    _, _, xv, yv = digits
    small = DataLoader(TensorDataset(xv[:50], yv[:50]), batch_size=7)
    whole = mc_predict(trained_mlp, xv[:50], samples=10, seed=1)
    top = rank(trained_mlp, small, acquisition="variation_ratio", k=50, samples=10, seed=1)
    assert sorted(top.indices.tolist()) == list(range(50))
    # unlabelled pools: batches of x alone work too, and k larger than the pool is clipped
    pool = DataLoader(xv[:20], batch_size=8)
    assert rank(trained_mlp, pool, acquisition="bald", k=100, samples=5).indices.shape == (20,)
    assert whole.samples == 10


def test_rank_refuses_a_shuffling_loader(trained_mlp, digits):
    _, _, xv, yv = digits
    loader = DataLoader(TensorDataset(xv, yv), batch_size=64, shuffle=True)
    with pytest.raises(ValueError, match="shuffle=False"):
        rank(trained_mlp, loader, k=5)
    with pytest.raises(ValueError, match="acquisition must be one of"):
        rank(trained_mlp, DataLoader(xv), acquisition="margin", k=5)
    with pytest.raises(ValueError, match="k must be an integer >= 1"):
        rank(trained_mlp, DataLoader(xv), k=0)
