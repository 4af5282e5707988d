"""The UCI regression data of Gal & Ghahramani (2016), Table 1, as the paper's code reads it.

``bench/data/uci/<name>/`` holds ``data.txt`` (whitespace-separated rows), ``columns.txt`` (which
columns are the features and which the target), ``splits/train_K.txt`` / ``test_K.txt`` (the 20
published train/test splits, 0-based row indices) and ``chosen_hyperparameters.txt`` (the paper's
grid-search winner (p, tau) per split); see ``bench/data/uci/README.md`` for the sources and the
licence (CC BY 4.0).

:func:`load_split` returns one split standardised on its training rows (inputs and targets; a
feature with zero spread is divided by 1, as the paper's code does), with the target's mean and
standard deviation to map predictions back to the original units. :class:`UCIDataModule` is the
same split as a LightningDataModule for ``regfw fit`` (``data.class_path: uci_data.UCIDataModule``
with ``bench/`` on ``PYTHONPATH``; docs/regression.md).
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

DATA_DIR = Path(__file__).resolve().parent / "data" / "uci"
#: The four data sets, in the order of the paper's table.
DATASETS = ("yacht", "energy", "concrete", "wine-quality-red")
#: The paper's grid per data set: p for all, tau per data set (the data README).
P_GRID = (0.005, 0.01, 0.05, 0.1)
TAU_GRID = {"yacht": (0.25, 0.5, 0.75), "energy": (0.25, 0.5, 0.75),
            "concrete": (0.025, 0.05, 0.075), "wine-quality-red": (2.5, 3.0, 3.5)}
#: The reference numbers (mean, standard error over 20 splits; 4000 epochs; the data README).
PAPER = {"yacht": ((0.67, 0.05), (-1.25, 0.01)), "energy": ((0.54, 0.06), (-1.21, 0.01)),
         "concrete": ((4.82, 0.16), (-2.93, 0.02)), "wine-quality-red": ((0.62, 0.01), (-0.93, 0.01))}


def _columns(folder: Path) -> tuple[list[int], int]:
    features: list[int] = []
    target = -1
    for line in (folder / "columns.txt").read_text().splitlines():
        key, _, rest = line.partition(":")
        numbers = [int(v) for v in rest.replace("columns", "").replace("column", "").split()]
        if key.strip() == "features":
            features = numbers
        elif key.strip() == "target":
            target = numbers[0]
    return features, target


def chosen_hyperparameters(name: str, data_dir: Path = DATA_DIR) -> dict[int, tuple[float, float]]:
    """Split -> (p, tau), the paper's grid-search winner."""
    out = {}
    for line in (data_dir / name / "chosen_hyperparameters.txt").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            k, p, tau = line.split()
            out[int(k)] = (float(p), float(tau))
    return out


@dataclass
class Split:
    """One train/test split, inputs and targets standardised on the training rows (float32)."""

    x_train: torch.Tensor  #: ``[N, D]``
    y_train: torch.Tensor  #: ``[N, 1]`` standardised
    x_test: torch.Tensor
    y_test: torch.Tensor  #: ``[M, 1]`` in the original units
    y_mean: float
    y_std: float

    @property
    def n_train(self) -> int:
        return int(self.x_train.shape[0])


def standardise(x_tr: np.ndarray, y_tr: np.ndarray, x_te: np.ndarray, y_te: np.ndarray) -> Split:
    """The paper's standardisation: on the training rows only, zero spread divided by 1."""
    mx, sx = x_tr.mean(0), x_tr.std(0)
    sx[sx == 0] = 1.0
    my, sy = float(y_tr.mean()), float(y_tr.std())
    f = torch.float32
    return Split(torch.as_tensor((x_tr - mx) / sx, dtype=f), torch.as_tensor((y_tr - my) / sy, dtype=f)[:, None],
                 torch.as_tensor((x_te - mx) / sx, dtype=f), torch.as_tensor(y_te, dtype=f)[:, None], my, sy)


def raw_split(name: str, split: int, data_dir: Path = DATA_DIR) -> tuple[np.ndarray, ...]:
    """``(x_train, y_train, x_test, y_test)`` of published split ``split``, unscaled (float64)."""
    folder = data_dir / name
    table = np.loadtxt(folder / "data.txt")
    features, target = _columns(folder)
    train = np.loadtxt(folder / "splits" / f"train_{split}.txt", dtype=int)
    test = np.loadtxt(folder / "splits" / f"test_{split}.txt", dtype=int)
    x, y = table[:, features], table[:, target]
    return x[train], y[train], x[test], y[test]


def load_split(name: str, split: int, data_dir: Path = DATA_DIR, validation: bool = False) -> Split:
    """Split ``split`` of ``name``, standardised on its training rows. ``validation``: the paper's grid
    search split instead, the first 80% of the training rows against the last 20%."""
    x_tr, y_tr, x_te, y_te = raw_split(name, split, data_dir)
    if validation:
        cut = int(0.8 * len(x_tr))
        x_tr, y_tr, x_te, y_te = x_tr[:cut], y_tr[:cut], x_tr[cut:], y_tr[cut:]
    return standardise(x_tr, y_tr, x_te, y_te)


@functools.cache
def _lightning_module() -> type:
    import pytorch_lightning as pl
    from torch.utils.data import DataLoader, TensorDataset

    class UCIDataModule(pl.LightningDataModule):
        """A published UCI split for ``regfw fit``: training rows to train, test rows to validate on.

        Targets are standardised on the training rows for training, and the module declares that
        scaling (``target_scaling``), so the MC metrics of validation, ``Trainer.test`` and
        ``regfw test`` are reported in the original units, as the paper reports them. The test rows
        are both the validation and the test split (the paper's protocol has no validation split).
        """

        task = "regression"
        num_outputs = 1

        def __init__(self, name: str = "yacht", split: int = 0, batch_size: int = 128,
                     data_dir: str | None = None) -> None:
            super().__init__()
            self.split = load_split(name, split, Path(data_dir) if data_dir else DATA_DIR)
            self.batch_size = batch_size
            self.input_dim = int(self.split.x_train.shape[1])
            self.n_train = self.split.n_train
            self.y_mean, self.y_std = self.split.y_mean, self.split.y_std
            self.target_scaling = (float(self.y_mean), float(self.y_std))

        def example_input(self) -> torch.Tensor:
            return self.split.x_train[:2]

        def train_dataloader(self) -> DataLoader:
            return DataLoader(TensorDataset(self.split.x_train, self.split.y_train), batch_size=self.batch_size,
                              shuffle=True)

        def val_dataloader(self) -> DataLoader:
            s = self.split
            y = (s.y_test - s.y_mean) / s.y_std  # the model's units; the metrics map back by target_scaling
            return DataLoader(TensorDataset(s.x_test, y), batch_size=1024)

        def test_dataloader(self) -> DataLoader:
            return self.val_dataloader()

    return UCIDataModule


def __getattr__(name: str) -> object:
    if name == "UCIDataModule":  # Lightning imported only when the data module is asked for
        return _lightning_module()
    raise AttributeError(name)
