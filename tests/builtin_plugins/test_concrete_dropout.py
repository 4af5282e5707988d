"""Concrete dropout (Gal, Hron and Kendall 2017): the layer, the KL term scaled by the plan's N,
rates learned higher for 100 training points than for 10,000, a calibrated MC predictive
variance, logging and printing of the learned rates, and the config errors."""
from __future__ import annotations

import math

import pytest
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from regfw.config.schema import load_config
from regfw.errors import ConfigError
from regfw.layers import ConcreteDropout, concrete_regularizer
from regfw.registry.regularizers import build_regularizers
from regfw.train.module import RegularizedModule
from regfw.uncertainty import mc_predict, stochastic_modules

SIGMA = 0.5  # the known noise of the synthetic regression
TAU = 1 / SIGMA**2


def _data(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 1, generator=g) * 4 - 2
    return x, torch.sin(2 * x) + 0.5 * x + SIGMA * torch.randn(n, 1, generator=g)


def _net() -> nn.Module:
    return nn.Sequential(nn.Linear(1, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 1))


def _module(n: int, **settings) -> RegularizedModule:
    torch.manual_seed(0)
    return RegularizedModule(_net(), loss="mse", regularizers={"concrete_dropout": {
        "input": 0, "hidden": 0.1, "tau": TAU, **settings}}, n_examples=n, example_input=torch.zeros(2, 1),
        optimizer={"name": "adam", "lr": 1e-2})


def _train(n: int, steps: int = 400, batch: int = 200) -> RegularizedModule:
    """Adam on mse + the regularizer's penalty, as RegularizedModule.training_step computes it."""
    module = _module(n)
    x, y = _data(n, 1)
    opt = module.configure_optimizers()
    (reg,) = module.regularizers
    g = torch.Generator().manual_seed(2)
    for _ in range(steps):
        idx = torch.randint(0, n, (min(batch, n),), generator=g)
        loss = F.mse_loss(module(x[idx]), y[idx]) + reg.penalty(module.model)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return module


def test_the_layer_is_identity_in_eval_keeps_the_mean_and_learns_through_p():
    torch.manual_seed(0)
    layer = ConcreteDropout(0.3)
    x = torch.ones(20000, 8)
    assert layer.eval()(x) is x
    out = layer.train()(x)
    assert out.mean().item() == pytest.approx(1.0, abs=0.02)  # inverted: E[out] = x
    # P(relaxed drop > 1/2) = p exactly, at any temperature: 30% of the units scaled below 0.5 / 0.7
    assert ((out < 0.5 / 0.7).float().mean().item()) == pytest.approx(0.3, abs=0.005)  # 5 SE
    out.pow(2).sum().backward()
    assert layer.p_logit.grad is not None and layer.p_logit.grad.abs() > 0
    layer.p = 0.2
    assert layer.p == pytest.approx(0.2) and layer.input_dim == 8
    with pytest.raises(ValueError, match=r"initial rate p must be in \(0, 1\), got 0.0"):
        ConcreteDropout(0.0)


def test_the_kl_term_is_the_papers_and_falls_as_one_over_n():
    p = torch.tensor(0.2)
    term = concrete_regularizer(p, torch.tensor(4.0), 10, weight_scale=0.5, dropout_scale=0.01)
    assert term.item() == pytest.approx(0.5 * 4 / 0.8 + 0.01 * 10 * (0.2 * math.log(0.2) + 0.8 * math.log(0.8)))
    (small,) = _module(100).regularizers
    (large,) = _module(10000).regularizers
    # mse = (2 / tau) NLL: weight scale l^2 / (2N) and dropout scale 1 / N, both times 2 / tau
    assert small.scales() == pytest.approx((2 / TAU * 1e-8 / 200, 2 / TAU / 100))
    assert large.scales()[1] == pytest.approx(small.scales()[1] / 100)
    text = _module(100).plan.format()
    assert "initial rate, learned (N=100: weight reg 2.5e-11, dropout reg 0.005, on 2.weight)" in text


@pytest.fixture(scope="module")
def trained():
    return {n: _train(n) for n in (100, 10_000)}


