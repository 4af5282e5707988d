"""Bad input of ``regfw test CONFIG CKPT``: data without a test split, a missing checkpoint, a
metrics file that exists already, and the new ``uncertainty.units`` / ``uncertainty.target`` keys."""
from __future__ import annotations

import shutil
from pathlib import Path

NO_TEST = '''
import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, TensorDataset


class NoTest(pl.LightningDataModule):
    """Training and validation data only: no test_dataloader()."""

    def __init__(self, **kwargs):
        super().__init__()

    def val_dataloader(self):
        return DataLoader(TensorDataset(torch.zeros(4, 64), torch.zeros(4).long()))
'''


def cases(root: Path, tmp: Path) -> list[tuple[list[str], str]]:
    cfg, ckpt = str(tmp / "c.yaml"), str(root / "run" / "checkpoints" / "last.ckpt")
    held = "data.init_args.test_fraction=0.2"
    done = tmp / "tested" / "checkpoints"
    done.mkdir(parents=True)
    shutil.copy(ckpt, done / "last.ckpt")
    (done.parent / "test_metrics.json").write_text("{}\n")
    (tmp / "metrics-dir").mkdir()
    (tmp / "notestdata.py").write_text(NO_TEST)
    return [
        (["test", cfg, ckpt], "data.init_args.test_fraction"),  # digits without a test split
        (["test", cfg, ckpt, "data.name=null", "data.class_path=notestdata.NoTest"], "test_dataloader()"),
        (["test", cfg, str(tmp / "none.ckpt"), held], "none.ckpt"),
        (["test", cfg, str(done / "last.ckpt"), held], "test_metrics.json"),  # never replaced without --force
        (["test", cfg, ckpt, held, "--out", str(tmp / "metrics-dir")], "metrics-dir"),
        (["test", cfg, ckpt, held, "--samples", "1"], "--samples"),
        (["test", cfg, ckpt, held, "uncertainty.units=kelvin"], "uncertainty.units"),
        (["fit", cfg, "uncertainty.target=label"], "uncertainty.target"),
    ]
