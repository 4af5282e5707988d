"""Co-adaptation: the correlation measure, the layers it picks, the monitor callback, the plugin, and
the seed's claim that dropout lowers it on the ``mlp`` demo."""
from __future__ import annotations

import math
import subprocess
import sys

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
from regfw_plugins.coadaptation.layers import unit_layers
from regfw_plugins.coadaptation.monitor import (
    CoadaptationMonitor,
    CorrelationStats,
    coadaptation,
    mean_coadaptation,
)
from torch import nn

from regfw.build.datasets import DigitsDataModule
from regfw.build.models import CNN, MLP
from regfw.train.module import RegularizedModule
from regfw.uncertainty import MCDropoutUncertainty


def _numpy_mean_abs_corr(h: np.ndarray) -> float:
    h = h[:, h.std(0) > 1e-6]
    c = np.corrcoef(h.T)
    n = c.shape[0]
    return float((np.abs(c).sum() - n) / (n * (n - 1)))


def test_streamed_statistics_match_numpy_corrcoef():
    """Batches streamed through CorrelationStats give numpy's corrcoef answer; dead units are left out."""
    g = torch.Generator().manual_seed(0)
    base = torch.randn(500, 3, generator=g)
    h = torch.cat([base @ torch.randn(3, 12, generator=g), torch.zeros(500, 2)], dim=1)  # 2 dead units
    stats = CorrelationStats(14)
    for chunk in h.split(64):
        stats.update(chunk)
    assert stats.mean_abs_correlation() == pytest.approx(_numpy_mean_abs_corr(h.numpy()), abs=1e-9)
    result = stats.result("layer")
    assert (result.units, result.dead, result.observations) == (14, 2, 500)


def test_independent_units_score_near_zero_and_copies_score_one():
    g = torch.Generator().manual_seed(1)
    independent = CorrelationStats(20)
    independent.update(torch.randn(20_000, 20, generator=g))
    assert independent.mean_abs_correlation() < 0.01  # E|r| ~ sqrt(2 / (pi N)) = 0.0056
    copies = CorrelationStats(4)
    x = torch.randn(100, 1, generator=g)
    copies.update(torch.cat([x, -2 * x, 3 * x + 1, x], dim=1))
    assert copies.mean_abs_correlation() == pytest.approx(1.0)
    few = CorrelationStats(3)
    few.update(torch.ones(10, 3))
    assert math.isnan(few.mean_abs_correlation())


def test_default_layers_are_the_post_activation_hidden_units():
    """MLP: after each hidden Linear's ReLU, not the output head; CNN: after conv-BN-ReLU (channels
    as units) and the classifier's hidden ReLU."""
    assert unit_layers(MLP(), torch.zeros(2, 64)) == {"body.1": -1, "body.3": -1}
    assert unit_layers(CNN(), torch.zeros(2, 64)) == {"features.2": 1, "features.5": 1, "classifier.2": -1}
    assert unit_layers(MLP(), None, ["body.0"]) == {"body.0": -1}
    with pytest.raises(ValueError, match="co-adaptation layer 'body.9' is not a module path of MLP"):
        unit_layers(MLP(), None, ["body.9"])


def test_a_plan_names_the_measured_layers_without_importing_lightning():
    """``describe`` (what ``regfw plan`` prints) reads the layers off the model; Lightning, which only
    the monitor callback needs, stays unimported (checked in a fresh interpreter)."""
    code = ("import sys; from torch import nn; from regfw.registry.regularizers import build_regularizers; "
            "(reg,) = build_regularizers({'coadaptation': {}}); "
            "model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2)); "
            "print(reg.describe(model)); "
            "print('pytorch_lightning' in sys.modules, 'lightning' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert out.stdout.splitlines() == ["['logs coadaptation/<layer> for 1, 3']", "False False"], out.stderr


def test_coadaptation_function_runs_in_eval_mode_and_restores_flags():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Dropout(0.5), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 3))
    model.train()
    x = torch.randn(400, 8)
    first = coadaptation(model, x)
    again = coadaptation(model, [(x[:150], None), (x[150:], None)])  # batches of (x, y)
    assert set(first) == {"1", "4"}
    for path in first:  # deterministic (dropout off) and independent of batching
        assert first[path].mean_abs_corr == pytest.approx(again[path].mean_abs_corr, abs=1e-9)
    with torch.no_grad():
        h = model[1](model[0](x)).numpy()
    assert first["1"].mean_abs_corr == pytest.approx(_numpy_mean_abs_corr(h), abs=1e-9)
    assert all(m.training for m in model.modules())


