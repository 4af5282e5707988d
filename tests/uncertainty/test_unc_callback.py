"""The MCDropoutUncertainty callback inside tiny Lightning fits on sklearn digits."""
from __future__ import annotations

import csv
import math
import os
import xml.etree.ElementTree as ET

import pytest
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from pytorch_lightning.loggers import CSVLogger, Logger
from torch.utils.data import DataLoader, TensorDataset
from unc_helpers import make_mlp

from regfw.uncertainty import MCDropoutUncertainty

CLASSIFICATION_KEYS = {
    "mc/acc", "mc/det_acc", "mc/nll", "mc/brier", "mc/ece", "mc/auroc_error",
    "mc/referred_fraction", "mc/retained_acc", "mc/mean_mi", "mc/mean_entropy",
}


class LitMLP(pl.LightningModule):
    def __init__(self, p: float = 0.3, batchnorm: bool = False, regression: bool = False):
        super().__init__()
        self.regression = regression
        self.net = make_mlp(p=p, batchnorm=batchnorm, out=1 if regression else 10)

    def forward(self, x):
        return self.net(x)

    def _loss(self, batch):
        x, y = batch
        out = self(x)
        return F.mse_loss(out.squeeze(-1), y.float()) if self.regression else F.cross_entropy(out, y)

    def training_step(self, batch, batch_idx):
        return self._loss(batch)

    def validation_step(self, batch, batch_idx):
        self.log("val_loss", self._loss(batch))

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=3e-3)


class ImageLogger(Logger):
    """A logger whose experiment takes figures, like TensorBoard's SummaryWriter."""

    def __init__(self):
        super().__init__()
        self.figures: list[tuple[str, int]] = []
        logger = self

        class Experiment:
            def add_figure(self, tag, figure, global_step=None, close=True):
                logger.figures.append((tag, global_step))

        self._experiment = Experiment()

    @property
    def experiment(self):
        return self._experiment

    @property
    def name(self):
        return "images"

    @property
    def version(self):
        return 0

    def log_metrics(self, metrics, step=None):
        pass

    def log_hyperparams(self, params, *args, **kwargs):
        pass


def loaders(digits, n_train=500, n_val=150):
    xtr, ytr, xv, yv = digits
    train = DataLoader(TensorDataset(xtr[:n_train], ytr[:n_train]), batch_size=50, shuffle=True)
    val = DataLoader(TensorDataset(xv[:n_val], yv[:n_val]), batch_size=50)
    return train, val


def trainer(tmp_path, callbacks=(), logger=False, epochs=2):
    return pl.Trainer(
        max_epochs=epochs, accelerator="cpu", devices=1, logger=logger, callbacks=list(callbacks),
        enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
        default_root_dir=str(tmp_path), num_sanity_val_steps=1, log_every_n_steps=5,
    )


def test_fit_logs_metrics_and_writes_four_plots(tmp_path, digits):
    pl.seed_everything(0, verbose=False)
    train, val = loaders(digits)
    cb = MCDropoutUncertainty(samples=8, seed=0, refer_fraction=0.2, score="entropy", plot_every=1)
    images = ImageLogger()
    csv_logger = CSVLogger(str(tmp_path), name="run")
    t = trainer(tmp_path, [cb], logger=[csv_logger, images])
    t.fit(LitMLP(), train, val)

    assert CLASSIFICATION_KEYS <= set(cb.last_metrics)
    m = cb.last_metrics
    # two short epochs: well above chance (0.1), and MC close to the deterministic prediction
    assert 0.2 < m["mc/acc"] <= 1 and abs(m["mc/acc"] - m["mc/det_acc"]) < 0.15
    assert 0 <= m["mc/ece"] <= 1 and m["mc/nll"] > 0 and 0 <= m["mc/brier"] <= 2
    assert m["mc/referred_fraction"] == pytest.approx(0.2, abs=0.01)
    assert m["mc/mean_entropy"] >= m["mc/mean_mi"] >= 0
    assert cb.last_epoch == 1 and cb.runs == 2  # both epochs, never the sanity check

    # the logged values reach the Trainer's logger
    assert CLASSIFICATION_KEYS <= set(t.callback_metrics)
    with open(os.path.join(csv_logger.log_dir, "metrics.csv")) as fh:
        rows = list(csv.DictReader(fh))
    logged = [float(r["mc/acc"]) for r in rows if r.get("mc/acc")]
    assert len(logged) == 2 and logged[-1] == pytest.approx(m["mc/acc"], abs=1e-6)

    # four SVGs per run under <log_dir>/plots/epoch=NNN, no temporary files left behind
    for epoch in (0, 1):
        d = os.path.join(csv_logger.log_dir, "plots", f"epoch={epoch:03d}")
        assert sorted(os.listdir(d)) == ["referral.svg", "reliability.svg", "risk_coverage.svg", "score_hist.svg"]
        for f in os.listdir(d):
            assert ET.parse(os.path.join(d, f)).getroot().tag == "{http://www.w3.org/2000/svg}svg"
    assert set(cb.last_plots) == {"reliability", "referral", "score_hist", "risk_coverage"}
    assert all(os.path.isfile(p) and "epoch=001" in p for p in cb.last_plots.values())
    # and to the logger that takes images
    assert sorted(tag for tag, _ in images.figures) == sorted(
        f"mc/{n}" for n in ("reliability", "referral", "score_hist", "risk_coverage") for _ in range(2)
    )


