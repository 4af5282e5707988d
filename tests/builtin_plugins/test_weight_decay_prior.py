"""``weight_decay.prior``: the MC dropout prior of Gal & Ghahramani (2016) stated as the paper states it.

The paper's code gives every Dense layer Keras's ``l2(reg)``, which adds ``reg * sum(w^2)`` (no 1/2)
to the mean squared error, with ``reg = l^2 (1 - p) / (2 N tau)``; regfw's ``l2`` mode adds
``strength / 2 * sum(w^2)``, so the prior sets ``strength = 2 * reg``. The factor 2 is the signal
these tests check: the two candidate penalties differ by 100%, against a float32 rounding of ~1e-7.
"""
from __future__ import annotations

import warnings

import pytest
import pytorch_lightning as pl
import torch
from regfw_plugins.weight_decay import WeightDecay, WeightDecayConfig, prior_reg
from torch import nn

from regfw.cli.main import main
from regfw.config.schema import validate
from regfw.errors import ConfigError
from regfw.registry.regularizers import build_regularizers
from regfw.train.module import RegularizedModule

PRIOR = {"length_scale": 1e-2, "tau": 0.5}
NOTE = "regularizers.weight_decay: mode decoupled shrinks the weights each step and adds no loss term"


def _net() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 50), nn.ReLU(), nn.Linear(50, 1))


def _module(dropout: dict, prior: dict = PRIOR, n_examples: int | None = 300) -> RegularizedModule:
    return RegularizedModule(_net(), loss="mse", task="regression", n_examples=n_examples,
                             example_input=torch.zeros(2, 6),
                             regularizers={"dropout": dropout, "weight_decay": {"prior": prior}})


def test_prior_adds_the_papers_keras_l2_term_with_p_from_the_models_dropout():
    module = _module({"input": 0.05, "hidden": 0.05})
    (wd,) = [r for r in module.regularizers if isinstance(r, WeightDecay)]
    reg = 1e-4 * (1 - 0.05) / (2 * 300 * 0.5)
    assert prior_reg(1e-2, 0.05, 300, 0.5) == pytest.approx(reg, rel=1e-15)
    net = module.model
    w0, w2 = net[0].weight, net[2].weight
    squares = float(w0.detach().double().pow(2).sum() + w2.detach().double().pow(2).sum())
    penalty = wd.penalty(net)
    assert float(penalty) == pytest.approx(reg * squares, rel=1e-6)  # Keras l2(reg): reg * sum(w^2), biases out
    assert wd.strength(net) == pytest.approx(2 * reg, rel=1e-15)  # regfw's strength / 2 * sum(w^2)
    penalty.backward()
    assert torch.allclose(w0.grad, 2 * reg * w0.detach(), rtol=1e-6, atol=0)  # d/dw of reg * w^2
    assert net[0].bias.grad is None and net[2].bias.grad is None


def test_one_training_step_applies_the_prior_and_logs_its_term():
    module = _module({"input": 0.1, "hidden": 0.1})
    x, y = torch.randn(32, 6), torch.randn(32, 1)
    trainer = pl.Trainer(max_steps=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, accelerator="cpu", devices=1)
    weights = [module.model[0].weight.detach().clone(), module.model[2].weight.detach().clone()]
    trainer.fit(module, torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=32))
    reg = 1e-4 * 0.9 / (2 * 300 * 0.5)
    expected = reg * sum(float(w.double().pow(2).sum()) for w in weights)
    assert float(trainer.callback_metrics["train_penalty/weight_decay"]) == pytest.approx(expected, rel=1e-5)


def test_plan_prints_the_computed_coefficient_with_p_and_n_from_the_config_and_data(tmp_path, capsys):
    config = tmp_path / "c.yaml"
    config.write_text("data: {name: diabetes}\nmodel: {name: mlp, init_args: {hidden: [50]}}\n"
                      "regularizers:\n  dropout: {input: 0.05, hidden: 0.05}\n"
                      "  weight_decay: {prior: {length_scale: 1e-2, tau: 0.5}}\n")
    assert main(["plan", str(config)]) == 0
    out = capsys.readouterr().out
    n = int(out.split("plan: N=")[1].split()[0])
    reg = 1e-4 * 0.95 / (2 * n * 0.5)
    assert (f"weight_decay: mode l2 from the prior: reg = l^2 (1 - p) / (2 N tau) = 0.01^2 * (1 - 0.05) / "
            f"(2 * {n} * 0.5) = {reg:.6g}; loss += reg * sum(w^2) over the decay group (strength {2 * reg:.6g}") in out


