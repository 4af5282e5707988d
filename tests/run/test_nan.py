"""A NaN or infinite training loss: ``run.on_nan`` stops the run (naming the step and the last good
checkpoint), skips the batch, or lets it through; never silent garbage by default."""
from __future__ import annotations

import math
import textwrap

import pytest
import torch

from regfw.cli.main import main
from regfw.config.schema import load_config
from regfw.errors import ConfigError, RunError
from regfw.run.checkpoints import read_checkpoint
from regfw.run.job import fit

NAN_MODEL = '''
import torch
from torch import nn

class NaNAt(nn.Module):
    """An MLP whose output is NaN on the training forward passes numbered in ``at`` (1-based)."""

    def __init__(self, in_features=64, num_outputs=10, at=(6,)):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(in_features, 16), nn.ReLU())
        self.head = nn.Linear(16, num_outputs)
        self.at = set(at)
        self.calls = 0

    def forward(self, x):
        out = self.head(self.body(x))
        if self.training:
            self.calls += 1
            if self.calls in self.at:
                out = out * float("nan")
        return out
'''

CONFIG = """
data: {train_fraction: 0.3, batch_size: 32}
model: {class_path: nan_model.NaNAt}
optimizer: {name: adam, lr: 0.01}
regularizers: {dropout: {hidden: 0.2}}
uncertainty: {enabled: false}
trainer: {max_epochs: 1, enable_progress_bar: false, enable_model_summary: false, logger: false}
run: {checkpoint_every_n_steps: 2}
"""
STEPS = 13  # batches of one epoch


@pytest.fixture
def cfg_path(tmp_path, monkeypatch):
    (tmp_path / "nan_model.py").write_text(textwrap.dedent(NAN_MODEL))
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "cfg.yaml"
    path.write_text(CONFIG)
    return path


def _finite(module) -> bool:
    return all(bool(torch.isfinite(p).all()) for p in module.parameters())


def test_stop_names_the_step_and_the_last_good_checkpoint_and_keeps_finite_weights(cfg_path, tmp_path):
    cfg = load_config(cfg_path, ["model.init_args.at=[6]"])  # stop is the default
    assert cfg.run.on_nan == "stop"
    with pytest.raises(RunError) as err:
        fit(cfg, run_dir="run", quiet=True)
    last = (tmp_path / "run" / "checkpoints" / "last.ckpt").resolve()
    assert str(err.value) == (
        f"the training loss is nan at step 5 (epoch 0, batch 5); training stopped before that update. Last good "
        f"checkpoint: {last} (global step 4). Lower optimizer.lr (or clip gradients with trainer.gradient_clip_val) "
        f"and start a new run, or set run.on_nan=skip to leave such batches out.")
    ckpt = read_checkpoint(last)
    assert ckpt["global_step"] == 4
    assert all(bool(torch.isfinite(t).all()) for t in ckpt["state_dict"].values())


def test_skip_leaves_the_batches_out_and_trains_on(cfg_path):
    with pytest.warns(UserWarning, match=r"regfw: the training loss is nan at step \d+ \(epoch 0, batch 5\); that "
                                         r"batch is skipped \(run.on_nan=skip\), 2 so far"):
        result = fit(load_config(cfg_path, ["model.init_args.at=[3,6]", "run.on_nan=skip"]), run_dir="run", quiet=True)
    module = result.module
    assert module.nonfinite_skipped == 2
    assert _finite(module)
    assert module.model.calls == STEPS  # every batch was seen; two were left out of the updates
    epoch_loss = float(module.trainer.callback_metrics["train_loss"])
    assert math.isfinite(epoch_loss)  # the skipped batches are not in the epoch's logged loss


def test_a_module_loaded_from_a_checkpoint_keeps_on_nan(cfg_path):
    """``run.on_nan`` is one of the module's hparams: a reloaded module still skips NaN batches
    (it used to fall back to "ignore" and train on them)."""
    import pytorch_lightning as pl

    from regfw.build.datasets import DigitsDataModule
    from regfw.train.module import RegularizedModule

    result = fit(load_config(cfg_path, ["model.init_args.at=[3,6]", "run.on_nan=skip"]), run_dir="run", quiet=True)
    restored = RegularizedModule.load_from_checkpoint(result.checkpoint)
    assert restored.hparams.on_nan == "skip" and restored.on_nonfinite == "skip"
    assert restored.model.at == {3, 6} and restored.model.calls == 0  # NaN again on its 3rd and 6th pass
    trainer = pl.Trainer(max_epochs=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, limit_val_batches=0)
    with pytest.warns(UserWarning, match=r"that batch is skipped \(run.on_nan=skip\), 2 so far"):
        trainer.fit(restored, datamodule=DigitsDataModule(batch_size=32, train_fraction=0.3))
    assert restored.nonfinite_skipped == 2 and _finite(restored)


def test_on_nan_is_checked_by_the_module():
    from torch import nn

    from regfw.train.module import RegularizedModule

    with pytest.raises(ConfigError, match=r"run.on_nan: got 'skipp', expected one of stop, skip, ignore"):
        RegularizedModule(nn.Linear(2, 2), on_nan="skipp")


def test_ignore_trains_on_garbage(cfg_path):
    result = fit(load_config(cfg_path, ["model.init_args.at=[3]", "run.on_nan=ignore"]), run_dir="run", quiet=True)
    assert not _finite(result.module)  # what the default guards against


def test_a_huge_learning_rate_stops_at_the_first_infinite_loss(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text("data: {train_fraction: 0.3}\nmodel: {init_args: {hidden: [16]}}\n"
                   "optimizer: {name: sgd, lr: 1.0e+20}\n"
                   "uncertainty: {enabled: false}\ntrainer: {max_epochs: 1, enable_progress_bar: false}\n")
    assert main(["fit", str(cfg), "--run-dir", "run"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("regfw fit: error: the training loss is inf at step 1 (epoch 0, batch 1); training stopped "
                          "before that update. Last good checkpoint: none: no checkpoint was written before it (set "
                          "run.checkpoint_every_n_steps to write checkpoints/last.ckpt more often).")


def test_skip_is_refused_with_several_processes_before_anything_is_written(cfg_path, tmp_path):
    cfg = load_config(cfg_path, ["run.on_nan=skip", "trainer.strategy=ddp", "trainer.devices=2"])
    with pytest.raises(ConfigError,
                       match="run.on_nan: got 'skip' with 2 processes; Lightning cannot leave a batch out"):
        fit(cfg, run_dir="run")
    assert not (tmp_path / "run").exists()
