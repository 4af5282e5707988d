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

import yaml  # type: ignore[import-untyped]  # PyYAML ships no type hints
from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import GrammarParseError, OmegaConfBaseException

# The field helpers and section validation live in regfw.config.validation (regfw.registry.regularizers uses them
# too); regfw.config.schema is their public home, so they are re-exported here.
from regfw.config.trainer import check_trainer_values
from regfw.config.trainer_args import TRAINER_ARGUMENTS  # Lightning's Trainer arguments, without importing it
from regfw.config.validation import _to_plain, validate_dataclass
from regfw.config.validation import check_finite as check_finite
from regfw.config.validation import nonneg as nonneg
from regfw.config.validation import positive as positive
from regfw.config.validation import rate as rate
from regfw.config.yaml_limits import (
    MAX_BYTES,
    MAX_KEY_CHARS,
    YamlShape,
    check_interpolations,
    check_yaml,
    read_config_text,
    too_large,
)
from regfw.errors import ConfigError, closest_hint, short_repr
from regfw.train.losses import check_loss_spec

# -- the top-level schema -------------------------------------------------------------------------


@dataclass
class DataConfig:
    """``data:`` a built-in dataset by ``name`` or a LightningDataModule by ``class_path``."""

    #: A built-in data set: ``digits`` (scikit-learn's 8x8 digits, classification) or ``diabetes``
    #: (regression); null when ``class_path`` is set.
    name: Literal["digits", "diabetes"] | None = "digits"
    #: Your own LightningDataModule (``mypkg.data.MyDataModule``) instead of a built-in; the data keys
    #: set in the config are passed to its constructor.
    class_path: str | None = None
    #: Keyword arguments of the data module's constructor.
    init_args: dict = field(default_factory=dict)
    #: Examples per training batch.
    batch_size: int = positive(64)
    #: Share of the data held out for validation (built-in data sets).
    val_fraction: float = field(default=0.25, metadata={"range": (0.0, 1.0, "(0, 1)", "exclusive")})
    #: Use only this fraction of the training split (smaller data overfits more).
    train_fraction: float = field(default=1.0, metadata={"range": (0.0, 1.0000001, "(0, 1]", "exclusive")})
    #: DataLoader worker processes (0: load in the training process).
    num_workers: int = nonneg(0)
    #: Where inputs and targets sit in a batch: ``{inputs: 0, targets: 1}`` (tuple batches, the
    #: default) or dict keys, ``{inputs: image, targets: label}``; used by the module, MC
    #: dropout, evaluation, active learning and predict (see :mod:`regfw.train.batch`).
    batch: dict | None = None

    def __post_init__(self) -> None:
        if self.batch is not None:
            from regfw.train.batch import BatchFormat

            self.batch = BatchFormat.coerce(self.batch, "data.batch").as_dict()


#: The ``data:`` keys that are data-module constructor arguments (see :mod:`regfw.build.datasets`).
DATA_KEYS = ("batch_size", "val_fraction", "train_fraction", "num_workers")


@dataclass
class ModelConfig:
    """``model:`` a built-in model by ``name`` or an ``nn.Module`` by ``class_path``."""

    #: A built-in model: ``mlp``, ``cnn`` or ``lstm``, sized to the data; null when ``class_path`` is set.
    name: Literal["mlp", "cnn", "lstm"] | None = "mlp"
    #: Your own ``nn.Module`` class, or a function returning one (``mypkg.models.Net``).
    class_path: str | None = None
    #: Keyword arguments of the model's constructor (the mlp's ``hidden: [256, 128]``, ...).
    init_args: dict = field(default_factory=dict)
    #: ``auto`` picks cross-entropy for classification data, MSE for regression; also a loss
    #: class or function path (``torch.nn.HuberLoss``) or ``{class_path, init_args}``.
    loss: str | dict = "auto"
    #: Which tensor of the model's output the loss and Monte Carlo dropout read, for a model that
    #: returns several (a Hugging Face ``ModelOutput``, a dict, a tuple): a key or attribute name.
    #: Null: the output itself when it is a tensor, else its ``logits``, else its lone tensor.
    output_key: str | None = None

    def __post_init__(self) -> None:
        check_loss_spec(self.loss)


