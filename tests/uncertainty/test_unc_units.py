"""MC regression metrics in original units: the target scaling a data module declares is undone
once (regfw/train/targets.py), for predictions and targets alike, and the results equal the metrics
computed by hand directly in original units."""
from __future__ import annotations

import math

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from regfw.errors import ConfigError
from regfw.train.targets import TargetScaling, declared_scaling
from regfw.uncertainty import MCDropoutUncertainty, mc_predict
from regfw.uncertainty.rng import derive_seed

MEAN, STD, TAU, T, SEED = 150.0, 40.0, 4.0, 20, 7


class Regressor(pl.LightningModule):
    """A dropout MLP predicting standardised targets."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(5, 32), nn.ReLU(), nn.Dropout(0.3), nn.Linear(32, 1))

    def forward(self, x):
        return self.net(x)

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val_loss", F.mse_loss(self(x), y))


class ScaledData(pl.LightningDataModule):
    """Standardised targets, with the scaling declared the documented way: ``target_scaling``."""

    target_scaling = (MEAN, STD)

    def __init__(self) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(1)
        self.x = torch.randn(96, 5, generator=g)
        self.z = (self.x[:, :1] * 0.8 + 0.3 * torch.randn(96, 1, generator=g))

    def val_dataloader(self):
        return DataLoader(TensorDataset(self.x, self.z), batch_size=96)


def _validate(units: str, tau: float = TAU, **kw) -> dict[str, float]:
    model, data = Regressor(), ScaledData()
    cb = MCDropoutUncertainty(samples=T, task="regression", tau=tau, plots=False, seed=SEED, units=units, **kw)
    pl.Trainer(logger=False, enable_progress_bar=False, enable_model_summary=False, callbacks=[cb],
               accelerator="cpu").validate(model, datamodule=data, verbose=False)
    return cb.last_metrics


def test_metrics_equal_those_computed_directly_in_original_units():
    got = _validate("original")
    model, data = Regressor(), ScaledData()
    result = mc_predict(model, data.x, samples=T, seed=derive_seed(SEED, 0, 0, 0, 0), task="regression")
    mu = result.outputs.double().squeeze(-1) * STD + MEAN  # [T, B] sampled means, original units
    y = data.z.double().squeeze(-1) * STD + MEAN
    tau = TAU  # stated in the units the metrics are reported in: original
    rmse = float(((mu.mean(0) - y) ** 2).mean().sqrt())
    log_dens = -0.5 * tau * (y - mu) ** 2 + 0.5 * math.log(tau) - 0.5 * math.log(2 * math.pi)
    nll_mixture = float(-(torch.logsumexp(log_dens, 0) - math.log(T)).mean())
    var = 1 / tau + mu.var(0, unbiased=False)
    nll = float((0.5 * torch.log(2 * math.pi * var) + 0.5 * (y - mu.mean(0)) ** 2 / var).mean())
    assert rmse > 10  # original units: far from the standardised value (about 0.5)
    assert got["mc/rmse"] == pytest.approx(rmse, rel=1e-5)
    assert got["mc/nll_mixture"] == pytest.approx(nll_mixture, rel=1e-5)
    assert got["mc/nll"] == pytest.approx(nll, rel=1e-5)
    assert got["mc/mean_aleatoric"] == pytest.approx(1 / TAU, rel=1e-5)
    assert got["mc/mean_variance"] == pytest.approx(float(var.mean()), rel=1e-5)


def test_original_and_standardized_differ_by_the_jacobian():
    # the same noise stated in each unit: precision TAU of the original targets is TAU * STD^2 of the model's
    orig, std = _validate("original"), _validate("standardized", tau=TAU * STD**2)
    assert math.log(STD) > 3  # the shift is far above float32 noise (1e-6 relative)
    assert orig["mc/nll_mixture"] - std["mc/nll_mixture"] == pytest.approx(math.log(STD), abs=1e-4)
    assert orig["mc/nll"] - std["mc/nll"] == pytest.approx(math.log(STD), abs=1e-4)
    assert orig["mc/rmse"] / std["mc/rmse"] == pytest.approx(STD, rel=1e-5)
    assert orig["mc/mean_epistemic"] / std["mc/mean_epistemic"] == pytest.approx(STD**2, rel=1e-5)
    for level in (50, 80, 90, 95):  # intervals scale with the data: coverage is unchanged
        assert orig[f"mc/coverage_{level}"] == std[f"mc/coverage_{level}"]


def test_explicit_scaling_wins_over_the_data_modules():
    got = _validate("original", target_scaling=TargetScaling(0.0, 2 * STD))
    std = _validate("standardized")
    assert got["mc/rmse"] / std["mc/rmse"] == pytest.approx(2 * STD, rel=1e-5)


def test_predicted_variances_are_mapped_too():
    """A heteroscedastic output (mean, variance): the variances scale by std^2."""
    from regfw.tensors import split_mean_variance

    class Hetero(Regressor):
        def __init__(self) -> None:
            super().__init__()
            torch.manual_seed(0)
            self.net = nn.Sequential(nn.Linear(5, 32), nn.ReLU(), nn.Dropout(0.3), nn.Linear(32, 2))

        def validation_step(self, batch, batch_idx):
            pass

    def run(units):
        cb = MCDropoutUncertainty(samples=T, task="regression", plots=False, seed=SEED, units=units,
                                  output_transform=split_mean_variance)
        pl.Trainer(logger=False, enable_progress_bar=False, enable_model_summary=False, callbacks=[cb],
                   accelerator="cpu").validate(Hetero(), datamodule=ScaledData(), verbose=False)
        return cb.last_metrics

    orig, std = run("original"), run("standardized")
    assert orig["mc/mean_aleatoric"] / std["mc/mean_aleatoric"] == pytest.approx(STD**2, rel=1e-5)
    assert orig["mc/nll_mixture"] - std["mc/nll_mixture"] == pytest.approx(math.log(STD), abs=1e-4)


def test_target_scaling_values_checked_by_name():
    with pytest.raises(ConfigError, match=r"target_scaling: std must be finite and > 0 .* got 0"):
        TargetScaling(1.0, 0)
    with pytest.raises(ConfigError, match=r"Bad.target_scaling: expected a TargetScaling, a \(mean, std\) pair"):
        declared_scaling(type("Bad", (), {"target_scaling": "loud"})())
    with pytest.raises(ConfigError, match=r"expected a mapping with the keys mean and std, got keys \['mu'"):
        TargetScaling.of({"mu": 1, "std": 2})
    assert TargetScaling.of({"mean": 1, "std": [2, 3]}) == TargetScaling(1.0, (2.0, 3.0))
    per_output = TargetScaling((0.0, 10.0), (1.0, 2.0))
    assert per_output.to_original(torch.ones(3, 2)).tolist() == [[1.0, 12.0]] * 3
    assert per_output.variance_to_original(torch.ones(1, 2)).tolist() == [[1.0, 4.0]]
    with pytest.raises(ValueError, match=r"units must be one of \['original', 'standardized'\], got 'raw'"):
        MCDropoutUncertainty(task="regression", units="raw")


@pytest.mark.parametrize("standardize", [True, False])
def test_diabetes_declares_its_target_scaling(standardize):
    from sklearn.datasets import load_diabetes

    from regfw.build.datasets import DiabetesData

    data = DiabetesData(seed=3, standardize_targets=standardize, test_fraction=0.2)
    raw = load_diabetes().target
    order = np.random.default_rng(3).permutation(len(raw))
    n_val = int(round(len(raw) * 0.25))
    val_raw = raw[order[:n_val]]
    test_raw = raw[order[n_val:n_val + data.n_test]]
    scaling = declared_scaling(data)
    if standardize:
        train_raw = raw[order[n_val + data.n_test:]]
        assert scaling.mean == pytest.approx(train_raw.mean(), rel=1e-6)
        assert scaling.std == pytest.approx(train_raw.std(), rel=1e-6)
        assert data.y_val.double().mean().abs() < 0.3  # standardised
        np.testing.assert_allclose(scaling.to_original(data.y_val).squeeze(-1).numpy(), val_raw, rtol=1e-5)
    else:
        assert scaling is None
        np.testing.assert_allclose(data.y_val.squeeze(-1).numpy(), val_raw, rtol=1e-6)
        np.testing.assert_allclose(data.y_test.squeeze(-1).numpy(), test_raw, rtol=1e-6)
    assert data.n_test == round(len(raw) * 0.2) and len(data.y_test) == data.n_test


def test_test_fraction_keeps_the_validation_split():
    from regfw.build.datasets import DigitsData

    plain, held = DigitsData(seed=0), DigitsData(seed=0, test_fraction=0.2)
    assert torch.equal(plain.x_val, held.x_val)
    assert len(held.x_train) + len(held.x_test) == len(plain.x_train)
    with pytest.raises(ConfigError, match=r"data.init_args.test_fraction: got 1.5, expected a fraction in \[0, 1\)"):
        DigitsData(test_fraction=1.5)
    with pytest.raises(ConfigError, match=r"data: DigitsData has no test split \(test_fraction=0.0\); set "
                                          r"data.init_args.test_fraction"):
        plain.test_dataloader()
