"""What Lightning and regfw cost per epoch on UCI-sized data, measured side by side.

A yacht-sized regression set (308 rows, 6 features, batch 128: 3 steps an epoch) and one small
MLP with dropout, trained for a few epochs with a training and a validation loader by:

* ``plain loop``: a hand-written PyTorch loop (forward, MSE, backward, Adam step);
* ``bare LightningModule``: the same network in a LightningModule written as Lightning's
  documentation writes one (``training_step`` returns the loss, one ``self.log`` of the
  validation loss);
* ``RegularizedModule``: regfw's module with the same network and no regularizer, which logs
  train/val loss with correct DDP means (synchronised once at epoch end);
* ``Regularize callback``: the bare module with :class:`regfw.train.regularize.Regularize` (weight
  decay), the way a Lightning user adds regfw to their own module.

Times are CPU time (``time.process_time``) per epoch after the first (the Trainer's setup left
out), medians over interleaved rounds, printed
with their ratio to the bare LightningModule. Run: ``python bench/lightning_overhead.py``
(``--epochs N``, ``--repeats N``).
"""
from __future__ import annotations

import argparse
import statistics
import time
import warnings
from collections.abc import Callable

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from regfw.train.module import RegularizedModule
from regfw.train.regularize import Regularize  # noqa: I001


def make_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 50), nn.ReLU(), nn.Dropout(0.1), nn.Linear(50, 1))


class Bare(pl.LightningModule):
    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.mse_loss(self(x), y)

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val_loss", F.mse_loss(self(x), y))

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=1e-3)


def loaders() -> tuple[DataLoader, DataLoader]:
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(308, 6, generator=g), torch.randn(308, 1, generator=g)
    train = DataLoader(TensorDataset(x, y), batch_size=128, shuffle=True, generator=torch.Generator().manual_seed(1))
    return train, DataLoader(TensorDataset(x[:64], y[:64]), batch_size=128)


def trainer(epochs: int, callbacks: list | None = None) -> pl.Trainer:
    return pl.Trainer(max_epochs=epochs, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                      enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                      callbacks=callbacks or [])


class EpochClock(pl.Callback):
    """CPU time from the start of the second epoch to the end of training (setup left out)."""

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        if trainer.current_epoch == 1:
            self.start = time.process_time()

    def on_train_end(self, trainer, pl_module) -> None:
        self.ms = (time.process_time() - self.start) / (trainer.current_epoch - 1) * 1e3


def plain(epochs: int) -> float:
    train, val = loaders()
    net = make_net()
    return plain_loop(net, torch.optim.Adam(net.parameters(), lr=1e-3), train, val, epochs)


def plain_loop(net: nn.Module, opt: torch.optim.Optimizer, train: DataLoader, val: DataLoader, epochs: int) -> float:
    """CPU milliseconds per epoch of a hand-written loop: zero_grad, forward, MSE, backward, step; the
    validation loss under ``torch.no_grad`` in eval mode."""
    start = time.process_time()
    for _ in range(epochs):
        net.train()
        for x, y in train:
            opt.zero_grad()
            F.mse_loss(net(x), y).backward()
            opt.step()
        net.eval()
        with torch.no_grad():
            for x, y in val:
                F.mse_loss(net(x), y)
    return (time.process_time() - start) / epochs * 1e3


def lightning(module: Callable[[], pl.LightningModule], callbacks: Callable[[], list] = list) -> Callable[[int], float]:
    def run(epochs: int) -> float:
        train, val = loaders()
        clock = EpochClock()
        trainer(epochs + 1, [*callbacks(), clock]).fit(module(), train, val)
        return clock.ms
    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")
    import logging

    logging.getLogger("pytorch_lightning").setLevel(logging.ERROR)
    runs: dict[str, Callable[[int], float]] = {
        "plain loop": plain,
        "bare LightningModule": lightning(lambda: Bare(make_net())),
        "RegularizedModule": lightning(lambda: RegularizedModule(make_net(), loss="mse")),
        "Regularize callback": lightning(lambda: Bare(make_net()),
                                         lambda: [Regularize({"weight_decay": {"strength": 1e-4}})]),
    }
    times: dict[str, list[float]] = {name: [] for name in runs}
    for fn in runs.values():  # warm-up
        fn(2)
    for _ in range(args.repeats):  # interleaved, so a machine that slows down slows all alike
        for name, fn in runs.items():
            times[name].append(fn(args.epochs))
    base = statistics.median(times["bare LightningModule"])
    print(f"CPU time per epoch, yacht-sized data (308 rows, batch 128), {args.epochs} epochs, median of {args.repeats}")
    for name, ts in times.items():
        ms = statistics.median(ts)
        print(f"  {name:24s} {ms:7.2f} ms  {ms / base:5.2f}x bare LightningModule")


if __name__ == "__main__":
    main()
