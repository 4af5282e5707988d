"""The MC regression test log-likelihood (Gal & Ghahramani 2016, eq. 8 and their UCI tables):
``mc/ll_mixture`` equals the paper's formula computed independently here, ``MCResult`` keeps the
tau it sampled with, metrics are never a silent NaN, and float64 outputs stay float64."""
from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from regfw.uncertainty import MCDropoutUncertainty, mc_predict
from regfw.uncertainty.accumulators import MCClassificationMetrics, MCRegressionMetrics
from regfw.uncertainty.sampling import split_mean_logvar
from regfw.uncertainty.summaries import (
    classification_summary,
    mixture_ll_elements,
    mixture_nll_elements,
    regression_summary,
)


def _logsumexp(a: np.ndarray, axis: int = 0) -> np.ndarray:
    m = a.max(axis=axis, keepdims=True)
    return (m + np.log(np.exp(a - m).sum(axis=axis, keepdims=True))).squeeze(axis)


def paper_ll_fixed_tau(yhat: np.ndarray, y: np.ndarray, tau: float) -> np.ndarray:
    """Per-point test log-likelihood, the formula of Gal & Ghahramani's UCI code, ``yhat`` [T, N]:
    logsumexp_t(-tau/2 (y - yhat_t)^2) - log T - log(2 pi)/2 + log(tau)/2."""
    t = yhat.shape[0]
    return (_logsumexp(-0.5 * tau * (y[None] - yhat) ** 2) - math.log(t) - 0.5 * math.log(2 * math.pi)
            + 0.5 * math.log(tau))


