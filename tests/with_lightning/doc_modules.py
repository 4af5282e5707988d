"""LightningModules written the way Lightning's documentation writes them (importable by checkpoints)."""
from __future__ import annotations

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset, TensorDataset


class LitClassifier(pl.LightningModule):
    """A classifier with its own training_step, AdamW and a cosine schedule."""

    def __init__(self, in_features: int = 20, hidden: int = 64, classes: int = 3, lr: float = 1e-2,
                 epochs: int = 4) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.net = nn.Sequential(nn.Linear(in_features, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(),
                                 nn.Linear(hidden, classes))
        self.example_input_array = torch.zeros(2, in_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = F.cross_entropy(self(x), y)
        self.log("train_loss", loss)
        return loss

    def validation_step(self, batch, batch_idx):
        x, y = batch
        logits = self(x)
        self.log("val_loss", F.cross_entropy(logits, y))
        self.log("val_acc", (logits.argmax(-1) == y).float().mean())

    def configure_optimizers(self):
        optimizer = torch.optim.AdamW(self.parameters(), lr=self.hparams.lr)
        scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=self.hparams.epochs)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "epoch"}}


class DictDataset(Dataset):
    def __init__(self, x: torch.Tensor) -> None:
        self.x = x

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> dict:
        return {"x": self.x[i]}


class LitAutoEncoder(pl.LightningModule):
    """An autoencoder-style module with a dict batch, as in Lightning's introduction."""

    def __init__(self, features: int = 16, code: int = 4) -> None:
        super().__init__()
        self.encoder = nn.Sequential(nn.Linear(features, 32), nn.ReLU(), nn.Linear(32, code))
        self.decoder = nn.Sequential(nn.Linear(code, 32), nn.ReLU(), nn.Linear(32, features))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.encoder(x))

    def training_step(self, batch, batch_idx):
        x = batch["x"]
        loss = F.mse_loss(self(x), x)
        self.log("train_loss", loss)
        return {"loss": loss}

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=1e-3)


def classification_data(n: int = 120, features: int = 20, batch: int = 32, seed: int = 0, shuffle: bool = True):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, features, generator=g)
    y = (x[:, :3].argmax(-1)).long()
    train = DataLoader(TensorDataset(x, y), batch_size=batch, shuffle=shuffle,
                       generator=torch.Generator().manual_seed(1) if shuffle else None)
    return train, DataLoader(TensorDataset(x[:40], y[:40]), batch_size=batch)


def dict_data(n: int = 96, features: int = 16):
    g = torch.Generator().manual_seed(0)
    return DataLoader(DictDataset(torch.randn(n, features, generator=g)), batch_size=32)


class LitDataModule(pl.LightningDataModule):
    """A data module of one's own, as Lightning's docs write one (no regfw extras)."""

    def __init__(self, batch_size: int = 16) -> None:
        super().__init__()
        self.batch_size = batch_size

    def setup(self, stage: str) -> None:
        g = torch.Generator().manual_seed(0)
        self.x = torch.randn(120, 20, generator=g)
        self.y = self.x[:, :3].argmax(-1)

    def train_dataloader(self) -> DataLoader:
        self.setup("fit")
        return DataLoader(TensorDataset(self.x, self.y), batch_size=self.batch_size)

    def val_dataloader(self) -> DataLoader:
        self.setup("fit")
        return DataLoader(TensorDataset(self.x[:40], self.y[:40]), batch_size=self.batch_size)


class FixedBatchDataModule(LitDataModule):
    """One that takes no batch_size argument."""

    def __init__(self, seed: int = 0) -> None:
        super().__init__(batch_size=16)
        self.seed = seed
