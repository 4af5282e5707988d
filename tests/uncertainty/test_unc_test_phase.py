"""The test phase: ``Trainer.test`` with the MC callback logs the validation metrics on the test
split under ``test/``, ``regfw test CONFIG CKPT`` writes them beside the checkpoint; and models
whose target is their input (autoencoders) with ``target="input"``."""
from __future__ import annotations

import copy
import json
import math

import pytest
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from regfw.cli.main import main
from regfw.uncertainty import MCDropoutUncertainty, mc_predict
from regfw.uncertainty.callback import _TEST_STREAM, TargetShapeError
from regfw.uncertainty.rng import derive_seed

T, SEED = 8, 11


class Classifier(pl.LightningModule):
    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = copy.deepcopy(net)

    def forward(self, x):
        return self.net(x)

    def test_step(self, batch, batch_idx):
        x, y = batch
        self.log("test_loss", F.cross_entropy(self(x), y))


def _trainer(cb) -> pl.Trainer:
    return pl.Trainer(logger=False, enable_progress_bar=False, enable_model_summary=False, callbacks=[cb],
                      accelerator="cpu")


def test_trainer_test_logs_the_mc_metrics_of_every_test_batch(digits, trained_mlp):
    _, _, x, y = digits  # 360 test rows in 3 batches; max_batches limits validation only
    model = Classifier(trained_mlp)
    cb = MCDropoutUncertainty(samples=T, seed=SEED, plots=False, max_batches=1)
    results = _trainer(cb).test(model, DataLoader(TensorDataset(x, y), batch_size=128), verbose=False)
    logged = results[0]
    assert {"test/mc/acc", "test/mc/nll", "test/mc/ece", "test/mc/mean_mi", "test_loss"} <= set(logged)
    assert not any(k.startswith("mc/") for k in logged) and cb.last_metrics == {}  # validation's are apart
    correct = 0
    for i in range(3):
        xb, yb = x[i * 128:(i + 1) * 128], y[i * 128:(i + 1) * 128]
        res = mc_predict(model, xb, samples=T, seed=derive_seed(SEED, _TEST_STREAM, 0, 0, i))
        correct += int((res.mean_probs.argmax(-1) == yb).sum())
    assert logged["test/mc/acc"] == pytest.approx(correct / len(y), abs=1e-6)
    assert 0.8 < logged["test/mc/acc"]  # a trained model: one wrong batch would move it by more than 1/360
    assert cb.test_metrics["test/mc/acc"] == pytest.approx(logged["test/mc/acc"], rel=1e-6)  # logged as float32


# -- autoencoders: the target is the input ------------------------------------------------------