def paper_ll_heteroscedastic(mu: np.ndarray, var: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Per-point log density of the equal-weight mixture of the T Gaussians N(mu_t, var_t)."""
    log_n = -0.5 * np.log(2 * math.pi * var) - (y[None] - mu) ** 2 / (2 * var)
    return _logsumexp(log_n) - math.log(mu.shape[0])


def dropout_regressor(seed: int, d_in: int = 4, d_out: int = 1, dtype: torch.dtype = torch.float32) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(d_in, 32), nn.ReLU(), nn.Dropout(0.3), nn.Linear(32, d_out)).to(dtype)


# --------------------------------------------------------------------------- the formula


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_ll_mixture_equals_the_papers_formula_for_a_fixed_tau(seed):
    model = dropout_regressor(seed)
    g = torch.Generator().manual_seed(seed)
    x, y = torch.randn(200, 4, generator=g), torch.randn(200, generator=g)
    tau = 3.7
    r = mc_predict(model, x, samples=25, seed=seed, task="regression", tau=tau)
    ll = r.ll_mixture(y).numpy()
    ref = paper_ll_fixed_tau(r.outputs[..., 0].double().numpy(), y.double().numpy(), tau)
    np.testing.assert_allclose(ll, ref, rtol=1e-6, atol=1e-6)
    # the signal is far above round-off: the mixture differs from the moment-matched Gaussian's
    # log-likelihood by much more than the tolerance
    moment = -0.5 * (np.log(2 * math.pi * r.variance[..., 0].numpy()) + (y.numpy() - r.mean[..., 0].numpy()) ** 2
                     / r.variance[..., 0].numpy())
    assert np.abs(ll - moment).max() > 1e-3
    # the summary computes the same terms itself
    np.testing.assert_allclose(r.summary.ll_mixture(y).numpy(), ll, rtol=0, atol=0)


@pytest.mark.parametrize("seed", [0, 1])
def test_ll_mixture_equals_the_gaussian_mixture_for_heteroscedastic_variances(seed):
    model = dropout_regressor(seed, d_out=2)
    g = torch.Generator().manual_seed(seed)
    x, y = torch.randn(150, 4, generator=g), torch.randn(150, generator=g)
    r = mc_predict(model, x, samples=20, seed=seed, task="regression", output_transform=split_mean_logvar)
    assert r.tau is None and r.variances is not None
    with pytest.raises(ValueError) as err:
        r.ll_mixture(y, tau=2.0)
    assert str(err.value) == ("tau=2.0 given, but these samples carry predicted variances, which the mixture "
                              "uses; leave tau out")
    mu = r.summary.sample_means[..., 0].double().numpy()
    var = r.variances[..., 0].double().numpy()
    assert var.std() > 1e-2  # the variances really differ per sample and point
    ref = paper_ll_heteroscedastic(mu, var, y.double().numpy())
    np.testing.assert_allclose(r.ll_mixture(y).numpy(), ref, rtol=1e-6, atol=1e-6)
    metric = MCRegressionMetrics()
    metric.update(r.summary, y)
    out = metric.compute()
    assert float(out["ll_mixture"]) == pytest.approx(float(ref.mean()), rel=1e-6)


def test_ll_is_the_log_likelihood_and_nll_its_negative():
    g = torch.Generator().manual_seed(3)
    means = torch.randn(10, 64, 2, generator=g, dtype=torch.float64)
    y = means.mean(0) + 0.1 * torch.randn(64, 2, generator=g, dtype=torch.float64)
    ll = mixture_ll_elements(means, y, tau=4.0)
    assert torch.equal(mixture_nll_elements(means, y, tau=4.0), -ll)
    # higher is better: targets far from the predictions have a lower log-likelihood
    assert float(mixture_ll_elements(means, y + 3.0, tau=4.0).mean()) < float(ll.mean()) - 1.0
    metric = MCRegressionMetrics()
    metric.update(regression_summary(means, tau=4.0), y)
    out = metric.compute()
    assert float(out["ll_mixture"]) == pytest.approx(float(ll.mean()), rel=1e-12)
    assert float(out["nll_mixture"]) == -float(out["ll_mixture"])


def test_an_explicit_mixture_nll_given_to_update_still_feeds_both_names():
    g = torch.Generator().manual_seed(4)
    means, y = torch.randn(5, 30, 1, generator=g), torch.randn(30, generator=g)
    given = torch.full((30,), 0.25, dtype=torch.float64)
    metric = MCRegressionMetrics()
    metric.update(regression_summary(means), y, mixture_nll=given)  # no tau: only the given terms exist
    out = metric.compute()
    assert float(out["nll_mixture"]) == pytest.approx(0.25) and float(out["ll_mixture"]) == pytest.approx(-0.25)


# --------------------------------------------------------------------------- tau is kept


def test_mc_result_keeps_its_tau_and_rejects_another():
    model = dropout_regressor(0)
    x, y = torch.randn(20, 4), torch.randn(20)
    r = mc_predict(model, x, samples=5, seed=0, task="regression", tau=2.0)
    assert r.tau == 2.0
    assert torch.equal(r.ll_mixture(y, tau=2.0), r.ll_mixture(y))  # the same value is fine
    assert torch.equal(r.nll_mixture(y), -r.ll_mixture(y))
    expected = ("tau=0.5 differs from the tau=2.0 these samples were drawn and summarised with "
                "(mc_predict(..., tau=2.0)); leave tau out to use the stored value, or sample again "
                "with mc_predict(..., tau=0.5)")
    for method in (r.ll_mixture, r.nll_mixture):
        with pytest.raises(ValueError) as err:
            method(y, tau=0.5)
        assert str(err.value) == expected


def test_a_tau_given_later_still_works_when_none_was_stored():
    model = dropout_regressor(0)
    x, y = torch.randn(20, 4), torch.randn(20)
    r = mc_predict(model, x, samples=5, seed=0, task="regression")
    assert r.tau is None
    assert torch.allclose(r.ll_mixture(y, tau=2.0),
                          mc_predict(model, x, samples=5, seed=0, task="regression", tau=2.0).ll_mixture(y))
    with pytest.raises(ValueError, match=r"^the mixture log-likelihood needs a noise precision: pass "
                                         r"mc_predict\(\.\.\., tau=\.\.\.\) \(uncertainty\.tau in a config\)"):
        r.ll_mixture(y)


# --------------------------------------------------------------------------- never a silent NaN


def test_without_tau_or_variances_the_mixture_is_left_out_with_one_warning():
    g = torch.Generator().manual_seed(5)
    metric = MCRegressionMetrics()
    for _ in range(2):
        metric.update(regression_summary(torch.randn(6, 40, 1, generator=g)), torch.randn(40, generator=g))
    with pytest.warns(UserWarning, match=r"^MCRegressionMetrics: ll_mixture, nll_mixture left out of the results: "
                                         r"the mixture of the T Gaussians needs a noise precision: set "
                                         r"uncertainty\.tau"):
        out = metric.compute()
    assert "ll_mixture" not in out and "nll_mixture" not in out and "det_rmse" not in out
    assert all(math.isfinite(float(v)) for v in out.values()) and "rmse" in out
    metric.update(regression_summary(torch.randn(6, 40, 1, generator=g)), torch.randn(40, generator=g))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert "ll_mixture" not in metric.compute()  # computed again, not warned again


def test_classification_nan_paths_are_left_out_with_their_reason():
    probs = torch.tensor([[[0.9, 0.1], [0.2, 0.8], [0.7, 0.3]]] * 3, dtype=torch.float64)
    metric = MCClassificationMetrics(refer_fraction=1.0)
    metric.update(classification_summary(probs), torch.tensor([0, 1, 0]))  # all right, no deterministic pass
    with pytest.warns(UserWarning) as record:
        out = metric.compute()
    text = "\n".join(str(w.message) for w in record)
    assert ("MCClassificationMetrics: auroc_error left out of the results: the error AUROC needs both right and "
            "wrong predictions, and every scored input was right") in text
    assert "det_acc left out of the results: no deterministic pass was made" in text
    assert "retained_acc left out of the results: every input was referred (refer_fraction=1.0)" in text
    assert {"auroc_error", "det_acc", "retained_acc"}.isdisjoint(out)
    assert all(math.isfinite(float(v)) for v in out.values()) and float(out["acc"]) == 1.0


# --------------------------------------------------------------------------- through the callback


class LitRegressor(pl.LightningModule):
    def __init__(self):
        super().__init__()
        self.net = dropout_regressor(0, d_in=8)

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.mse_loss(self(x).squeeze(-1), y)

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val_loss", F.mse_loss(self(x).squeeze(-1), y))

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=3e-3)


def _fit(tmp_path, cb):
    pl.seed_everything(0, verbose=False)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(256, 8, generator=g)
    y = x @ torch.randn(8, generator=g) + 0.3 * torch.randn(256, generator=g)
    train = DataLoader(TensorDataset(x[:192], y[:192]), batch_size=32, shuffle=True)
    val = DataLoader(TensorDataset(x[192:], y[192:]), batch_size=32)
    t = pl.Trainer(max_epochs=2, accelerator="cpu", devices=1, logger=False, callbacks=[cb],
                   enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
                   default_root_dir=str(tmp_path), num_sanity_val_steps=0)
    t.fit(LitRegressor(), train, val)
    return t


def test_a_regression_fit_logs_a_finite_ll_mixture_equal_to_minus_the_nll(tmp_path):
    cb = MCDropoutUncertainty(samples=8, task="regression", tau=4.0, seed=0)
    t = _fit(tmp_path, cb)
    m = cb.last_metrics
    assert math.isfinite(m["mc/ll_mixture"]) and m["mc/ll_mixture"] == -m["mc/nll_mixture"]
    assert float(t.callback_metrics["mc/ll_mixture"]) == pytest.approx(m["mc/ll_mixture"], rel=1e-6)
    assert all(math.isfinite(v) for v in m.values()), m


def test_a_regression_fit_without_tau_leaves_the_mixture_out_and_says_why(tmp_path):
    cb = MCDropoutUncertainty(samples=8, task="regression", seed=0)
    with pytest.warns(UserWarning, match=r"ll_mixture, nll_mixture left out of the results: .* set uncertainty\.tau"):
        _fit(tmp_path, cb)
    m = cb.last_metrics
    assert "mc/ll_mixture" not in m and "mc/rmse" in m
    assert all(math.isfinite(v) for v in m.values()), m


# --------------------------------------------------------------------------- float64 kept


class Offset(nn.Module):
    """A dropout regressor whose outputs sit on a large offset (1e6 + a small signal)."""

    def __init__(self, dtype: torch.dtype):
        super().__init__()
        torch.manual_seed(0)
        self.body = nn.Sequential(nn.Linear(3, 16), nn.Tanh(), nn.Dropout(0.3), nn.Linear(16, 1)).to(dtype)

    def forward(self, x):
        return 1e6 + self.body(x)


def test_float64_outputs_keep_every_digit_of_a_large_offset():
    g = torch.Generator().manual_seed(6)
    x = torch.randn(100, 3, generator=g, dtype=torch.float64)
    y = 1e6 + torch.randn(100, generator=g, dtype=torch.float64)
    tau = 2.0
    r = mc_predict(Offset(torch.float64), x, samples=10, seed=0, task="regression", tau=tau)
    assert r.outputs.dtype == r.mean.dtype == r.summary.sample_means.dtype == torch.float64
    metric = MCRegressionMetrics()
    metric.update(r.summary, y)
    out = metric.compute()
    yhat = r.outputs[..., 0].numpy()  # float64, by hand from here on
    ref_rmse = math.sqrt(float(((yhat.mean(0) - y.numpy()) ** 2).mean()))
    ref_ll = float(paper_ll_fixed_tau(yhat, y.numpy(), tau).mean())
    assert float(out["rmse"]) == pytest.approx(ref_rmse, rel=1e-10)
    assert float(out["ll_mixture"]) == pytest.approx(ref_ll, rel=1e-10)
    # the signal: the same samples rounded to float32 (a step of 0.0625 at 1e6) move both figures by
    # orders of magnitude more than the tolerance
    rounded = yhat.astype(np.float32).astype(np.float64)
    assert abs(float(paper_ll_fixed_tau(rounded, y.numpy(), tau).mean()) - ref_ll) > 1e-5 * abs(ref_ll)
    assert abs(math.sqrt(float(((rounded.mean(0) - y.numpy()) ** 2).mean())) - ref_rmse) > 1e-5 * ref_rmse


def test_float32_stays_float32_and_half_precision_is_summarised_in_float32():
    x = torch.randn(30, 3)
    r = mc_predict(dropout_regressor(0, d_in=3), x, samples=4, seed=0, task="regression", tau=1.0)
    assert r.outputs.dtype == r.mean.dtype == r.variance.dtype == torch.float32
    r16 = mc_predict(dropout_regressor(0, d_in=3, dtype=torch.bfloat16), x.bfloat16(), samples=4, seed=0,
                     task="regression", tau=1.0)
    assert r16.outputs.dtype == torch.bfloat16 and r16.mean.dtype == torch.float32


# --------------------------------------------------------------------------- through the CLI


@pytest.mark.parametrize("loss, tau", [("mse", "4.0"), ("gaussian_nll", None)])
def test_regfw_fit_writes_the_mixture_log_likelihood_to_metrics_csv(tmp_path, loss, tau):
    import csv

    from regfw.cli.main import main

    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(f"data: {{name: diabetes}}\nmodel: {{name: mlp, loss: {loss}}}\n"
                   "regularizers: {dropout: {hidden: 0.3}}\n"
                   "uncertainty: {samples: 6, every_n_epochs: 1, plots: false, calibration: {enabled: false}}\n"
                   "trainer: {max_epochs: 1, enable_progress_bar: false, enable_model_summary: false}\n")
    run = tmp_path / "run"
    overrides = [] if tau is None else [f"uncertainty.tau={tau}"]
    assert main(["fit", str(cfg), *overrides, "--run-dir", str(run)]) == 0
    with open(run / "metrics.csv") as fh:
        rows = [r for r in csv.DictReader(fh) if r.get("mc/rmse")]
    assert len(rows) == 1
    ll, nll = float(rows[0]["mc/ll_mixture"]), float(rows[0]["mc/nll_mixture"])
    assert math.isfinite(ll) and ll == pytest.approx(-nll, rel=1e-6)
    assert all(math.isfinite(float(v)) for k, v in rows[0].items() if k.startswith("mc/") and v), rows[0]
