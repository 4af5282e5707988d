"""RegularizedModule logs epoch means once per epoch, equal to the per-example means."""
from __future__ import annotations

import pytest
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from regfw.train.epoch_metrics import EpochMeans
from regfw.train.module import RegularizedModule


def _data(n: int = 100, batch: int = 32) -> tuple[DataLoader, DataLoader]:
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(n, 5, generator=g), torch.randint(0, 3, (n,), generator=g)
    return (DataLoader(TensorDataset(x, y), batch_size=batch),  # 32, 32, 32, 4: unequal batches
            DataLoader(TensorDataset(x[:50], y[:50]), batch_size=batch))


class Record(pl.Callback):
    """Per-batch training losses and sizes, and what a callback sees at validation epoch end."""

    def __init__(self) -> None:
        self.losses: list[tuple[float, int]] = []
        self.seen_at_val_end: list[set[str]] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.losses.append((float(outputs["loss"]), len(batch[0])))

    def on_validation_epoch_end(self, trainer, pl_module):
        if not trainer.sanity_checking:
            self.seen_at_val_end.append(set(trainer.callback_metrics))


def test_epoch_means_are_weighted_by_batch_size_and_visible_to_callbacks_at_epoch_end():
    torch.manual_seed(0)
    module = RegularizedModule(nn.Sequential(nn.Linear(5, 16), nn.ReLU(), nn.Linear(16, 3)),
                               regularizers={"l1": {"strength": 1e-3}})
    train, val = _data()
    record = Record()
    trainer = pl.Trainer(max_epochs=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, callbacks=[record])
    trainer.fit(module, train, val)
    # the returned loss includes the l1 penalty; train_loss is the data loss, train_penalty the rest
    total = sum(loss * n for loss, n in record.losses) / sum(n for _, n in record.losses)
    logged = float(trainer.callback_metrics["train_loss"]) + float(trainer.callback_metrics["train_penalty"])
    assert logged == pytest.approx(total, rel=1e-5)
    module.eval()
    x, y = val.dataset.tensors
    with torch.no_grad():
        out = module(x)
    assert float(trainer.callback_metrics["val_loss"]) == pytest.approx(float(F.cross_entropy(out, y)), rel=1e-5)
    assert float(trainer.callback_metrics["val_acc"]) == pytest.approx(float((out.argmax(-1) == y).float().mean()))
    # callbacks reading callback_metrics in on_validation_epoch_end (adaptive dropout does) find them
    assert {"val_loss", "val_acc"} <= record.seen_at_val_end[0]


def test_epoch_means_pop_only_their_prefix():
    means = EpochMeans()
    means.add("train_loss", torch.tensor(1.0), 3)
    means.add("train_loss", torch.tensor(2.0), 1)
    means.add("val_loss", torch.tensor(5.0), 2)
    assert {k: float(v) for k, v in means.pop(prefix="train_").items()} == {"train_loss": 1.25}
    assert {k: float(v) for k, v in means.pop().items()} == {"val_loss": 5.0}
    assert means.pop() == {}
