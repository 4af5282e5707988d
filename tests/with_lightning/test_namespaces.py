"""Both Lightning namespaces (pytorch_lightning and the unified lightning.pytorch), and LightningCLI.

The unified ``lightning`` package and ``jsonargparse`` (LightningCLI) are declared dev
dependencies (pyproject.toml ``[dev]``, pinned in constraints.txt): these tests fail, naming
the missing package, where they are not installed, instead of skipping.
"""
from __future__ import annotations

import importlib
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parents[1]


def _require(module: str, package: str):
    try:
        return importlib.import_module(module)
    except ImportError:
        pytest.fail(f"{package} is a declared dev dependency of regfw (pyproject.toml [dev], pinned in "
                    f"constraints.txt) but `import {module}` fails: install it with `make setup`")


def test_regfw_fit_trains_a_lightning_pytorch_data_module(tmp_path):
    _require("lightning.pytorch", "lightning")
    from regfw.config.schema import load_config
    from regfw.run.job import fit

    cfg_path = tmp_path / "cfg.yaml"
    cfg_path.write_text(textwrap.dedent("""
        data: {class_path: with_lightning.unified_modules.UnifiedDataModule, batch_size: 16}
        model: {name: mlp}
        regularizers: {dropout: {}}
        trainer: {max_epochs: 1, enable_progress_bar: false}
        uncertainty: {samples: 4, plots: false}
    """))
    result = fit(load_config(cfg_path), run_dir=str(tmp_path / "run"), quiet=True)
    assert result.module.trainer.global_step == 120 // 16 + 1  # data.batch_size reached it
    assert result.metrics["val_acc"] > 0 and "mc/acc" in result.metrics


def test_unified_callbacks_and_module_train_with_a_lightning_pytorch_trainer():
    L = _require("lightning.pytorch", "lightning")
    import torch
    from torch import nn

    from regfw.train.unified import MCDropoutUncertainty, Regularize, RegularizedModule

    from .unified_modules import UnifiedClassifier, UnifiedDataModule

    def trainer(*callbacks):
        return L.Trainer(max_epochs=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, num_sanity_val_steps=0, callbacks=list(callbacks))

    torch.manual_seed(0)
    module = UnifiedClassifier()
    mc = MCDropoutUncertainty(samples=4, plots=False)
    t = trainer(Regularize({"dropout": {}, "weight_decay": {"strength": 0.05}}), mc)
    t.fit(module, datamodule=UnifiedDataModule())
    assert {g["weight_decay"] for g in t.optimizers[0].param_groups} == {0.0, 0.05}
    assert mc.last_metrics["mc/acc"] > 0
    regularized = RegularizedModule(nn.Sequential(nn.Linear(20, 32), nn.ReLU(), nn.Linear(32, 3)),
                                    regularizers={"dropout": {}})
    t = trainer(MCDropoutUncertainty(samples=4, plots=False))
    t.fit(regularized, datamodule=UnifiedDataModule())
    assert "val_loss" in t.callback_metrics and "mc/acc" in t.callback_metrics


CLI = """
from pytorch_lightning.cli import LightningCLI
from regfw.build.datasets import DigitsDataModule
from regfw.train.module import RegularizedModule

cli = LightningCLI(RegularizedModule, DigitsDataModule, run=False, save_config_kwargs={"overwrite": True})
cli.trainer.fit(cli.model, datamodule=cli.datamodule)
opt = cli.trainer.optimizers[0]
print("OPT", type(opt).__name__, sorted({g["weight_decay"] for g in opt.param_groups}),
      sorted({round(g["lr"], 6) for g in opt.param_groups}))
print("MC", round(cli.trainer.callback_metrics["mc/acc"].item(), 6), "VAL", "val_loss" in cli.trainer.callback_metrics)
"""

CONFIG = """
seed_everything: 0
trainer:
  max_epochs: 1
  logger: {class_path: pytorch_lightning.loggers.CSVLogger, init_args: {save_dir: logs}}
  enable_progress_bar: false
  callbacks:
    - class_path: regfw.uncertainty.MCDropoutUncertainty
      init_args: {samples: 4, plots: false}
model:
  model_config: {name: mlp, init_args: {in_features: 64, num_outputs: 10}}
  regularizers: {dropout: {}, weight_decay: {strength: 0.05}}
  n_examples: 1347
data: {batch_size: 128}
optimizer: {class_path: torch.optim.AdamW, init_args: {lr: 0.01}}
lr_scheduler: {class_path: torch.optim.lr_scheduler.CosineAnnealingLR, init_args: {T_max: 3}}
"""


@pytest.mark.slow
def test_lightning_cli_yaml_round_trip_with_regfw_module_callback_and_cli_optimizer(tmp_path):
    _require("jsonargparse", "jsonargparse")
    (tmp_path / "cli.py").write_text(CLI)
    (tmp_path / "cfg.yaml").write_text(CONFIG)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(
        [str(TESTS), *([os.environ["PYTHONPATH"]] if os.environ.get("PYTHONPATH") else [])])}

    def run(config: Path) -> str:
        proc = subprocess.run([sys.executable, "cli.py", "--config", str(config)], cwd=tmp_path, env=env,
                              capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
        return next(line for line in proc.stdout.splitlines() if line.startswith("OPT")) + \
            next(line for line in proc.stdout.splitlines() if line.startswith("MC"))

    first = run(tmp_path / "cfg.yaml")
    # LightningCLI's optimizer got weight decay's groups, and its cosine schedule ran one epoch of 3
    assert first.startswith("OPT AdamW [0.0, 0.05] [0.0075]"), first
    assert "VAL True" in first
    written = tmp_path / "logs" / "lightning_logs" / "version_0" / "config.yaml"
    assert "regfw.uncertainty.MCDropoutUncertainty" in written.read_text()
    assert run(written) == first  # the config LightningCLI wrote trains the same run again
