"""Built-in datasets, embedded in scikit-learn (no network): ``digits`` and ``diabetes``; and
what regfw reads from any data module.

The data classes (:class:`SklearnData`, :class:`DigitsData`, :class:`DiabetesData`) need neither
Lightning nor anything heavy, so ``regfw plan`` reads the data's shapes without importing Lightning
(seconds of start-up). The LightningDataModules ``SklearnDataModule``, ``DigitsDataModule``,
``DiabetesDataModule`` (and ``BUILTIN_DATA``, keyed by name) are the same classes with
``pytorch_lightning.LightningDataModule`` mixed in, made on first access.

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
``test_dataloader()``
    Lightning's own: the test split, for ``Trainer.test`` and ``regfw test`` (the MC metrics are
    logged as ``test/mc/...``). The built-in datasets have one when ``init_args.test_fraction`` > 0.
``target_scaling``
    regression data whose targets were standardised, ``z = (y - mean) / std``: a
    :class:`regfw.train.targets.TargetScaling`, a ``(mean, std)`` pair or ``{"mean": ..., "std": ...}``.
    The MC metrics are then reported in the original units of ``y`` (``uncertainty.units``);
    None or absent: the targets are in original units already.

The keys of the ``data:`` section other than ``class_path`` and ``init_args`` (``batch_size``,
``val_fraction``, ``train_fraction``, ``num_workers``) are passed to a ``class_path`` data
module's constructor when set, and refused, naming the key, when it does not take them.
"""
from __future__ import annotations

import inspect
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, TensorDataset

from regfw.config.schema import DATA_KEYS
from regfw.errors import ConfigError
from regfw.train.batch import split_batch
from regfw.train.targets import TargetScaling

# SklearnDataModule, DigitsDataModule, DiabetesDataModule and BUILTIN_DATA come from __getattr__.
__all__ = ["SklearnData", "DigitsData", "DiabetesData", "BUILTIN_PLAIN_DATA", "data_module_args", "describe_data"]


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
    """A scikit-learn bundled dataset split into train, validation and (optionally) test with a
    fixed seed.

    Features are standardised with the training split's statistics (digits: scaled to [0, 1]).
    Exposes ``input_dim``, ``num_outputs``, ``task`` and ``n_train`` for building models and
    for the dropout rate policy. ``test_fraction`` > 0 holds that fraction out as a test split
    (``test_dataloader``, for ``Trainer.test`` and ``regfw test``), taken after the validation
    split, so the validation split is the same with or without it.
    """

    task: str = "classification"
    #: How the targets were standardised (regression), see :mod:`regfw.train.targets`; None: not at all.
    target_scaling: Any = None

    def __init__(self, batch_size: int = 64, val_fraction: float = 0.25, train_fraction: float = 1.0,
                 seed: int = 0, num_workers: int = 0, test_fraction: float = 0.0) -> None:
        super().__init__()
        self.batch_size = batch_size
        self.val_fraction = val_fraction
        self.train_fraction = train_fraction
        self.test_fraction = test_fraction
        self.seed = seed
        self.num_workers = num_workers
        x, y = self._load()
        rng = np.random.default_rng(seed)
        order = rng.permutation(len(x))
        n_val = max(1, int(round(len(x) * val_fraction)))
        n_test = _test_count(len(x), n_val, test_fraction)
        val_idx, test_idx, train_idx = order[:n_val], order[n_val:n_val + n_test], order[n_val + n_test:]
        train_idx = train_idx[: max(1, int(round(len(train_idx) * train_fraction)))]
        self._fit_scaling(x, y, train_idx)
        self.x_train, self.y_train = self._prepare(x, y, train_idx, train_idx)
        self.x_val, self.y_val = self._prepare(x, y, val_idx, train_idx)
        self.x_test, self.y_test = self._prepare(x, y, test_idx, train_idx)
        self.input_dim = int(x.shape[1])
        self.n_train = len(train_idx)
        self.n_test = n_test

    def _load(self) -> tuple[np.ndarray, np.ndarray]:
        raise NotImplementedError

    def _fit_scaling(self, x: np.ndarray, y: np.ndarray, train_idx: np.ndarray) -> None:
        """Learn whatever scaling ``_prepare`` applies, from the training split only."""

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

    def test_dataloader(self) -> DataLoader:
        """The held-out test split (``test_fraction`` > 0), in order."""
        if not self.n_test:
            raise ConfigError(f"data: {type(self).__name__} has no test split (test_fraction={self.test_fraction}); "
                              f"set data.init_args.test_fraction, e.g. 0.2, and train with it so the test rows are "
                              f"held out of training.", key="data.init_args.test_fraction")
        return DataLoader(TensorDataset(self.x_test, self.y_test), batch_size=256, shuffle=False,
                          num_workers=self.num_workers)

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
    """Diabetes progression (442 patients, 10 features), features standardised.

    With ``standardize_targets`` (the default) the target is standardised with the training
    split's mean and standard deviation too, and declared as :attr:`target_scaling`, so the MC
    metrics are reported in the original units (``uncertainty.units: original``); without it the
    model learns the raw disease-progression score (25 to 346).
    """

    task = "regression"
    num_outputs = 1

    def __init__(self, batch_size: int = 64, val_fraction: float = 0.25, train_fraction: float = 1.0,
                 seed: int = 0, num_workers: int = 0, test_fraction: float = 0.0,
                 standardize_targets: bool = True) -> None:
        if not isinstance(standardize_targets, bool):
            raise ConfigError(f"data.init_args.standardize_targets: got {standardize_targets!r}, expected true or "
                              f"false", key="data.init_args.standardize_targets")
        self.standardize_targets = standardize_targets
        super().__init__(batch_size=batch_size, val_fraction=val_fraction, train_fraction=train_fraction, seed=seed,
                         num_workers=num_workers, test_fraction=test_fraction)

    def _load(self):
        from sklearn.datasets import load_diabetes

        data = load_diabetes()
        return data.data.astype(np.float32), data.target.astype(np.float32)

    def _fit_scaling(self, x, y, train_idx):
        if self.standardize_targets:

            self.target_scaling = TargetScaling(float(y[train_idx].mean()), float(y[train_idx].std() + 1e-8))

    def _prepare(self, x, y, idx, train_idx):
        mx, sx = x[train_idx].mean(0), x[train_idx].std(0) + 1e-8
        target = y[idx]
        if self.target_scaling is not None:
            target = (target - np.float32(self.target_scaling.mean)) / np.float32(self.target_scaling.std)
        return torch.from_numpy((x[idx] - mx) / sx), torch.from_numpy(target.astype(np.float32)[:, None])