@dataclass
class OptimizerConfig:
    """``optimizer:`` a ``torch.optim`` optimizer by name and its settings, or any optimizer by
    ``class_path`` and ``init_args`` (Lightning's convention; then name, lr, weight_decay and
    momentum are not used: put them in ``init_args``)."""

    #: A ``torch.optim`` optimizer by its short name; null when ``class_path`` is set.
    name: Literal["adam", "adamw", "sgd", "rmsprop"] | None = "adam"
    #: The learning rate.
    lr: float = positive(1e-3)
    #: The optimizer's own weight decay, on every parameter; the ``weight_decay`` regularizer leaves
    #: biases and norms out. Setting both is an error.
    weight_decay: float = nonneg(0.0)
    #: Momentum of ``sgd`` and ``rmsprop`` (adam's betas play that part).
    momentum: float = nonneg(0.0)
    #: Any optimizer class (``torch.optim.AdamW``; a bare name is looked up in ``torch.optim``); it gets
    #: the regularizers' parameter groups.
    class_path: str | None = None
    #: The optimizer's keyword arguments with ``class_path`` (``lr`` and the others go here then).
    init_args: dict = field(default_factory=dict)


@dataclass
class LRSchedulerConfig:
    """``lr_scheduler:`` a learning-rate scheduler by ``class_path`` and ``init_args``, with
    Lightning's ``interval`` (``epoch`` or ``step``), ``frequency`` and ``monitor`` (the metric
    a ``ReduceLROnPlateau`` watches)."""

    #: A learning-rate scheduler class (``torch.optim.lr_scheduler.CosineAnnealingLR``; a bare name is
    #: looked up there).
    class_path: str | None = None
    #: The scheduler's keyword arguments (``T_max: 20``).
    init_args: dict = field(default_factory=dict)
    #: Step the scheduler every ``epoch`` or every optimizer ``step``.
    interval: Literal["epoch", "step"] = "epoch"
    #: Step it every N intervals.
    frequency: int = positive(1)
    #: The metric a ``ReduceLROnPlateau`` scheduler watches.
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

    #: Fit the temperatures before each sampled validation.
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
    #: The classes trained and validated on with ``heldout_classes`` (null: the first half).
    in_classes: list[int] | None = None
    #: Or any LightningDataModule whose ``val_dataloader()`` yields the OOD inputs.
    class_path: str | None = None
    #: Keyword arguments of the OOD data module (``class_path``).
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
    """``uncertainty:`` Monte Carlo dropout at validation time (and at test time: ``regfw test``)."""

    #: Sample MC dropout at validation; needs a dropout-family regularizer or a model with dropout.
    enabled: bool = True
    #: Monte Carlo samples T per input (2 to 10,000; 30 is typical).
    samples: int = 30
    #: Sample at every N-th validation epoch.
    every_n_epochs: int = positive(1)
    #: How the T samples run: ``loop`` (T passes), ``batched`` (the batch repeated T times) or ``auto``
    #: (what precedes the first stochastic layer computed once, the rest replayed T times).
    strategy: Literal["auto", "loop", "batched"] = "auto"
    #: Which of the model's own stochastic layers (stochastic depth, attention dropout, its own dropout)
    #: MC dropout samples: ``auto`` those of a kind a selected regularizer places, ``all``, or ``none``
    #: (regfw/uncertainty/own_layers.py); `regfw plan` and the callback list them.
    sample_model_stochastic: Literal["auto", "all", "none"] = "auto"
    #: Sample at most this many validation batches (null: all).
    max_batches: int | None = None
    #: None: mutual information for classification, variance for regression.
    score: Literal["mutual_information", "entropy", "variation_ratio", "variance"] | None = None
    #: Refer samples whose score exceeds this to a human; None refers the top ``refer_fraction``.
    threshold: float | None = None
    #: Without a threshold, the share of inputs referred to a human: the most uncertain ones.
    refer_fraction: float = field(default=0.1, metadata={"range": (0.0, 1.0, "[0, 1)")})
    #: Memory for one batched pass, in MiB; larger work is done in chunks that fit.
    budget_mb: float = positive(256.0)
    #: Regression with the mse loss: the noise precision τ (aleatoric variance 1/τ), in the units the
    #: metrics are reported in (`units`: the original targets' by default, as papers state τ). Null
    #: leaves the aleatoric term out; `model.loss: gaussian_nll` makes the model predict it instead.
    tau: float | None = positive(None)
    #: Draw the figures of the sampled validations (see ``plot_every``).
    plots: bool = True
    #: Dense outputs ([B, C, H, W], [B, L, V]): targets equal to this count in no metric.
    ignore_index: int | None = None
    #: Draw the plots of every N-th sampled validation; null: only of the last one (cheaper).
    plot_every: int | None = positive(None)
    #: The figures' file format, ``svg`` or ``png`` (both drawn by matplotlib, about 0.25 s of CPU each).
    plot_format: Literal["svg", "png"] = "svg"
    #: The seed of MC dropout's own random stream (the training's draws are left untouched).
    seed: int = 1234
    #: Regression: report the MC metrics in the data's ``original`` units (undoing the target
    #: scaling the data module declares as ``target_scaling``; see regfw/train/targets.py) or in the
    #: ``standardized`` units the model predicts. The same when the data declares no scaling.
    units: Literal["original", "standardized"] = "original"
    #: Where the MC metrics' targets come from: ``batch`` (the targets of each ``(inputs, targets)``
    #: batch) or ``input`` (the inputs themselves: autoencoders and other reconstructions).
    target: Literal["batch", "input"] = "batch"
    calibration: CalibrationConfig = field(default_factory=CalibrationConfig)
    #: Off unless ``protocol`` or ``class_path`` is set (null or an empty section: off).
    ood: OODConfig = field(default_factory=OODConfig)


