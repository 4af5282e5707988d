"""Built-in datasets, embedded in scikit-learn (no network): ``digits`` and ``diabetes``; and
what regfw reads from any data module.

A data module of your own (``data.class_path``) needs only Lightning's ``train_dataloader`` and
``val_dataloader``. regfw also reads these optional members when they exist:

``n_train`` (attribute or property)
    the number of training examples, for the rate policy ("higher rates for smaller
    datasets"). Without it regfw counts ``len(train_dataloader().dataset)``, and where that
    fails the policy takes N as unknown (the middle of its scale); ``regfw plan`` says which.
``example_input()``
    one input batch: the model is traced on it to learn the layer order (which layer is the
    input, which the output). Without it regfw takes the input of the first training batch;
    ``regfw plan`` says so.
``task`` (``"classification"`` or ``"regression"``) and ``num_outputs``, ``input_dim``
    for ``model.loss: auto`` and the built-in models' sizes.
``train_eval_dataloader()``
    the training split in order, for the final evaluation and ``regfw rank --split train``.

The keys of the ``data:`` section other than ``class_path`` and ``init_args`` (``batch_size``,
``val_fraction``, ``train_fraction``, ``num_workers``) are passed to a ``class_path`` data
module's constructor when set, and refused, naming the key, when it does not take them.
"""
from __future__ import annotations

import inspect
from collections.abc import Mapping
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, TensorDataset

from regfw.config import DATA_KEYS
from regfw.errors import ConfigError


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


def data_module_args(cls: type, init_args: Mapping[str, Any], data_cfg: Any) -> dict:
    """``init_args`` plus every :data:`DATA_KEYS` key set in ``data_cfg``, each checked against the
    constructor of ``cls``: a key it does not take is refused by name (never silently ignored)."""
    args = dict(init_args)
    params: Mapping[str, inspect.Parameter]
    try:
        params = inspect.signature(cls).parameters
    except (TypeError, ValueError):
        params = {}
    takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    name = getattr(cls, "__qualname__", str(cls))
    for key in DATA_KEYS:
        value = getattr(data_cfg, key, None)
        if value is None:
            continue
        if key in args:
            raise ConfigError(f"data.{key}={value!r} and data.init_args.{key}={args[key]!r} both set {name}'s {key}; "
                              f"keep one of them.")
        if key not in params and not takes_any:
            takes = ", ".join(p for p in params if p != "self") or "no arguments"
            raise ConfigError(f"data.{key}={value!r}: {name} takes no {key!r} argument (it takes {takes}); set "
                              f"its own argument in data.init_args, or remove data.{key}.")
        args[key] = value
    return args


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


def describe_data(datamodule: Any, batch: Any = None) -> tuple[int | None, Any, list[str]]:
    """``(n_train, example_input, notes)`` of a data module, from its optional members or what
    could be assumed instead; the notes (shown by ``regfw plan``) say what was assumed."""
    from regfw.batch import split_batch

    name = type(getattr(datamodule, "inner", datamodule)).__name__
    notes = []
    n_train = getattr(datamodule, "n_train", None)
    loader = None
    if n_train is None:
        try:
            loader = datamodule.train_dataloader()
            n_train = len(loader.dataset)
            notes.append(f"{name} has no n_train; N={n_train} is the length of its training dataset")
        except Exception:  # noqa: BLE001 - any data module that cannot tell before setup
            notes.append(f"{name} has no n_train and its training set has no length before setup; the rate "
                         f"policy took N as unknown (the middle of its scale). Give it an n_train attribute.")
    if hasattr(datamodule, "example_input"):
        return n_train, datamodule.example_input(), notes
    try:
        loader = loader if loader is not None else datamodule.train_dataloader()
        example, _ = split_batch(next(iter(loader)), batch)
        notes.append(f"{name} has no example_input(); the model was traced on the input of its first training batch")
    except Exception:  # noqa: BLE001
        example = None
        notes.append(f"{name} has no example_input() and no training batch could be read before setup; the layer "
                     f"order is the modules' registration order. Give it an example_input() method.")
    return n_train, example, notes