def _test_count(n: int, n_val: int, test_fraction: float) -> int:
    """Rows held out for the test split; a :class:`~regfw.errors.ConfigError` when the fraction
    leaves no training row."""
    if isinstance(test_fraction, bool) or not isinstance(test_fraction, (int, float)) or not 0 <= test_fraction < 1:
        raise ConfigError(f"data.init_args.test_fraction: got {test_fraction!r}, expected a fraction in [0, 1), "
                          f"e.g. 0.2", key="data.init_args.test_fraction")
    n_test = int(round(n * test_fraction)) if test_fraction > 0 else 0
    if test_fraction > 0:
        n_test = max(1, n_test)
    if n - n_val - n_test < 1:
        raise ConfigError(f"data.init_args.test_fraction: {test_fraction} with val_fraction leaves no training "
                          f"row of {n}; lower one of them", key="data.init_args.test_fraction")
    return n_test


#: The built-in datasets by name, without Lightning.
BUILTIN_PLAIN_DATA: dict[str, type[SklearnData]] = {"digits": DigitsData, "diabetes": DiabetesData}

_LIGHTNING: dict[str, Any] = {}


def _lightning_classes() -> dict[str, Any]:
    """The LightningDataModule classes, made once (this is where Lightning is imported)."""
    if not _LIGHTNING:
        import pytorch_lightning as pl

        def made(name: str, bases: tuple, doc: str | None) -> type:
            cls = type(name, bases, {"__module__": __name__, "__doc__": doc})
            cls.__qualname__ = name  # pickled and shown as regfw.build.datasets.<name>
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


def describe_data(datamodule: Any, batch: Any = None) -> tuple[int | None, Any, list[str]]:
    """``(n_train, example_input, notes)`` of a data module, from its optional members or what
    could be assumed instead; the notes (shown by ``regfw plan``) say what was assumed."""

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
