"""What regfw costs per epoch on a UCI-sized regression fit, measured side by side in one run.

The MC dropout paper's UCI setting (Gal & Ghahramani, "Dropout as a Bayesian Approximation", ICML
2016): a yacht-sized synthetic regression set (308 rows, 6 features; 278 training and 30
validation rows, batch 128: 3 training steps and one validation batch an epoch), one hidden layer
of 50 ReLU units, dropout on the input and on the hidden layer, Adam with L2 weight decay (Adam's
own ``weight_decay``, the gradient ``+ wd * w`` on every parameter), trained by:

* ``plain loop``: a hand-written PyTorch loop (zero_grad, forward, MSE, backward, Adam step; the
  validation loss under ``torch.no_grad`` in eval mode);
* ``bare LightningModule``: the same network written with ``nn.Dropout`` in a LightningModule as
  Lightning's documentation writes one: ``training_step`` returns the MSE, ``validation_step``
  logs ``val_loss`` with ``self.log``; ``configure_optimizers`` returns the same Adam;
* ``bare + train_loss``: the bare module also logging its training loss as ``RegularizedModule``
  does, an epoch mean (``self.log("train_loss", loss, on_step=False, on_epoch=True)``): the same
  logging in both, for reference (each ``self.log`` call costs about 0.4 ms of Lightning's
  bookkeeping here, a tenth of the whole epoch);
* ``bare + files``: the bare module logging ``train_loss`` and writing what ``regfw fit`` writes every
  epoch, the Lightning way: a ``CSVLogger`` metrics file, and ``ModelCheckpoint(save_last=True)``'s
  epoch checkpoint and ``last.ckpt`` (plain ``torch.save``, no digest, no fsync): the same work as
  ``regfw fit``, which the last line compares it with;
* ``RegularizedModule``: regfw's module on the network without dropout, the two dropout layers
  injected by ``regularizers={"dropout": {"input": P_IN, "hidden": P_HIDDEN}}``, the same Adam
  through ``optimizer={"name": "adam", "weight_decay": WD}``; it logs ``train_loss`` and
  ``val_loss`` (epoch means, exact under DDP);
* ``regfw fit``: :func:`regfw.run.job.fit` in this process on the same data (a LightningDataModule
  given by ``data.class_path``) with the config a user writes for it (``model.name: mlp``,
  ``hidden: [50]``, the same dropout and optimizer, ``uncertainty.enabled: false``): everything
  ``regfw fit`` adds is in the time (its CSV metrics log, its epoch checkpoint and ``last.ckpt``
  written every epoch, per-step seeding), but not its start-up (config, plan, run directory) and
  not its final evaluation;
* ``regfw fit, MC on``: the same with ``uncertainty.enabled: true`` as a user gets it by default
  (MC dropout metrics of the validation batch every epoch, T = 30; its figures, drawn once at the
  end of the fit, fall outside the timed span).

The three Lightning runs use the same Trainer settings (CPU, ``num_sanity_val_steps=0``, no
progress bar or model summary); the bare module and ``RegularizedModule`` run with
``logger=False`` and ``enable_checkpointing=False``, which ``regfw fit`` does not have.
Times are CPU time (``time.process_time``) per epoch from the second epoch to the end of training
(the Trainer's set-up and first epoch left out), medians over interleaved rounds (each round runs
every variant once), printed with their ratio to the bare LightningModule. Run:
``python bench/regression_overhead.py`` (``--epochs N``, ``--repeats N``, ``--threads N``).
"""
from __future__ import annotations

import argparse
import logging
import statistics
import tempfile
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from lightning_overhead import EpochClock, plain_loop  # bench/ is the script directory, on sys.path
from pytorch_lightning.callbacks import ModelCheckpoint
from pytorch_lightning.loggers import CSVLogger
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

ROWS, FEATURES, HIDDEN, BATCH, VAL_ROWS = 308, 6, 50, 128, 30
P_IN, P_HIDDEN, LR, WD = 0.05, 0.05, 1e-3, 1e-4


def tensors() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(ROWS, FEATURES, generator=g)
    y = x @ torch.randn(FEATURES, 1, generator=g) + 0.1 * torch.randn(ROWS, 1, generator=g)
    return x, y


def loaders() -> tuple[DataLoader, DataLoader]:
    x, y = tensors()
    n = ROWS - VAL_ROWS
    train = DataLoader(TensorDataset(x[:n], y[:n]), batch_size=BATCH, shuffle=True,
                       generator=torch.Generator().manual_seed(1))
    return train, DataLoader(TensorDataset(x[n:], y[n:]), batch_size=BATCH)


class YachtLike(pl.LightningDataModule):
    """The same loaders as a data module, for ``regfw fit`` (``data.class_path``)."""

    task = "regression"
    input_dim = FEATURES
    num_outputs = 1
    n_train = ROWS - VAL_ROWS

    def __init__(self) -> None:
        super().__init__()
        self._train, self._val = loaders()

    def example_input(self) -> torch.Tensor:
        return self._train.dataset[:2][0]

    def train_dataloader(self) -> DataLoader:
        return self._train

    def val_dataloader(self) -> DataLoader:
        return self._val


def plain_net(dropout: bool) -> nn.Module:
    torch.manual_seed(0)
    layers: list[nn.Module] = [nn.Linear(FEATURES, HIDDEN), nn.ReLU(), nn.Linear(HIDDEN, 1)]
    if dropout:
        layers = [nn.Dropout(P_IN), layers[0], layers[1], nn.Dropout(P_HIDDEN), layers[2]]
    return nn.Sequential(*layers)