def test_rates_learned_on_100_points_are_higher_than_on_10000(trained):
    """The pull of the KL term towards p = 0.5 falls as 1/N (seed 0; measured 0.19-0.23 for N=100
    and 0.02-0.03 for N=10,000): every layer's rate is at least 3x higher for the small set."""
    rates = {n: [layer.p for _, layer in m.regularizers[0].layers(m.model)] for n, m in trained.items()}
    assert len(rates[100]) == 2
    assert min(rates[100]) > 3 * max(rates[10_000])
    assert max(rates[100]) < 0.5 and min(rates[10_000]) > 0.001  # learned, neither at the prior nor collapsed


@pytest.mark.parametrize("n", [100, 10_000])
def test_mc_predictive_variance_is_calibrated(trained, n):
    """On 2000 fresh points of the training range, with T = 50 MC samples and the known noise
    (aleatoric 1 / tau) added: the mean of (y - mean)^2 / variance is 1 within 0.2 (measured 1.00
    and 1.02), and the central 90% intervals cover 90% within 5 points (measured 90.1% and 89.9%)."""
    module = trained[n]
    assert [type(m).__name__ for _, m in stochastic_modules(module)] == ["ConcreteDropout"] * 2
    x, y = _data(2000, 7)
    result = mc_predict(module, x, samples=50, task="regression", tau=TAU, seed=0)
    mean, variance = result.summary.mean, result.summary.variance
    assert result.outputs.std(0).mean() > 0  # really sampled
    z2 = ((y - mean) ** 2 / variance).mean().item()
    assert z2 == pytest.approx(1.0, abs=0.2)
    cover = ((y - mean).abs() <= 1.6449 * variance.sqrt()).float().mean().item()
    assert cover == pytest.approx(0.90, abs=0.05)


def test_a_fit_logs_the_learned_rates_every_epoch_and_prints_them_at_the_end(capsys, tmp_path):
    module = _module(256)
    x, y = _data(256, 3)
    loader = DataLoader(TensorDataset(x, y), batch_size=64)
    trainer = pl.Trainer(max_epochs=2, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, default_root_dir=tmp_path)
    trainer.fit(module, loader)
    rates = {p: layer.p for p, layer in module.regularizers[0].layers(module.model)}
    for path, value in rates.items():
        assert trainer.callback_metrics[f"concrete_dropout/rate/{path}"].item() == pytest.approx(value)
    out = capsys.readouterr().out
    assert "concrete_dropout: learned rates 1.regfw_concrete_dropout 0." in out
    assert "train_penalty" in trainer.callback_metrics  # the KL term is part of the training loss
    # a checkpoint keeps the learned rate bitwise (it is a parameter)
    path = tmp_path / "concrete.ckpt"
    trainer.save_checkpoint(path)
    again = RegularizedModule.load_from_checkpoint(path, model=_net())
    assert torch.equal(again.model[1].regfw_concrete_dropout.p_logit, module.model[1].regfw_concrete_dropout.p_logit)


def test_config_errors_name_the_key_and_the_fix(tmp_path):
    with pytest.raises(ConfigError, match=r"regularizers\.concrete_dropout\.schedule: got kind 'linear', but concrete "
                                          r"dropout learns its rates .*; remove `schedule`"):
        build_regularizers({"concrete_dropout": {"schedule": {"kind": "linear", "epochs": 3}}})
    with pytest.raises(ConfigError, match=r"regularizers\.concrete_dropout\.temperature: got 0\.0, expected a value "
                                          r"in > 0"):
        build_regularizers({"concrete_dropout": {"temperature": 0}})
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text("data: {name: diabetes}\nmodel: {loss: mse}\nregularizers: {concrete_dropout: {}}\n")
    with pytest.raises(ConfigError, match=r"regularizers\.concrete_dropout\.tau: the loss is mse, .* set it"):
        load_config(cfg)
    cfg.write_text("regularizers: {concrete_dropout: {}, adaptive_dropout: {}}\n")
    with pytest.raises(ConfigError, match=r"regularizers\.concrete_dropout learns its rates by gradient descent and "
                                          r"regularizers\.adaptive_dropout would move them too; remove one"):
        load_config(cfg)
    with pytest.raises(ConfigError, match=r"regularizers\.concrete_dropout: the training-set size N is unknown"):
        RegularizedModule(_net(), loss="mse", regularizers={"concrete_dropout": {"tau": 1.0}},
                          example_input=torch.zeros(2, 1))
