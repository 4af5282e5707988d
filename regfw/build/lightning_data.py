"""A ``lightning.pytorch`` data module (the unified ``lightning`` package) seen by regfw's
``pytorch_lightning`` Trainer.

Kept apart from :mod:`regfw.build.datasets`, which stays free of Lightning so that ``regfw plan`` starts fast.
"""
from __future__ import annotations

from typing import Any

import pytorch_lightning as pl
import torch

__all__ = ["ForeignDataModule", "adapt_datamodule"]


def adapt_datamodule(datamodule: Any) -> Any:
    """``datamodule`` as a ``pytorch_lightning`` data module.

    regfw trains with ``pytorch_lightning``; a ``lightning.pytorch.LightningDataModule`` (the
    unified ``lightning`` package) is wrapped in :class:`ForeignDataModule`, which passes every
    data-module hook through. Anything else is returned as it is.
    """
    if isinstance(datamodule, pl.LightningDataModule):
        return datamodule
    if any(c.__module__.startswith("lightning.pytorch") and c.__name__ == "LightningDataModule"
           for c in type(datamodule).__mro__):
        return ForeignDataModule(datamodule)
    return datamodule


class ForeignDataModule(pl.LightningDataModule):
    """A ``lightning.pytorch`` data module seen by a ``pytorch_lightning`` Trainer.

    The two packages are copies of one code base whose classes do not mix (a Trainer of one
    refuses, or mishandles, a data module of the other: ``ValueError: Expected a parent``).
    This wrapper forwards the data hooks, checkpoint state and every other attribute
    (``n_train``, ``example_input`` ...) to the wrapped module, ``inner``.
    """

    def __init__(self, inner: Any) -> None:
        super().__init__()
        self.inner = inner

    def __getattr__(self, name: str) -> Any:  # only for what the wrapper itself does not have
        inner = self.__dict__.get("inner")
        if inner is None:
            raise AttributeError(name)
        return getattr(inner, name)

    def prepare_data(self) -> None:
        self.inner.prepare_data()

    def setup(self, stage: str) -> None:
        self.inner.trainer = self.trainer  # for data modules that read self.trainer (world size ...)
        self.inner.setup(stage)

    def teardown(self, stage: str) -> None:
        self.inner.teardown(stage)

    def train_dataloader(self) -> Any:
        return self.inner.train_dataloader()

    def val_dataloader(self) -> Any:
        return self.inner.val_dataloader()

    def test_dataloader(self) -> Any:
        return self.inner.test_dataloader()

    def predict_dataloader(self) -> Any:
        return self.inner.predict_dataloader()

    def transfer_batch_to_device(self, batch: Any, device: torch.device, dataloader_idx: int) -> Any:
        return self.inner.transfer_batch_to_device(batch, device, dataloader_idx)

    def on_before_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        return self.inner.on_before_batch_transfer(batch, dataloader_idx)

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        return self.inner.on_after_batch_transfer(batch, dataloader_idx)

    def state_dict(self) -> dict[str, Any]:
        return self.inner.state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.inner.load_state_dict(state_dict)
