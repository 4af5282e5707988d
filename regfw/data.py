"""Built-in datasets, embedded in scikit-learn (no network): ``digits`` and ``diabetes``.

The data classes (:class:`SklearnData`, :class:`DigitsData`, :class:`DiabetesData`) need neither
Lightning nor anything heavy, so ``regfw plan`` reads the data's shapes without importing Lightning
(seconds of start-up). The LightningDataModules ``SklearnDataModule``, ``DigitsDataModule``,
``DiabetesDataModule`` (and ``BUILTIN_DATA``, keyed by name) are the same classes with
``pytorch_lightning.LightningDataModule`` mixed in, made on first access.
"""
from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, TensorDataset

# SklearnDataModule, DigitsDataModule, DiabetesDataModule and BUILTIN_DATA come from __getattr__.
__all__ = ["SklearnData", "DigitsData", "DiabetesData", "BUILTIN_PLAIN_DATA"]


def _sklearn_table(name: str) -> np.ndarray | None:
    """A CSV table that scikit-learn ships in ``sklearn/datasets/data``, read the way
    ``load_digits`` reads it, without importing scikit-learn (over a second of start-up);
    None when the file is not there."""
    import gzip
    import importlib.util
    from pathlib import Path

    spec = importlib.util.find_spec("sklearn")  # locates the package without running it
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations))) / "datasets" / "data" / name
    if not path.is_file():
        return None
    with gzip.open(path, "rt") as f:
        return np.loadtxt(f, delimiter=",")


class SklearnData:
    """A scikit-learn bundled dataset split into train and validation with a fixed seed.

    Features are standardised with the training split's statistics (digits: scaled to [0, 1]).
    Exposes ``input_dim``, ``num_outputs``, ``task`` and ``n_train`` for building models and
    for the dropout rate policy.
    """

    task: str = "classification"

    def __init__(self, batch_size: int = 64, val_fraction: float = 0.25, train_fraction: float = 1.0,
                 seed: int = 0, num_workers: int = 0) -> None:
        super().__init__()
        self.batch_size = batch_size
        self.val_fraction = val_fraction
        self.train_fraction = train_fraction
        self.seed = seed
        self.num_workers = num_workers
        x, y = self._load()
        rng = np.random.default_rng(seed)
        order = rng.permutation(len(x))
        n_val = max(1, int(round(len(x) * val_fraction)))
        val_idx, train_idx = order[:n_val], order[n_val:]
        train_idx = train_idx[: max(1, int(round(len(train_idx) * train_fraction)))]
        self.x_train, self.y_train = self._prepare(x, y, train_idx, train_idx)
        self.x_val, self.y_val = self._prepare(x, y, val_idx, train_idx)
        self.input_dim = int(x.shape[1])
        self.n_train = len(train_idx)

    def _load(self) -> tuple[np.ndarray, np.ndarray]:
        raise NotImplementedError

    def _prepare(self, x, y, idx, train_idx):
        raise NotImplementedError

    def train_dataset(self) -> TensorDataset:
        return TensorDataset(self.x_train, self.y_train)

    def val_dataset(self) -> TensorDataset:
        return TensorDataset(self.x_val, self.y_val)

    def example_input(self) -> torch.Tensor:
        return self.x_train[:2]

    def train_dataloader(self) -> DataLoader:
        g = torch.Generator().manual_seed(self.seed)
        return DataLoader(self.train_dataset(), batch_size=self.batch_size, shuffle=True, generator=g,
                          num_workers=self.num_workers)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.val_dataset(), batch_size=256, shuffle=False, num_workers=self.num_workers)

    def train_eval_dataloader(self) -> DataLoader:
        """The training split in order, for evaluating the final model on it."""
        return DataLoader(self.train_dataset(), batch_size=256, shuffle=False)


class DigitsData(SklearnData):
    """8x8 handwritten digits (1,797 images, 10 classes), flattened to 64 features in [0, 1]."""

    task = "classification"
    num_outputs = 10

    def _load(self):
        table = _sklearn_table("digits.csv.gz")
        if table is None:  # pragma: no cover - an install without the file: sklearn's own loader
            from sklearn.datasets import load_digits

            data = load_digits()
            return data.data.astype(np.float32) / 16.0, data.target.astype(np.int64)
        return table[:, :-1].astype(np.float32) / 16.0, table[:, -1].astype(np.int64)

    def _prepare(self, x, y, idx, train_idx):
        return torch.from_numpy(x[idx]), torch.from_numpy(y[idx])


class DiabetesData(SklearnData):
    """Diabetes progression (442 patients, 10 features), standardised; target standardised."""

    task = "regression"
    num_outputs = 1

    def _load(self):
        from sklearn.datasets import load_diabetes

        data = load_diabetes()
        return data.data.astype(np.float32), data.target.astype(np.float32)

    def _prepare(self, x, y, idx, train_idx):
        mx, sx = x[train_idx].mean(0), x[train_idx].std(0) + 1e-8
        my, sy = y[train_idx].mean(), y[train_idx].std() + 1e-8
        return torch.from_numpy((x[idx] - mx) / sx), torch.from_numpy(((y[idx] - my) / sy)[:, None])


#: The built-in datasets by name, without Lightning.
BUILTIN_PLAIN_DATA: dict[str, type[SklearnData]] = {"digits": DigitsData, "diabetes": DiabetesData}

_LIGHTNING: dict[str, Any] = {}


def _lightning_classes() -> dict[str, Any]:
    """The LightningDataModule classes, made once (this is where Lightning is imported)."""
    if not _LIGHTNING:
        import pytorch_lightning as pl

        def made(name: str, bases: tuple, doc: str | None) -> type:
            cls = type(name, bases, {"__module__": __name__, "__doc__": doc})
            cls.__qualname__ = name  # pickled and shown as regfw.data.<name>
            return cls

        base = made("SklearnDataModule", (SklearnData, pl.LightningDataModule), SklearnData.__doc__)
        digits = made("DigitsDataModule", (DigitsData, base), DigitsData.__doc__)
        diabetes = made("DiabetesDataModule", (DiabetesData, base), DiabetesData.__doc__)
        _LIGHTNING.update(SklearnDataModule=base, DigitsDataModule=digits, DiabetesDataModule=diabetes,
                          BUILTIN_DATA={"digits": digits, "diabetes": diabetes})
    return _LIGHTNING


def __getattr__(name: str) -> Any:
    if name in ("SklearnDataModule", "DigitsDataModule", "DiabetesDataModule", "BUILTIN_DATA"):
        return _lightning_classes()[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