def _fit_digits(regularizers: dict, epochs: int, extra_callbacks=()) -> tuple[RegularizedModule, CoadaptationMonitor]:
    pl.seed_everything(0, verbose=False)
    dm = DigitsDataModule(batch_size=64, seed=0)
    module = RegularizedModule(model_config={"name": "mlp", "init_args": {"in_features": 64, "num_outputs": 10}},
                               regularizers={**regularizers, "coadaptation": {}}, n_examples=dm.n_train,
                               example_input=dm.example_input())
    trainer = pl.Trainer(max_epochs=epochs, accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                         enable_model_summary=False, enable_checkpointing=False, num_sanity_val_steps=0,
                         callbacks=list(extra_callbacks))
    trainer.fit(module, datamodule=dm)
    (monitor,) = [c for c in trainer.callbacks if isinstance(c, CoadaptationMonitor)]
    return module, monitor


def test_dropout_lowers_coadaptation_on_the_mlp_demo():
    """The built-in mlp on digits, 15 epochs, seed 0, with and without the dropout regularizer (policy
    rates: hidden 0.48, input 0.19). Measured mean |corr| of the hidden units on the validation split:
    0.324 without dropout, 0.311 with it (body.1 0.292 -> 0.284, body.3 0.357 -> 0.338); seeds 1-3 give
    drops of 0.012-0.018 in the mean. Asserted: lower in every layer, and by at least 0.008 in the mean."""
    plain, plain_monitor = _fit_digits({}, epochs=15)
    dropped, dropped_monitor = _fit_digits({"dropout": {}}, epochs=15)
    assert [row.kind for row in dropped.plan.rows()] == ["input", "hidden", "hidden"]
    without, with_ = plain_monitor.last, dropped_monitor.last
    assert set(without) == set(with_) == {"body.1", "body.3"}
    for path in without:
        assert with_[path].mean_abs_corr < without[path].mean_abs_corr, path
    assert mean_coadaptation(without) - mean_coadaptation(with_) > 0.008
    logged = dropped.trainer.callback_metrics
    assert float(logged["coadaptation/mean"]) == pytest.approx(mean_coadaptation(with_), rel=1e-6)
    assert len(dropped_monitor.history) == 15  # logged at every validation


def test_monitor_counts_only_the_validation_pass_not_mc_sampling():
    """With MC dropout sampling on the same validation batches, the monitor still measures the model's
    own (deterministic) validation forward: the same values as a direct eval-mode measurement."""
    mc = MCDropoutUncertainty(samples=5, plots=False)
    module, monitor = _fit_digits({"dropout": {}}, epochs=1, extra_callbacks=[mc])
    assert mc.last_metrics  # sampling did run
    dm = DigitsDataModule(batch_size=64, seed=0)
    direct = coadaptation(module.model, dm.val_dataloader())
    for path, result in direct.items():
        assert monitor.last[path].mean_abs_corr == pytest.approx(result.mean_abs_corr, abs=1e-9)
        assert monitor.last[path].observations == len(dm.x_val)


def test_plugin_options_and_errors():
    from regfw.config.schema import validate
    from regfw.errors import ConfigError
    from regfw.registry.regularizers import build_regularizers

    (reg,) = build_regularizers({"coadaptation": {"layers": ["body.1"], "every_n_epochs": 5, "max_batches": 2}})
    (cb,) = reg.callbacks()
    assert cb.config is reg.config  # the validated settings, passed as one object
    assert (cb.config.layers, cb.config.every_n_epochs, cb.config.max_batches) == (["body.1"], 5, 2)
    # The keyword constructor validates as the config section does.
    assert CoadaptationMonitor(layers=["body.1"], max_units=None).config.max_units is None
    with pytest.raises(ConfigError, match=r"CoadaptationMonitor\.every_n_epochs: got 0, expected a value in > 0"):
        CoadaptationMonitor(every_n_epochs=0)
    with pytest.raises(ConfigError, match=r"regularizers\.coadaptation\.every_n_epochs: got 0"):
        validate({"regularizers": {"coadaptation": {"every_n_epochs": 0}}})
    module = RegularizedModule(MLP(), regularizers={"coadaptation": {}}, example_input=torch.zeros(2, 64))
    assert "coadaptation: logs coadaptation/<layer> for body.1, body.3" in module.plan.format()