class Bare(pl.LightningModule):
    log_train_loss = False

    def __init__(self) -> None:
        super().__init__()
        self.net = plain_net(dropout=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = F.mse_loss(self(x), y)
        if self.log_train_loss:
            self.log("train_loss", loss, on_step=False, on_epoch=True)
        return loss

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val_loss", F.mse_loss(self(x), y))

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=LR, weight_decay=WD)


def regularized() -> pl.LightningModule:
    from regfw.train.module import RegularizedModule

    x, _ = tensors()
    return RegularizedModule(plain_net(dropout=False), loss="mse",
                             regularizers={"dropout": {"input": P_IN, "hidden": P_HIDDEN}},
                             optimizer={"name": "adam", "lr": LR, "weight_decay": WD}, example_input=x[:2],
                             n_examples=ROWS - VAL_ROWS)


class BareLogged(Bare):
    log_train_loss = True



def plain(epochs: int) -> float:
    train, val = loaders()
    net = plain_net(dropout=True)
    return plain_loop(net, torch.optim.Adam(net.parameters(), lr=LR, weight_decay=WD), train, val, epochs)


def lightning(module: Callable[[], pl.LightningModule], outputs: Path | None = None) -> Callable[[int], float]:
    """A fit of ``module()``; with ``outputs``, writing what ``regfw fit`` writes every epoch, the
    Lightning way: a CSV metrics log and an epoch checkpoint plus ``last.ckpt`` (``ModelCheckpoint``)."""
    count = [0]

    def run(epochs: int) -> float:
        train, val = loaders()
        clock = EpochClock()
        callbacks: list[pl.Callback] = [clock]
        logger: Any = False
        if outputs is not None:
            count[0] += 1
            where = outputs / f"bare-{count[0]}"
            logger = CSVLogger(str(where), name="", version="")
            callbacks.append(ModelCheckpoint(dirpath=str(where / "checkpoints"), filename="epoch={epoch:03d}",
                                             save_last=True, auto_insert_metric_name=False))
        pl.Trainer(max_epochs=epochs + 1, accelerator="cpu", devices=1, logger=logger,
                   enable_checkpointing=outputs is not None, enable_progress_bar=False, enable_model_summary=False,
                   num_sanity_val_steps=0, callbacks=callbacks).fit(module(), train, val)
        return clock.ms
    return run


CONFIG = f"""\
seed: 0
data:
  class_path: {__name__}.YachtLike
model:
  name: mlp
  loss: mse
  init_args: {{in_features: {FEATURES}, num_outputs: 1, hidden: [{HIDDEN}]}}
optimizer: {{name: adam, lr: {LR}, weight_decay: {WD}}}
regularizers:
  dropout: {{input: {P_IN}, hidden: {P_HIDDEN}}}
uncertainty: {{enabled: false}}
trainer: {{enable_progress_bar: false, enable_model_summary: false, num_sanity_val_steps: 0}}
"""


def regfw_fit(root: Path, mc: bool = False) -> Callable[[int], float]:
    from regfw.config.schema import load_config
    from regfw.run.job import fit

    path = root / ("yacht_like_mc.yaml" if mc else "yacht_like.yaml")
    path.write_text(CONFIG.replace("uncertainty: {enabled: false}", "uncertainty: {enabled: true}") if mc else CONFIG)
    count = [0]

    def run(epochs: int) -> float:
        count[0] += 1
        cfg = load_config(path, [f"trainer.max_epochs={epochs + 1}", f"run.dir={root / 'runs'}"])
        clock = EpochClock()
        fit(cfg, run_dir=str(root / "runs" / f"{path.stem}-{count[0]}"), callbacks=[clock], quiet=True)
        return clock.ms
    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    for name in ("pytorch_lightning", "lightning", "lightning.pytorch"):
        logging.getLogger(name).setLevel(logging.ERROR)
    with tempfile.TemporaryDirectory() as tmp:
        runs: dict[str, Callable[[int], float]] = {
            "plain loop": plain,
            "bare LightningModule": lightning(Bare),
            "bare + train_loss": lightning(BareLogged),
            "bare + files": lightning(BareLogged, Path(tmp)),
            "RegularizedModule": lightning(regularized),
            "regfw fit": regfw_fit(Path(tmp)),
            "regfw fit, MC on": regfw_fit(Path(tmp), mc=True),
        }
        times: dict[str, list[float]] = {name: [] for name in runs}
        for fn in runs.values():  # warm-up
            fn(2)
        for _ in range(args.repeats):  # interleaved, so a machine that slows down slows all alike
            for name, fn in runs.items():
                times[name].append(fn(args.epochs))
    base = statistics.median(times["bare LightningModule"])
    steps = -(-(ROWS - VAL_ROWS) // BATCH)
    print(f"CPU time per epoch ({steps} training steps + 1 validation batch), {ROWS} rows x {FEATURES} features, "
          f"{HIDDEN} ReLU units, dropout {P_IN}/{P_HIDDEN}, Adam weight_decay {WD}, batch {BATCH}; {args.epochs} "
          f"epochs, median of {args.repeats}, {args.threads} thread(s)")
    for name, ts in times.items():
        ms = statistics.median(ts)
        print(f"  {name:22s} {ms:7.2f} ms  {ms / base:5.2f}x bare LightningModule  (spread {min(ts):.2f}-"
              f"{max(ts):.2f} ms)")
    files = statistics.median(times["bare + files"])
    print(f"  regfw fit against the bare module writing the same files: "
          f"{statistics.median(times['regfw fit']) / files:.2f}x")


if __name__ == "__main__":
    main()