def test_fit_weights_bit_identical_with_and_without_the_callback(tmp_path, digits):
    def fit(callbacks):
        pl.seed_everything(3, verbose=False)
        model = LitMLP(p=0.5, batchnorm=True)
        train, val = loaders(digits, n_train=300, n_val=100)
        trainer(tmp_path, callbacks).fit(model, train, val)
        return model.state_dict()

    cb = MCDropoutUncertainty(samples=6, strategy="loop", max_batches=1, plots=False, seed=None)
    with_cb = fit([cb])
    without = fit([])
    assert cb.runs == 2 and cb.last_metrics["mc/mean_mi"] > 0
    for k in without:
        assert torch.equal(with_cb[k], without[k]), k  # weights and BatchNorm statistics


def test_regression_every_n_epochs_and_subset(tmp_path, digits):
    pl.seed_everything(0, verbose=False)
    train, val = loaders(digits, n_train=300, n_val=150)
    cb = MCDropoutUncertainty(
        samples=6, task="regression", tau=1.0, every_n_epochs=2, subset=0.5, plot_dir=str(tmp_path / "plots"),
        plot_format="png",  # drawn with matplotlib
    )
    t = trainer(tmp_path, [cb], epochs=2)
    t.fit(LitMLP(regression=True), train, val)
    m = cb.last_metrics
    for key in ("mc/rmse", "mc/nll", "mc/coverage_50", "mc/coverage_90", "mc/coverage_95", "mc/retained_rmse"):
        assert key in m and math.isfinite(m[key]), key
    assert m["mc/mean_variance"] == pytest.approx(m["mc/mean_aleatoric"] + m["mc/mean_epistemic"], rel=1e-6)
    assert m["mc/mean_aleatoric"] == pytest.approx(1.0)
    assert cb.runs == 1 and cb.last_epoch == 1  # every 2nd epoch only
    assert os.listdir(tmp_path / "plots") == ["epoch=001"]
    assert sorted(os.listdir(tmp_path / "plots" / "epoch=001")) == ["coverage.png", "referral.png", "score_hist.png"]
    for f in (tmp_path / "plots" / "epoch=001").iterdir():
        assert f.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "mc/rmse" in t.callback_metrics


def test_fit_without_dropout_fails_before_training(tmp_path, digits):
    class NoDropout(LitMLP):
        def __init__(self):
            super().__init__(p=0.0)

    train, val = loaders(digits, n_train=50, n_val=50)
    with pytest.raises(ValueError, match=r"regularizers: \{dropout: \{\}\}"):
        trainer(tmp_path, [MCDropoutUncertainty(samples=4)]).fit(NoDropout(), train, val)


def test_state_dict_round_trip_and_argument_checks():
    cb = MCDropoutUncertainty(seed=None)
    cb.last_epoch, cb.runs, cb.last_metrics = 4, 3, {"mc/acc": 0.9}
    other = MCDropoutUncertainty(seed=1)
    other.load_state_dict(cb.state_dict())
    assert (other.seed, other.last_epoch, other.runs, other.last_metrics) == (cb.seed, 4, 3, {"mc/acc": 0.9})
    assert MCDropoutUncertainty().state_key != MCDropoutUncertainty(task="regression").state_key
    with pytest.raises(ValueError, match="samples=1"):
        MCDropoutUncertainty(samples=1)
    with pytest.raises(ValueError, match="every_n_epochs"):
        MCDropoutUncertainty(every_n_epochs=0)
    with pytest.raises(ValueError, match="subset"):
        MCDropoutUncertainty(subset=1.5)
    with pytest.raises(ValueError, match="score for task='regression'"):
        MCDropoutUncertainty(task="regression", score="mutual_information")


def test_from_config_takes_the_uncertainty_section_as_one_object():
    from regfw.config.schema import UncertaintyConfig, validate
    from regfw.errors import ConfigError

    unc = validate({"uncertainty": {"samples": 12, "strategy": "loop", "budget_mb": 2.0, "every_n_epochs": 3,
                                    "max_batches": 4, "threshold": 0.5, "refer_fraction": 0.3, "plots": False,
                                    "seed": 7}}, check_plugins=False).uncertainty
    assert isinstance(unc, UncertaintyConfig)
    cb = MCDropoutUncertainty.from_config(unc, task="classification", plot_dir="plots", prefix="mcd/")
    keywords = MCDropoutUncertainty(samples=12, strategy="loop", budget_bytes=2 * 2**20, every_n_epochs=3,
                                    max_batches=4, threshold=0.5, refer_fraction=0.3, plots=False, seed=7,
                                    plot_dir="plots", prefix="mcd/")
    settings = ("samples", "strategy", "budget_bytes", "task", "every_n_epochs", "max_batches", "subset", "score",
                "threshold", "refer_fraction", "n_bins", "levels", "tau", "plots", "plot_dir", "seed", "prefix")
    assert {k: getattr(cb, k) for k in settings} == {k: getattr(keywords, k) for k in settings}
    assert cb.score == "mutual_information" and cb.state_key == keywords.state_key
    # What depends on the model is still checked, naming the config key.
    with pytest.raises(ConfigError, match=r"uncertainty.score: got 'mutual_information' for a regression model, "
                                          r"expected one of variance, entropy"):
        MCDropoutUncertainty.from_config(UncertaintyConfig(score="mutual_information"), task="regression")
    with pytest.raises(TypeError, match=r"unexpected keyword\(s\) \['sample'\]"):
        MCDropoutUncertainty.from_config(unc, sample=3)