@dataclass
class RunConfig:
    """``run:`` where run directories go, how often to checkpoint, and what a NaN loss does."""

    #: The folder run directories are made in (``runs/<name>-<time>/``).
    dir: str = "runs"
    #: The run directory's name before its time stamp (null: the config file's name).
    name: str | None = None
    #: Also rewrite ``checkpoints/last.ckpt`` every N training steps (0: only at epoch ends), so
    #: a killed run loses at most N steps. ``last.ckpt`` is always written on SIGTERM too.
    checkpoint_every_n_steps: int = nonneg(0)
    #: A NaN or infinite training loss: ``stop`` the run (naming the step and the last good
    #: checkpoint), ``skip`` that batch, or ``ignore`` it and train on.
    on_nan: Literal["stop", "skip", "ignore"] = "stop"


TOP_LEVEL = ("seed", "data", "model", "optimizer", "lr_scheduler", "regularizers", "uncertainty", "trainer", "run")

#: The ``trainer:`` settings regfw fills in. The console ones (``enable_progress_bar``,
#: ``enable_model_summary``, ``log_every_n_steps``) are decided at run time when left out:
#: see :mod:`regfw.run.console`.
TRAINER_DEFAULTS: dict[str, Any] = {
    "max_epochs": 20,
    "accelerator": "cpu",
    "devices": 1,
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
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return dataclasses.asdict(value)
    if isinstance(value, dict):
        return {k: _as_plain(v) for k, v in value.items()}
    return value


def _check_trainer(section: Mapping[str, Any]) -> dict:
    known = list(TRAINER_ARGUMENTS)
    for name in section:
        if name not in known:
            raise ConfigError(
                f"trainer.{name}: unknown key; the trainer section takes the arguments of "
                f"pytorch_lightning.Trainer.{closest_hint(str(name), known)}"
            )
    merged = {**TRAINER_DEFAULTS, **section}
    check_trainer_values(merged)
    return merged


def parse_overrides(overrides: Sequence[str]) -> DictConfig:
    """``key=value`` overrides as a config; a malformed one is a :class:`ConfigError`.

    Each value is YAML, measured by :func:`regfw.config.yaml_limits.check_yaml` (size, depth, aliases)
    before OmegaConf parses it."""
    for item in overrides:
        if "=" not in item or item.startswith("="):
            raise ConfigError(
                f"override {short_repr(item)}: expected KEY=VALUE with a dotted key, e.g. trainer.max_epochs=3"
            )
    for item in overrides:
        key, value = item.split("=", 1)
        shown = short_repr(item)
        if len(item.encode("utf-8", "surrogatepass")) > MAX_BYTES:
            raise too_large(f"override {short_repr(item, 40)}", len(item.encode("utf-8", "surrogatepass")))
        if len(key) > MAX_KEY_CHARS:
            raise ConfigError(f"override {short_repr(item, 60)}: a key of {len(key)} characters, more than the "
                              f"{MAX_KEY_CHARS} a config key may have; write a dotted key such as "
                              f"trainer.max_epochs=3.")
        if any(not part.strip() for part in key.split(".")):
            raise ConfigError(f"override {shown}: the key {short_repr(key)} has an empty part; write a dotted key "
                              f"such as trainer.max_epochs=3.")
        try:
            check_yaml(value, f"override {shown}")
            OmegaConf.from_dotlist([item])
        except ConfigError:
            raise
        except OmegaConfBaseException as exc:
            raise ConfigError(f"override {shown}: {_omegaconf_problem(exc, value)}", key=key) from None
        except Exception as exc:  # noqa: BLE001 - YAML errors come in many types
            quoted = f"{key}=\"'{short_repr(value, 60, text=True)}'\""
            raise ConfigError(f"override {shown}: the value {short_repr(value)} is not valid "
                              f"YAML{_yaml_problem(exc, value)} Quote it, e.g. {quoted}, or fix the brackets.",
                              key=key) from None
    try:
        return OmegaConf.from_dotlist(list(overrides))
    except OmegaConfBaseException as exc:
        raise ConfigError(f"overrides {short_repr(list(overrides))}: {_omegaconf_problem(exc)}") from None


def _omegaconf_problem(exc: OmegaConfBaseException, value: str | None = None) -> str:
    """OmegaConf's message without its ``full_key:`` / ``object_type=`` footer, on one line; an
    interpolation its grammar rejects gets the form it expects."""
    lines = [line for line in str(exc).splitlines()
             if not line.strip().startswith(("full_key:", "object_type=", "reference_type=", "child_key:"))]
    text = " ".join(" ".join(lines).split()).rstrip(".")
    if isinstance(exc, GrammarParseError):
        shown = f" {short_repr(value)}" if value is not None else ""
        return (f"the interpolation{shown} is malformed ({text}); write ${{section.key}}, e.g. ${{optimizer.lr}}, "
                f"or a resolver such as ${{oc.env:NAME}}, or escape a literal dollar as \\${{...}}.")
    return f"{text}."


def _document(text: str, source: str) -> tuple[DictConfig, dict[str, int]]:
    """The YAML ``text`` of ``source`` as a config and the line of each key, once
    :func:`~regfw.config.yaml_limits.check_yaml` has measured it."""
    shape = YamlShape()
    try:
        shape = check_yaml(text, source)
        if shape.top == "other":
            raise ConfigError(f"{source}: expected a mapping of sections at the top level (such as "
                              f"regularizers: and trainer:).")
        made = OmegaConf.create(text) if shape.top == "mapping" else OmegaConf.create()
    except ConfigError:
        raise
    except OmegaConfBaseException as exc:
        key = getattr(exc, "full_key", None) or None
        line = f", line {shape.lines[key]}" if key in shape.lines else ""
        value = _raw_value(text, shape.lines.get(key)) if key else None
        raise ConfigError(f"{source}{line}: {key + ': ' if key else ''}{_omegaconf_problem(exc, value)}",
                          key=key) from None
    except Exception as exc:  # noqa: BLE001 - YAML errors come in many types
        raise ConfigError(f"{source} is not valid YAML{_yaml_problem(exc, text)}") from None
    if not isinstance(made, DictConfig):
        raise ConfigError(f"{source}: expected a mapping of sections at the top level.")
    return made, shape.lines


def _raw_value(text: str, line: int | None) -> str | None:
    """The value written on ``line`` (1-based) of ``text`` after its key's colon, for messages."""
    if line is None:
        return None
    rows = text.splitlines()
    if not 0 < line <= len(rows):
        return None
    _, sep, value = rows[line - 1].partition(":")
    return value.strip() if sep else None


def load_raw(path: str | Path | None, overrides: Sequence[str] = ()) -> dict:
    """The YAML file merged with ``overrides``, as plain containers, not yet validated.

    The file and every override value are measured first (:mod:`regfw.config.yaml_limits`): a file
    too large, too deep or with aliases that would expand past the limits is refused before
    OmegaConf reads it."""
    base: DictConfig | ListConfig = OmegaConf.create()
    lines: dict[str, int] = {}
    if path is not None:
        path = Path(path)
        _check_config_file(path)
        text = read_config_text(path)
        if not text.strip():
            raise ConfigError(f"config file {str(path)!r} is empty; write one with `regfw init {path} --force`, or "
                              f"put at least a regularizers: section in it.")
        base, lines = _document(text, f"config file {str(path)!r}")
    parsed = parse_overrides(overrides)
    for item in overrides:  # name the override that cannot be merged (a mapping replaced by a list ...)
        try:
            OmegaConf.merge(base, OmegaConf.from_dotlist([item]))
        except OmegaConfBaseException as exc:
            key = item.split("=", 1)[0]
            raise ConfigError(f"override {short_repr(item)}: {' '.join(str(exc).splitlines()[0].split())}: {key} is "
                              f"{_shape_of(OmegaConf.select(base, key))} in config {str(path)!r}; give it the same "
                              f"shape, e.g. {key}.SETTING=VALUE.", key=key) from None
    try:
        merged = OmegaConf.merge(base, parsed)
        check_interpolations(OmegaConf.to_container(merged, resolve=False), f"config {str(path)!r}", lines)
        return OmegaConf.to_container(merged, resolve=True)  # type: ignore[return-value]
    except OmegaConfBaseException as exc:
        full_key: str | None = getattr(exc, "full_key", None) or None
        line = f", line {lines[full_key]}" if full_key in lines else ""
        raise ConfigError(f"config {str(path)!r}{line}: {full_key + ': ' if full_key else ''}"
                          f"{_omegaconf_problem(exc).rstrip('.')}. Check the ${{...}} interpolations and the "
                          f"overrides.", key=full_key) from None


def _shape_of(value: Any) -> str:
    if isinstance(value, DictConfig):
        return "a mapping"
    if isinstance(value, ListConfig):
        return "a list"
    return "a single value" if value is not None else "not set"


def _check_config_file(path: Path) -> None:
    """A :class:`ConfigError` unless ``path`` is a regular file (its size and text are
    :func:`~regfw.config.yaml_limits.read_config_text`'s to check)."""
    if not path.exists():
        raise ConfigError(f"config file {str(path)!r} does not exist. Create one with `regfw init {path}`.")
    if path.is_dir():
        raise ConfigError(f"config file {str(path)!r} is a directory; pass a YAML file (e.g. {path}/config.yaml).")
    if not path.is_file():
        raise ConfigError(f"config file {str(path)!r} is not a regular file (a FIFO, socket or device); pass a "
                          f"YAML file.")


def _yaml_problem(exc: Exception, text: str | None = None) -> str:
    """`` at line L, column C: problem`` of a YAML error, on one line. A reader error (a character
    YAML does not allow) carries an offset into ``text`` instead of a line."""
    mark = getattr(exc, "problem_mark", None) or getattr(exc, "context_mark", None)
    if isinstance(exc, yaml.reader.ReaderError):
        before = (text or "")[: exc.position]
        where = (f" at line {before.count(chr(10)) + 1}, column {len(before) - before.rfind(chr(10))}"
                 if text is not None else f" at character {exc.position}")
        char = exc.character if isinstance(exc.character, str) else chr(exc.character)
        return f"{where}: the character {char!r} (#x{ord(char):04x}) is not allowed ({exc.reason}); remove it."
    lines = str(exc).strip().splitlines()
    problem = getattr(exc, "problem", None) or (lines[0] if lines else type(exc).__name__)
    where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
    return f"{where}: {' '.join(str(problem).split())}."


def validate(raw: Mapping[str, Any], source: str | None = None, *, check_plugins: bool = True) -> Config:
    """A :class:`Config` from plain containers; raises :class:`ConfigError` naming the key."""
    for name in raw:
        if name not in TOP_LEVEL:
            raise ConfigError(
                f"{name}: unknown top-level section{f' in config {source!r}' if source else ''}. Known sections: "
                f"{', '.join(TOP_LEVEL)}."
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
    check_values(cfg)
    if check_plugins:  # the plugins' settings classes import torch: after every torch-free check above
        from regfw.registry.regularizers import build_regularizers, resolve_section

        cfg.regularizers = resolve_section(regs)
        build_regularizers(cfg.regularizers, config=cfg)  # each one's check(config); the objects are not kept
    else:
        cfg.regularizers = dict(regs)
    return cfg


#: The most Monte Carlo samples per input (estimates settle long before; more only costs time).
MAX_SAMPLES = 10_000
#: Seeds ``pytorch_lightning.seed_everything`` accepts.
SEED_RANGE = (0, 2**32 - 1)
#: The largest float32: a learning rate above it overflows in the first update.
FLOAT32_MAX = 3.4028234663852886e38
#: Optimizers that take a ``momentum`` setting.
MOMENTUM_OPTIMIZERS = ("sgd", "rmsprop")


def check_values(cfg: Config) -> None:
    """Values that pass their type but cannot work together or at all; each a :class:`ConfigError`."""
    low, high = SEED_RANGE
    if not low <= cfg.seed <= high:
        raise ConfigError(f"seed: got {cfg.seed}, expected a whole number from {low} to {high} (2**32 - 1).",
                          key="seed")
    unc = cfg.uncertainty
    if not 2 <= unc.samples <= MAX_SAMPLES:
        raise ConfigError(f"uncertainty.samples: got {unc.samples}, expected at least 2 and at most {MAX_SAMPLES} "
                          f"Monte Carlo samples (30 is typical).", key="uncertainty.samples")
    if unc.threshold is not None and unc.threshold < 0:
        raise ConfigError(f"uncertainty.threshold: got {unc.threshold}, expected a score >= 0 (null refers the top "
                          f"uncertainty.refer_fraction).", key="uncertainty.threshold")
    if unc.max_batches is not None and unc.max_batches < 1:
        raise ConfigError(f"uncertainty.max_batches: got {unc.max_batches}, expected a number of batches >= 1 or "
                          f"null (all).", key="uncertainty.max_batches")
    name = cfg.run.name
    if name is not None and (not name.strip() or any(c in name for c in "/\\") or name in (".", "..")):
        raise ConfigError(f"run.name: got {name!r}, expected a plain name without path separators (run directories "
                          f"go under run.dir; set run.dir to choose where).", key="run.name")
    if not str(cfg.run.dir).strip():
        raise ConfigError("run.dir: got '', expected a directory such as runs.", key="run.dir")
    opt = cfg.optimizer
    if opt.momentum and opt.name not in MOMENTUM_OPTIMIZERS:
        raise ConfigError(f"optimizer.momentum: got {opt.momentum} with optimizer.name {opt.name!r}, which takes no "
                          f"momentum (only {', '.join(MOMENTUM_OPTIMIZERS)} do; adam's betas play that part). Remove "
                          f"optimizer.momentum or choose sgd.", key="optimizer.momentum")
    if opt.lr > FLOAT32_MAX:  # not even representable in the parameters' dtype: the first step overflows
        raise ConfigError(f"optimizer.lr: got {opt.lr}, expected a learning rate a float32 can hold (typical: 1e-4 "
                          f"to 0.1).", key="optimizer.lr")
    hidden = cfg.model.init_args.get("hidden") if cfg.model.name else None
    widths = hidden if isinstance(hidden, (list, tuple)) else [hidden] if hidden is not None else []
    for i, width in enumerate(widths):
        if not isinstance(width, int) or isinstance(width, bool) or width < 1:
            where = f"model.init_args.hidden[{i}]" if isinstance(hidden, (list, tuple)) else "model.init_args.hidden"
            raise ConfigError(f"{where}: got {width!r}, expected a layer width >= 1 (a whole number).", key=where)


def load_config(path: str | Path | None = None, overrides: Sequence[str] = ()) -> Config:
    """Load, merge and validate a config file; the entry point the CLI and users call."""
    return validate(load_raw(path, overrides), source=str(path) if path else None)