class LitAutoEncoder(pl.LightningModule):
    """The autoencoder of Lightning's docs: batches ``(x, label)``, the loss compares x_hat to x."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.encoder = nn.Sequential(nn.Linear(64, 16), nn.ReLU(), nn.Dropout(0.2))
        self.decoder = nn.Sequential(nn.Linear(16, 64))

    def forward(self, x):
        return self.decoder(self.encoder(x))

    def validation_step(self, batch, batch_idx):
        x, _ = batch
        self.log("val_loss", F.mse_loss(self(x), x))


def _validate_ae(digits, **kw):
    _, _, x, y = digits
    model = LitAutoEncoder()
    cb = MCDropoutUncertainty(samples=T, task="regression", seed=SEED, plots=False, **kw)
    _trainer(cb).validate(model, DataLoader(TensorDataset(x[:128], y[:128]), batch_size=128), verbose=False)
    return model, cb.last_metrics


def test_autoencoder_with_label_batches_is_one_line_naming_the_fix(digits):
    with pytest.raises(TargetShapeError) as info:
        _validate_ae(digits)
    text = str(info.value)
    assert "\n" not in text
    assert "the regression targets have shape [128] but the model predicts shape [128, 64]" in text
    assert "target='input' (uncertainty.target: input)" in text and "batch_to_xy=" in text


def test_autoencoder_with_target_input_scores_the_reconstruction(digits):
    model, got = _validate_ae(digits, target="input", tau=10.0)
    _, _, x, _ = digits
    res = mc_predict(model, x[:128], samples=T, seed=derive_seed(SEED, 0, 0, 0, 0), task="regression")
    rmse = float(((res.mean.double() - x[:128].double()) ** 2).mean().sqrt())
    assert rmse > 0.05  # a real reconstruction error, not a float-noise zero
    assert got["mc/rmse"] == pytest.approx(rmse, rel=1e-5)
    assert math.isfinite(got["mc/nll_mixture"])


def test_mixture_without_a_precision_is_left_out_with_its_reason(digits):
    with pytest.warns(UserWarning, match=r"ll_mixture, nll_mixture left out of the results: the mixture of the T "
                                         r"Gaussians needs a noise precision: set uncertainty.tau"):
        _, got = _validate_ae(digits, target="input")
    assert "mc/nll_mixture" not in got and "mc/ll_mixture" not in got and math.isfinite(got["mc/rmse"])


# -- regfw test ---------------------------------------------------------------------------------

CONFIG = """\
data: {name: diabetes, batch_size: 64, init_args: {test_fraction: 0.2}}
model: {init_args: {hidden: [16]}}
regularizers: {dropout: {hidden: 0.2}}
uncertainty: {samples: 10, plots: false, tau: 0.0003}
trainer: {max_epochs: 2, enable_progress_bar: false, enable_model_summary: false}
"""


@pytest.fixture(scope="module")
def diabetes_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("testphase")
    (root / "c.yaml").write_text(CONFIG)
    assert main(["fit", str(root / "c.yaml"), "--run-dir", str(root / "run")]) == 0
    return root


def test_regfw_test_writes_the_metrics_beside_the_checkpoint(diabetes_run, capsys):
    from regfw.build.datasets import DiabetesData

    cfg, ckpt = str(diabetes_run / "c.yaml"), str(diabetes_run / "run" / "checkpoints" / "last.ckpt")
    written = diabetes_run / "run" / "test_metrics.json"
    written.unlink(missing_ok=True)
    capsys.readouterr()
    assert main(["test", cfg, ckpt]) == 0
    out = capsys.readouterr().out
    doc = json.loads(written.read_text())
    metrics = doc["metrics"]
    assert doc["units"] == "original" and {"test/mc/rmse", "test/mc/nll_mixture", "test_loss"} <= set(metrics)
    assert f"test/mc/rmse: {metrics['test/mc/rmse']:.6g}" in out and f"wrote {written}" in out
    before = written.read_text()
    assert main(["test", cfg, ckpt, "uncertainty.samples=3"]) == 2  # never over it without --force
    assert "test_metrics.json' exists; choose another path or pass --force" in capsys.readouterr().err
    assert written.read_text() == before
    # the same masks and the same noise in standardised units (tau is stated in the reported units: the
    # config's 0.0003 of the score is 0.0003 * sigma^2 of the model's outputs): the scaling separates the two exactly
    sigma = DiabetesData(test_fraction=0.2).target_scaling.std
    assert sigma > 50
    std_path = diabetes_run / "std.json"
    assert main(["test", cfg, ckpt, "uncertainty.units=standardized", f"uncertainty.tau={0.0003 * sigma**2!r}",
                 "--out", str(std_path)]) == 0
    std = json.loads(std_path.read_text())["metrics"]
    assert metrics["test/mc/rmse"] / std["test/mc/rmse"] == pytest.approx(sigma, rel=1e-4)
    assert metrics["test/mc/nll_mixture"] - std["test/mc/nll_mixture"] == pytest.approx(math.log(sigma), abs=1e-4)
    assert metrics["test_loss"] == std["test_loss"]  # the module's own loss is in its units
    assert main(["test", cfg, ckpt, "--force", "--samples", "4"]) == 0
    assert json.loads(written.read_text())["metrics"] != metrics


def test_regfw_predict_writes_regression_predictions_in_the_units_of_the_metrics(diabetes_run, capsys):
    import csv

    from regfw.build.datasets import DiabetesData

    scaling = DiabetesData(test_fraction=0.2).target_scaling
    cfg, ckpt = str(diabetes_run / "c.yaml"), str(diabetes_run / "run" / "checkpoints" / "last.ckpt")
    tables = {}
    for units in ("original", "standardized"):
        out = diabetes_run / f"predict-{units}.csv"
        assert main(["predict", cfg, ckpt, "--out", str(out), "--samples", "4", f"uncertainty.units={units}"]) == 0
        with out.open() as f:
            tables[units] = [{k: float(v) for k, v in row.items() if k in ("mean", "variance")}
                             for row in csv.DictReader(f)]
    capsys.readouterr()
    original, standardized = tables["original"], tables["standardized"]
    assert len(original) == len(standardized) > 50
    for o, z in zip(original, standardized, strict=True):  # the same masks: the scaling separates them
        assert o["mean"] == pytest.approx(z["mean"] * scaling.std + scaling.mean, rel=1e-5, abs=1e-3)
    assert 50 < sum(r["mean"] for r in original) / len(original) < 250  # the diabetes score's own range
    assert max(abs(r["mean"]) for r in standardized) < 5


def test_regfw_test_as_a_real_process(diabetes_run, run_cli):
    ckpt = diabetes_run / "run" / "checkpoints" / "last.ckpt"
    result = run_cli("test", str(diabetes_run / "c.yaml"), str(ckpt), "--out", "m.json", "--samples", "3")
    assert result.returncode == 0, result.stderr
    assert "test/mc/coverage_90:" in result.stdout and "wrote m.json: " in result.stdout


def test_regfw_test_on_a_classifier_uses_the_temperature_of_the_fit(tmp_path, capsys):
    from regfw.run.checkpoints import read_checkpoint

    (tmp_path / "c.yaml").write_text(
        "data: {batch_size: 32, init_args: {test_fraction: 0.2}}\n"
        "model: {init_args: {hidden: [16]}}\nregularizers: {dropout: {hidden: 0.2}}\n"
        "uncertainty: {samples: 4, plots: false, calibration: {enabled: true, fraction: 0.2}}\n"
        "optimizer: {lr: 0.01}\ntrainer: {max_epochs: 3, enable_progress_bar: false, enable_model_summary: false}\n")
    assert main(["fit", str(tmp_path / "c.yaml"), "--run-dir", str(tmp_path / "run")]) == 0
    ckpt = tmp_path / "run" / "checkpoints" / "last.ckpt"
    assert main(["test", str(tmp_path / "c.yaml"), str(ckpt)]) == 0
    metrics = json.loads((tmp_path / "run" / "test_metrics.json").read_text())["metrics"]
    fitted = read_checkpoint(ckpt)["regfw_calibration"]["temperature"]
    assert fitted != pytest.approx(1.0, abs=1e-3)  # a real fitted temperature, not the identity
    assert metrics["test/cal/temperature"] == pytest.approx(fitted, rel=1e-6)
    assert 0.5 < metrics["test/mc/acc"] <= 1 and {"test/mc/ece", "test/cal/ece_after", "test_loss"} <= set(metrics)


def test_units_and_target_come_from_the_yaml_section():
    from regfw.config.schema import validate

    unc = validate({"uncertainty": {"units": "standardized", "target": "input"}}).uncertainty
    cb = MCDropoutUncertainty.from_config(unc, task="regression")
    assert (cb.units, cb.target, cb.test_prefix) == ("standardized", "input", "test/mc/")
    default = MCDropoutUncertainty.from_config(validate({}).uncertainty, task="regression")
    assert (default.units, default.target) == ("original", "batch")
