"""Built-in datasets, embedded in scikit-learn (no network): ``digits`` and ``diabetes``."""
from __future__ import annotations

import numpy as np
import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, TensorDataset


class SklearnDataModule(pl.LightningDataModule):
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


class DigitsDataModule(SklearnDataModule):
    """8x8 handwritten digits (1,797 images, 10 classes), flattened to 64 features in [0, 1]."""

    task = "classification"
    num_outputs = 10

    def _load(self):
        from sklearn.datasets import load_digits

        data = load_digits()
        return data.data.astype(np.float32) / 16.0, data.target.astype(np.int64)

    def _prepare(self, x, y, idx, train_idx):
        return torch.from_numpy(x[idx]), torch.from_numpy(y[idx])


class DiabetesDataModule(SklearnDataModule):
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


BUILTIN_DATA: dict[str, type[SklearnDataModule]] = {"digits": DigitsDataModule, "diabetes": DiabetesDataModule}
