"""The MC callback's figures on short Lightning fits: written by matplotlib as the format asks, drawn
on the plot thread (never the training thread), and no plot thread left when the fit ends, also when
it stops early."""
from __future__ import annotations

import struct
import threading

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from pytorch_lightning.loggers import Logger
from torch.utils.data import DataLoader, TensorDataset
from unc_helpers import make_mlp

from regfw.uncertainty import MCDropoutUncertainty
from regfw.uncertainty.figures.canvas import DPI


class LitMLP(pl.LightningModule):
    def __init__(self, stop_after: int | None = None):
        super().__init__()
        self.net = make_mlp(p=0.3)
        self.stop_after = stop_after

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self(x), y)

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val_loss", F.cross_entropy(self(x), y))

    def on_train_epoch_end(self):
        if self.stop_after is not None and self.current_epoch + 1 >= self.stop_after:
            self.trainer.should_stop = True

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=3e-3)


class FigureLogger(Logger):
    """A logger whose experiment takes matplotlib figures (as TensorBoard's ``add_figure``) and
    notes the thread that hands each one over and the figure's size in pixels."""

    def __init__(self):
        super().__init__()
        self.received: list[tuple[str, str, tuple[int, int]]] = []
        logger = self

        class Experiment:
            def add_figure(self, tag, figure, global_step=None, close=True):
                size = tuple(round(v * figure.dpi) for v in figure.get_size_inches())
                logger.received.append((tag, threading.current_thread().name, size))

        self._experiment = Experiment()

    @property
    def experiment(self):
        return self._experiment

    @property
    def name(self):
        return "figures"

    @property
    def version(self):
        return 0

    def log_metrics(self, metrics, step=None):
        pass

    def log_hyperparams(self, params, *args, **kwargs):
        pass


def _plot_threads() -> list[str]:
    return [t.name for t in threading.enumerate() if t.name.startswith("regfw-plots")]


def _fit(tmp_path, digits, epochs: int, stop_after: int | None = None, **options):
    pl.seed_everything(0, verbose=False)
    xtr, ytr, xv, yv = digits
    train = DataLoader(TensorDataset(xtr[:200], ytr[:200]), batch_size=50, shuffle=True)
    val = DataLoader(TensorDataset(xv[:60], yv[:60]), batch_size=30)
    ood = DataLoader(TensorDataset(torch.rand(40, 64, generator=torch.Generator().manual_seed(1))), batch_size=20)
    cb = MCDropoutUncertainty(samples=4, seed=0, plot_dir=str(tmp_path / "plots"), ood_loader=ood, **options)
    logger = FigureLogger()
    trainer = pl.Trainer(max_epochs=epochs, accelerator="cpu", logger=logger, callbacks=[cb],
                         enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
                         num_sanity_val_steps=0)
    trainer.fit(LitMLP(stop_after), train, val)
    return cb, logger


NAMES = ["ood_hist", "referral", "reliability", "risk_coverage", "score_hist"]


def test_a_short_fit_writes_its_png_figures_from_the_plot_thread(tmp_path, digits):
    cb, logger = _fit(tmp_path, digits, epochs=2, plot_every=1, plot_format="png")
    for epoch in ("epoch=000", "epoch=001"):
        assert sorted(p.name for p in (tmp_path / "plots" / epoch).iterdir()) == [f"{n}.png" for n in NAMES]
    sizes = {}
    for name, path in cb.last_plots.items():
        raw = open(path, "rb").read()
        assert raw[:8] == b"\x89PNG\r\n\x1a\n" and "epoch=001" in path, path
        sizes[f"mc/{name}"] = struct.unpack(">II", raw[16:24])
    # the logger got each figure of both epochs, the size the file has, handed over by the plot thread
    assert sorted(tag for tag, _, _ in logger.received) == sorted(f"mc/{n}" for n in NAMES for _ in range(2))
    assert all(thread.startswith("regfw-plots") for _, thread, _ in logger.received), logger.received
    assert all(size == sizes[tag] for tag, _, size in logger.received[-len(NAMES):])
    assert sizes["mc/reliability"] == (450, 550) and DPI == 100  # one column: no calibration
    assert _plot_threads() == []  # the fit's end stopped the plot thread


def test_a_fit_stopped_early_draws_its_last_run_and_leaves_no_thread(tmp_path, digits):
    cb, logger = _fit(tmp_path, digits, epochs=5, stop_after=2)  # plots of the last run only, as SVG
    assert cb.runs == 2 and sorted(p.name for p in (tmp_path / "plots").iterdir()) == ["epoch=001"]
    assert sorted(p.name for p in (tmp_path / "plots" / "epoch=001").iterdir()) == [f"{n}.svg" for n in NAMES]
    assert "OOD detection" in (tmp_path / "plots" / "epoch=001" / "ood_hist.svg").read_text()
    assert sorted(tag for tag, _, _ in logger.received) == [f"mc/{n}" for n in NAMES]
    assert _plot_threads() == []
