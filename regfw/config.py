"""Configuration: an OmegaConf YAML file plus dotlist overrides, validated against dataclasses.

Top-level sections: ``seed``, ``data``, ``model``, ``optimizer``, ``regularizers``,
``uncertainty``, ``trainer`` and ``run``. Each regularizer's section is validated against its
plugin's ``Config`` dataclass. Every error names the full dotted key, the value, what was
expected and how to fix it.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from regfw.errors import ConfigError, closest_hint

# The field helpers and section validation live in regfw.validation (regfw.registry uses them
# too); regfw.config is their public home, so they are re-exported here.
from regfw.validation import _to_plain, validate_dataclass
from regfw.validation import check_finite as check_finite
from regfw.validation import nonneg as nonneg
from regfw.validation import positive as positive
from regfw.validation import rate as rate

# -- the top-level schema -------------------------------------------------------------------------


@dataclass
class DataConfig:
    """``data:`` a built-in dataset by ``name`` or a LightningDataModule by ``class_path``."""

    name: Literal["digits", "diabetes"] | None = "digits"
    class_path: str | None = None
    init_args: dict = field(default_factory=dict)
    batch_size: int = positive(64)
    val_fraction: float = field(default=0.25, metadata={"range": (0.0, 1.0, "(0, 1)", "exclusive")})
    #: Use only this fraction of the training split (smaller data overfits more).
    train_fraction: float = field(default=1.0, metadata={"range": (0.0, 1.0000001, "(0, 1]", "exclusive")})
    num_workers: int = nonneg(0)
    #: Where inputs and targets sit in a batch: ``{inputs: 0, targets: 1}`` (tuple batches, the
    #: default) or dict keys, ``{inputs: image, targets: label}``; used by the module, MC
    #: dropout, evaluation, active learning and predict (see :mod:`regfw.batch`).
    batch: dict | None = None

    def __post_init__(self) -> None:
        if self.batch is not None:
            from regfw.batch import BatchFormat

            self.batch = BatchFormat.coerce(self.batch, "data.batch").as_dict()


#: The loss shorthands of ``model.loss``.
LOSS_NAMES = ("cross_entropy", "mse", "gaussian_nll")


def check_loss_spec(spec: Any, key: str = "model.loss") -> None:
    """A :class:`ConfigError` for a ``model.loss`` that is neither a shorthand, ``auto``, a dotted
    path nor ``{class_path, init_args}``."""
    if isinstance(spec, Mapping):
        if not isinstance(spec.get("class_path"), str) or set(spec) - {"class_path", "init_args"}:
            raise ConfigError(f"{key}: got {dict(spec)!r}, expected {{class_path: ..., init_args: {{...}}}}.")
        return
    if not isinstance(spec, str) or (spec not in (*LOSS_NAMES, "auto") and "." not in spec):
        raise ConfigError(f"{key}: got {spec!r}, expected auto, one of {', '.join(LOSS_NAMES)}, or a class path "
                          f"such as torch.nn.HuberLoss.{closest_hint(str(spec), list(LOSS_NAMES))}")


#: The ``data:`` keys that are data-module constructor arguments (see :mod:`regfw.data`).
DATA_KEYS = ("batch_size", "val_fraction", "train_fraction", "num_workers")


@dataclass
class ModelConfig:
    """``model:`` a built-in model by ``name`` or an ``nn.Module`` by ``class_path``."""

    name: Literal["mlp", "cnn", "lstm"] | None = "mlp"
    class_path: str | None = None
    init_args: dict = field(default_factory=dict)
    #: ``auto`` picks cross-entropy for classification data, MSE for regression; also a loss
    #: class or function path (``torch.nn.HuberLoss``) or ``{class_path, init_args}``.
    loss: str | dict = "auto"

    def __post_init__(self) -> None:
        check_loss_spec(self.loss)


@dataclass
class OptimizerConfig:
    """``optimizer:`` a ``torch.optim`` optimizer by name and its settings, or any optimizer by
    ``class_path`` and ``init_args`` (Lightning's convention; then name, lr, weight_decay and
    momentum are not used: put them in ``init_args``)."""

    name: Literal["adam", "adamw", "sgd", "rmsprop"] | None = "adam"
    lr: float = positive(1e-3)
    weight_decay: float = nonneg(0.0)
    momentum: float = nonneg(0.0)
    class_path: str | None = None
    init_args: dict = field(default_factory=dict)


@dataclass
class LRSchedulerConfig:
    """``lr_scheduler:`` a learning-rate scheduler by ``class_path`` and ``init_args``, with
    Lightning's ``interval`` (``epoch`` or ``step``), ``frequency`` and ``monitor`` (the metric
    a ``ReduceLROnPlateau`` watches)."""

    class_path: str | None = None
    init_args: dict = field(default_factory=dict)
    interval: Literal["epoch", "step"] = "epoch"
    frequency: int = positive(1)
    monitor: str | None = "val_loss"


def _check_open_sections(raw: Mapping[str, Any], optimizer: OptimizerConfig) -> LRSchedulerConfig | None:
    """``optimizer.class_path`` with a shorthand key beside it, and the ``lr_scheduler`` section."""
    given = _to_plain(raw.get("optimizer")) or {}
    if optimizer.class_path:
        for key in ("name", "lr", "weight_decay", "momentum"):
            if isinstance(given, Mapping) and key in given:
                raise ConfigError(f"optimizer.{key}: with optimizer.class_path, put {key} in optimizer.init_args "
                                  f"(Lightning's convention), e.g. optimizer.init_args.{key}={given[key]}.")
        optimizer.name = None
    elif optimizer.name is None:
        raise ConfigError("optimizer: set optimizer.name (adam, adamw, sgd, rmsprop) or optimizer.class_path.")
    if raw.get("lr_scheduler") is None:
        return None
    sched = validate_dataclass(LRSchedulerConfig, raw.get("lr_scheduler"), "lr_scheduler")
    if not sched.class_path:
        raise ConfigError("lr_scheduler.class_path: missing; give a scheduler such as "
                          "torch.optim.lr_scheduler.CosineAnnealingLR and its init_args, or remove lr_scheduler.")
    return sched


@dataclass
class CalibrationConfig:
    """``uncertainty.calibration:`` post-hoc temperature scaling on held-out training data."""

    enabled: bool = False
    #: Share of the training split held out for fitting the temperature (never validation data);
    #: a data module with a ``calibration_dataloader()`` method provides its own split instead.
    fraction: float = field(default=0.1, metadata={"range": (0.0, 1.0, "(0, 1)", "exclusive")})


@dataclass
class OODConfig:
    """``uncertainty.ood:`` an out-of-distribution set scored against the validation set."""

    #: ``heldout_classes``: train and validate on ``in_classes`` only (default: the first half,
    #: digits 0-4), the validation inputs of the other classes are the OOD set.
    protocol: Literal["heldout_classes"] | None = None
    in_classes: list[int] | None = None
    #: Or any LightningDataModule whose ``val_dataloader()`` yields the OOD inputs.
    class_path: str | None = None
    init_args: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.protocol is not None and self.class_path is not None:
            raise ConfigError("uncertainty.ood: set only one of protocol (heldout_classes) or class_path "
                              "(a data module whose val_dataloader() yields the OOD inputs).")
        if not self.enabled and (self.in_classes is not None or self.init_args):
            raise ConfigError("uncertainty.ood: in_classes / init_args given without protocol or class_path; "
                              "set protocol: heldout_classes or class_path: pkg.DataModule.")

    @property
    def enabled(self) -> bool:
        """Whether an OOD set is configured."""
        return self.protocol is not None or self.class_path is not None


@dataclass
class UncertaintyConfig:
    """``uncertainty:`` Monte Carlo dropout at validation time."""

    enabled: bool = True
    samples: int = 30
    every_n_epochs: int = positive(1)
    strategy: Literal["auto", "loop", "batched"] = "auto"
    max_batches: int | None = None
    #: None: mutual information for classification, variance for regression.
    score: Literal["mutual_information", "entropy", "variation_ratio", "variance"] | None = None
    #: Refer samples whose score exceeds this to a human; None refers the top ``refer_fraction``.
    threshold: float | None = None
    refer_fraction: float = field(default=0.1, metadata={"range": (0.0, 1.0, "[0, 1)")})
    budget_mb: float = positive(256.0)
    #: Regression with the mse loss: the noise precision τ (aleatoric variance 1/τ). Null leaves
    #: the aleatoric term out; `model.loss: gaussian_nll` makes the model predict it instead.
    tau: float | None = positive(None)
    plots: bool = True
    #: Dense outputs ([B, C, H, W], [B, L, V]): targets equal to this count in no metric.
    ignore_index: int | None = None
    #: Draw the plots of every N-th sampled validation; null: only of the last one (cheaper).
    plot_every: int | None = positive(None)
    seed: int = 1234
    calibration: CalibrationConfig = field(default_factory=CalibrationConfig)
    #: Off unless ``protocol`` or ``class_path`` is set (null or an empty section: off).
    ood: OODConfig = field(default_factory=OODConfig)


@dataclass
class RunConfig:
    """``run:`` where run directories go, how often to checkpoint, and what a NaN loss does."""

    dir: str = "runs"
    name: str | None = None
    #: Also rewrite ``checkpoints/last.ckpt`` every N training steps (0: only at epoch ends), so
    #: a killed run loses at most N steps. ``last.ckpt`` is always written on SIGTERM too.
    checkpoint_every_n_steps: int = nonneg(0)
    #: A NaN or infinite training loss: ``stop`` the run (naming the step and the last good
    #: checkpoint), ``skip`` that batch, or ``ignore`` it and train on.
    on_nan: Literal["stop", "skip", "ignore"] = "stop"


TOP_LEVEL = ("seed", "data", "model", "optimizer", "lr_scheduler", "regularizers", "uncertainty", "trainer", "run")

TRAINER_DEFAULTS: dict[str, Any] = {
    "max_epochs": 20,
    "accelerator": "cpu",
    "devices": 1,
    "log_every_n_steps": 10,
    "enable_progress_bar": True,
}


@dataclass
class Config:
    """The validated, fully resolved configuration of a run."""

    seed: int
    data: DataConfig
    model: ModelConfig
    optimizer: OptimizerConfig
    regularizers: dict
    uncertainty: UncertaintyConfig
    trainer: dict
    run: RunConfig
    source: str | None = None
    lr_scheduler: LRSchedulerConfig | None = None

    def to_dict(self) -> dict:
        out = {name: _as_plain(getattr(self, name)) for name in TOP_LEVEL}
        return out

    def to_yaml(self) -> str:
        return OmegaConf.to_yaml(OmegaConf.create(self.to_dict()))


def _as_plain(value: Any) -> Any:
    if dataclasses.is_dataclass(value):
        return dataclasses.asdict(value)
    if isinstance(value, dict):
        return {k: _as_plain(v) for k, v in value.items()}
    return value


def _check_trainer(section: Mapping[str, Any]) -> dict:
    from regfw.trainer_args import TRAINER_ARGUMENTS  # Lightning's Trainer arguments, without importing it

    known = list(TRAINER_ARGUMENTS)
    for name in section:
        if name not in known:
            raise ConfigError(
                f"trainer.{name}: unknown key; the trainer section takes the arguments of "
                f"pytorch_lightning.Trainer.{closest_hint(str(name), known)}"
            )
    return {**TRAINER_DEFAULTS, **section}


def parse_overrides(overrides: Sequence[str]) -> DictConfig:
    """``key=value`` overrides as a config; a malformed one is a :class:`ConfigError`."""
    for item in overrides:
        if "=" not in item or item.startswith("="):
            raise ConfigError(
                f"override {item!r}: expected KEY=VALUE with a dotted key, e.g. trainer.max_epochs=3"
            )
    try:
        return OmegaConf.from_dotlist(list(overrides))
    except OmegaConfBaseException as exc:
        raise ConfigError(f"overrides {list(overrides)}: {exc}") from None


def load_raw(path: str | Path | None, overrides: Sequence[str] = ()) -> dict:
    """The YAML file merged with ``overrides``, as plain containers, not yet validated."""
    base = OmegaConf.create()
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {str(path)!r} does not exist. Create one with `regfw init {path}`.")
        try:
            base = OmegaConf.load(path)
        except Exception as exc:  # noqa: BLE001 - YAML errors come in many types
            raise ConfigError(f"config file {str(path)!r} is not valid YAML: {exc}") from None
        if not isinstance(base, DictConfig):
            raise ConfigError(f"config file {str(path)!r}: expected a mapping of sections at the top level.")
    try:
        merged = OmegaConf.merge(base, parse_overrides(overrides))
        return OmegaConf.to_container(merged, resolve=True)  # type: ignore[return-value]
    except OmegaConfBaseException as exc:
        raise ConfigError(f"config {str(path)!r}: {exc}") from None


def validate(raw: Mapping[str, Any], source: str | None = None, *, check_plugins: bool = True) -> Config:
    """A :class:`Config` from plain containers; raises :class:`ConfigError` naming the key."""
    for name in raw:
        if name not in TOP_LEVEL:
            raise ConfigError(
                f"{name}: unknown top-level section. Known sections: {', '.join(TOP_LEVEL)}."
                f"{closest_hint(str(name), TOP_LEVEL)}"
            )
    seed = raw.get("seed", 0)
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise ConfigError(f"seed: got {seed!r}, expected a whole number such as 0.")
    data = validate_dataclass(DataConfig, raw.get("data"), "data")
    model = validate_dataclass(ModelConfig, raw.get("model"), "model")
    for section, obj in (("data", data), ("model", model)):
        if obj.class_path:
            obj.name = None
        elif obj.name is None:
            raise ConfigError(f"{section}: set either {section}.name (a built-in) or {section}.class_path.")
    if data.class_path:  # only the keys set reach a data module of one's own (and are recorded)
        given = _to_plain(raw.get("data")) or {}
        for key in DATA_KEYS:
            if key not in given:
                setattr(data, key, None)
    regs = _to_plain(raw.get("regularizers")) or {}
    if not isinstance(regs, Mapping):
        raise ConfigError(f"regularizers: got {regs!r}, expected a mapping of regularizer names to settings.")
    trainer = _to_plain(raw.get("trainer")) or {}
    if not isinstance(trainer, Mapping):
        raise ConfigError(f"trainer: got {trainer!r}, expected a mapping of Trainer arguments.")
    cfg = Config(
        seed=seed,
        data=data,
        model=model,
        optimizer=validate_dataclass(OptimizerConfig, raw.get("optimizer"), "optimizer"),
        regularizers={},
        uncertainty=validate_dataclass(UncertaintyConfig, raw.get("uncertainty"), "uncertainty"),
        trainer=_check_trainer(trainer),
        run=validate_dataclass(RunConfig, raw.get("run"), "run"),
        source=source,
    )
    cfg.lr_scheduler = _check_open_sections(raw, cfg.optimizer)
    if cfg.uncertainty.samples < 2:
        raise ConfigError(f"uncertainty.samples: got {cfg.uncertainty.samples}, expected at least 2 Monte Carlo samples.")
    if check_plugins:
        from regfw.registry import build_regularizers

        built = build_regularizers(regs)
        cfg.regularizers = {r.name: dataclasses.asdict(r.config) for r in built}
        for reg in built:
            reg.check(cfg)
    else:
        cfg.regularizers = dict(regs)
    return cfg


def load_config(path: str | Path | None = None, overrides: Sequence[str] = ()) -> Config:
    """Load, merge and validate a config file; the entry point the CLI and users call."""
    return validate(load_raw(path, overrides), source=str(path) if path else None)