def test_an_explicit_prior_dropout_and_n_take_precedence():
    (wd,) = build_regularizers({"weight_decay": {"prior": {"tau": 2.0, "dropout": 0.2, "n_examples": 1000}}})
    net = _net()
    wd.plan(net, type("Ctx", (), {"n_examples": 50})())
    assert wd.strength(net) == pytest.approx(2 * 1e-4 * 0.8 / (2 * 1000 * 2.0), rel=1e-15)


def test_prior_config_errors_name_the_key():
    with pytest.raises(ConfigError, match=r"regularizers\.weight_decay\.prior\.tau: missing; the prior needs the "
                                          r"noise precision tau"):
        build_regularizers({"weight_decay": {"prior": {"length_scale": 1e-2}}})
    with pytest.raises(ConfigError, match=r"regularizers\.weight_decay\.strength: got 0\.1 together with prior"):
        build_regularizers({"weight_decay": {"strength": 0.1, "prior": PRIOR}})
    with pytest.raises(ConfigError, match=r"regularizers\.weight_decay\.mode: got 'decoupled' together with prior"):
        build_regularizers({"weight_decay": {"mode": "decoupled", "prior": PRIOR}})
    with pytest.raises(ConfigError, match=r"regularizers\.weight_decay\.prior\.length_scale: got -1"):
        build_regularizers({"weight_decay": {"prior": {"length_scale": -1, "tau": 1}}})
    assert WeightDecayConfig(prior=None).resolved_mode == "decoupled"


def test_no_single_rate_or_no_n_is_an_error_saying_what_to_set():
    raw = {"data": {"name": "diabetes"}, "model": {"name": "mlp"},
           "regularizers": {"dropout": {"input": 0.1, "hidden": 0.2}, "weight_decay": {"prior": PRIOR}}}
    with pytest.raises(ConfigError, match=r"prior\.dropout: null, and regularizers\.dropout has input 0\.1 and "
                                          r"hidden 0\.2, so the prior has no single rate p\. Set prior\.dropout"):
        validate(raw)
    module = _module({"input": 0.1, "hidden": 0.2})  # Python API: checked on the model at the first penalty
    (wd,) = [r for r in module.regularizers if isinstance(r, WeightDecay)]
    with pytest.raises(ConfigError, match=r"prior\.dropout: null and the model has dropout layers of rates 0\.1, "
                                          r"0\.2"):
        wd.penalty(module.model)
    with pytest.raises(ConfigError, match=r"prior\.n_examples: null and the data did not say its number of training "
                                          r"examples N"):
        _module({"input": 0.1, "hidden": 0.1}, n_examples=None)


def test_decoupled_mode_in_mc_regression_is_noted_once_and_only_there(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    base = ("model: {init_args: {hidden: [8]}}\nuncertainty: {samples: 3, plots: false}\n"
            "trainer: {max_epochs: 1, enable_progress_bar: false, enable_model_summary: false}\n")
    cases = {"regression": ("data: {name: diabetes, batch_size: 64}\n"
                            "regularizers: {dropout: {hidden: 0.1}, weight_decay: {}}\n", 1),
             "prior": ("data: {name: diabetes, batch_size: 64}\n"
                       "regularizers: {dropout: {hidden: 0.1}, weight_decay: {prior: {tau: 1.0}}}\n", 0),
             "classification": ("data: {name: digits, train_fraction: 0.1, batch_size: 64}\n"
                                "regularizers: {dropout: {hidden: 0.1}, weight_decay: {}}\n", 0)}
    for name, (text, count) in cases.items():
        (tmp_path / f"{name}.yaml").write_text(base + text)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            assert main(["fit", f"{name}.yaml", "--run-dir", f"run_{name}"]) == 0
        notes = [str(w.message) for w in caught if NOTE in str(w.message)]
        assert len(notes) == count, (name, notes)
        if count:
            assert "regularizers.weight_decay.prior: {length_scale: 1e-2, tau: TAU}" in notes[0]
            assert "\n" not in notes[0]
