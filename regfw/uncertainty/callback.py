"""Monte Carlo dropout uncertainty at validation and test time, as a Lightning callback.

:class:`MCDropoutUncertainty` samples each selected validation batch right after the model's own
``validation_step`` has seen it (``on_validation_batch_end``), while the batch is still on the
device, and accumulates the metrics in :mod:`torchmetrics` states; at
``on_validation_epoch_end`` it computes them (synchronised across processes), logs them and
draws the plots. Nothing of the normal validation changes: modes are restored after sampling,
BatchNorm stays in eval, and the masks come from a forked, separately seeded random stream, so
a fit with the callback ends with bit-identical weights to a fit without it.

With ``calibrate=True`` a temperature is fitted (:mod:`regfw.uncertainty.calibration`) on a
held-out calibration loader at the start of each sampled validation, for the MC predictive and
for the deterministic one; the metrics before and after are logged as ``cal/...``, and the
temperature is kept in the callback state and in the checkpoint (``regfw_calibration``), where
``regfw rank`` reads it. With ``ood_loader`` the out-of-distribution scores of
:mod:`regfw.uncertainty.ood` are logged as ``ood/...``. Selective-prediction metrics
(:mod:`regfw.uncertainty.selective`) join the ``mc/...`` ones. Plots are drawn with matplotlib on a
background thread (:mod:`regfw.uncertainty.figures.jobs`), so the training loop does not wait for them.

``Trainer.test`` runs the same metrics on every test batch (``on_test_batch_end``) and logs them
under ``test/`` (``test/mc/rmse``, ``test/mc/acc``, ``test/cal/...``); the validation-time
economies ``every_n_epochs``, ``max_batches`` and ``subset`` do not apply there, and no plots are
drawn. Regression metrics are reported in the original units of the targets when the data module
declares its target scaling (:mod:`regfw.train.targets`, ``units="original"``, the default).
"""
from __future__ import annotations

import math
import os
from collections.abc import Callable, Iterable, Sequence
from typing import TYPE_CHECKING, Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.utilities import rank_zero_warn
from torch import Tensor, nn

from regfw.errors import ConfigError, RegfwError
from regfw.model_io import OutputKey, check_output_key
from regfw.tensors import to_device
from regfw.train.batch import batch_size, split_batch
from regfw.train.targets import UNITS, TargetScaling, declared_scaling, original_units_transform
from regfw.uncertainty.accumulators import MCClassificationMetrics, MCRegressionMetrics, ProbabilityCalibration
from regfw.uncertainty.calibration import Temperature, fit_temperature
from regfw.uncertainty.figures.files import FORMATS
from regfw.uncertainty.figures.jobs import PlotQueue, draw_plots, plot_data
from regfw.uncertainty.metrics import DEFAULT_BINS, DEFAULT_LEVELS
from regfw.uncertainty.modes import dropout_family, require_stochastic, stochastic_modules
from regfw.uncertainty.ood import OODScoreStore, ood_metrics, ood_scores
from regfw.uncertainty.own_layers import check_setting, listing, own_layers, plan_kinds
from regfw.uncertainty.rng import derive_seed
from regfw.uncertainty.sampling import (
    DEFAULT_BUDGET_BYTES,
    TASKS,
    OutputTransform,
    _check_samples,
    mc_predict,
)
from regfw.uncertainty.summaries import SCORES, class_softmax, classes_last, classification_summary

if TYPE_CHECKING:  # pragma: no cover
    from regfw.config.schema import UncertaintyConfig

__all__ = ["MCDropoutUncertainty", "CLASSIFICATION_SCORES", "REGRESSION_SCORES"]

CLASSIFICATION_SCORES: tuple[str, ...] = SCORES
REGRESSION_SCORES: tuple[str, ...] = ("variance", "entropy")
#: The values of ``target``: the targets of each ``(x, y)`` batch, or the inputs (reconstruction).
TARGETS: tuple[str, ...] = ("batch", "input")


def _default_xy(batch: Any) -> tuple[Any, Tensor]:
    """``(inputs, targets)`` by the one batch convention (:func:`regfw.train.batch.split_batch`): ``(x, y)``
    tuples, dicts of keyword inputs with ``labels`` (Hugging Face), ``{"inputs", "targets"}``."""
    if not isinstance(batch, Tensor):
        x, y = split_batch(batch)
        if y is not None:
            return x, y
    keys = f" with keys {', '.join(map(repr, batch))}" if isinstance(batch, dict) else ""
    raise TypeError(
        f"MCDropoutUncertainty expects (x, y) batches or dicts with a 'labels' or 'targets' key, got "
        f"{type(batch).__name__}{keys}; pass batch_to_xy=callable returning (x, y)"
    )


class MCDropoutUncertainty(pl.Callback):
    """Monte Carlo dropout uncertainty metrics and plots every ``every_n_epochs`` validations.

    Works with any LightningModule whose output (selected by ``output_key``) is logits
    (classification) or means (regression) and whose validation batches are ``(x, y)`` or dicts:
    a Hugging Face batch ``{"input_ids", "attention_mask", ..., "labels"}`` gives the module its
    keyword inputs and ``labels`` as the targets (:mod:`regfw.train.batch`), and a ``ModelOutput``'s
    ``logits`` are sampled (:mod:`regfw.model_io`), with no wrapper.

    Args:
        samples: MC samples T per input (>= 2).
        strategy: sampling strategy, see :data:`regfw.uncertainty.STRATEGIES` (``"auto"``).
        budget_bytes: activation-memory budget per sampling chunk.
        task: ``"classification"`` or ``"regression"``.
        every_n_epochs: run after every N-th training epoch (epochs N-1, 2N-1, ... 0-based).
        max_batches: sample at most this many validation batches (the first ones).
        subset: sample only the first ``ceil(subset * num_batches)`` batches, ``0 < subset <= 1``.
        score: uncertainty score for AUROC, referral and the histogram: ``"entropy"``,
            ``"mutual_information"``, ``"variation_ratio"``, ``"variance"``
            (regression: ``"variance"`` or ``"entropy"``). Default: mutual information for
            classification, variance for regression.
        threshold: refer inputs whose score exceeds it; None refers the ``refer_fraction``
            most uncertain inputs instead.
        refer_fraction: fraction referred when ``threshold`` is None.
        n_bins: ECE / reliability bins (15).
        levels: regression interval levels for ``coverage_NN``.
        tau: regression fixed noise precision (aleatoric variance ``1 / tau``), in the units the
            metrics are reported in (``units``): with a known target scaling and ``units="original"``
            it is the precision of the original targets, as papers state it (Gal & Ghahramani 2016's
            UCI tau); with ``"standardized"``, of the model's outputs.
        output_transform: see :func:`regfw.uncertainty.mc_predict`; applied after ``output_key``.
        output_key: which tensor of the module's output is sampled (a key such as ``"logits"``, a
            position, or a callable; :func:`regfw.model_io.select_output`); None: a tensor, else
            the ``logits`` entry, else the lone tensor. From a LightningCLI YAML:
            ``init_args: {output_key: logits}``.
        sample_model_stochastic: which of the model's own stochastic layers are sampled (``auto``: those of a
            kind the plan's regularizers select; ``all``; ``none``), listed at fit start; see
            :mod:`regfw.uncertainty.own_layers`.
        selected_kinds: the selected kinds for ``auto`` (default: read off the module's plan, or the layers
            regfw inserted).
        plots: write (and send to an image-capable logger) the plots each run.
        plot_dir: where ``epoch=NNN/*.svg`` go; default ``<trainer.log_dir>/plots``.
        plot_format: the figures' file format, ``"svg"`` or ``"png"`` (both drawn by matplotlib,
            about 0.25 s of CPU per figure, on the background thread; ``bench/plots.py``).
        seed: base seed of the MC masks (mixed with epoch, rank and batch index); None draws
            one at construction, kept in the checkpoint state.
        dataloader_idx: the validation dataloader to use.
        batch_to_xy: maps a batch to ``(x, y)`` when batches are not tuples.
        prefix: prefix of the logged names (``"mc/"``).
        test_prefix: prefix of the names logged by ``Trainer.test`` (default ``"test/" + prefix``;
            the ``cal/`` and ``ood/`` metrics get ``"test/"`` too).
        units: regression, ``"original"`` (the default): predictions, targets and predicted
            variances are mapped to the original units of the targets before any
            metric, when a target scaling is known (``target_scaling``, else the data module's
            ``target_scaling`` attribute; see :mod:`regfw.train.targets`); ``"standardized"``: the
            metrics are in the units the model predicts. ``threshold`` is in the reported units.
        target_scaling: how the targets were standardised, a :class:`regfw.train.targets.TargetScaling`
            or ``(mean, std)``; None reads ``trainer.datamodule.target_scaling``.
        target: ``"batch"`` (the targets of each batch, by ``batch_to_xy`` or the module's
            ``split_batch``) or ``"input"``: the model's input is its target (an autoencoder);
            batches may then be ``(x, ...)`` or ``x`` alone.
        calibrate: fit a temperature on ``calibration_loader`` before each sampled validation
            (classification); ``cal/...`` metrics compare before and after on validation.
        calibration_loader: held-out ``(x, y)`` batches, never validation or test data; None
            uses ``trainer.datamodule.calibration_dataloader()``.
        ood_loader: out-of-distribution batches (``x`` or ``(x, ...)``), scored against the
            validation set; at most ``max_batches`` of them are sampled.
        background_plots: draw and write the plots on a background thread.
        ignore_index: dense outputs (``[B, C, H, W]``, ``[B, L, V]``): positions whose target is
            this value count in no metric (padding, unlabelled pixels).
        plot_every: draw the plots of every ``plot_every``-th sampled validation; None (the
            default) draws only those of the last one (at the last epoch, or at the end of the
            fit when it stops early), since drawing costs more than sampling on small models.

    After each run, :attr:`last_metrics` holds the values (``{"mc/acc": ..., ...}``) and
    :attr:`last_plots` the written files (``{"reliability": path, ...}``).
    """

    def __init__(
        self,
        samples: int = 30,
        strategy: str = "auto",
        budget_bytes: int | None = DEFAULT_BUDGET_BYTES,
        task: str = "classification",
        every_n_epochs: int = 1,
        max_batches: int | None = None,
        subset: float | None = None,
        score: str | None = None,
        threshold: float | None = None,
        refer_fraction: float = 0.1,
        n_bins: int = DEFAULT_BINS,
        levels: Sequence[float] = DEFAULT_LEVELS,
        tau: float | None = None,
        output_transform: OutputTransform | None = None,
        plots: bool = True,
        plot_dir: str | None = None,
        seed: int | None = 0,
        dataloader_idx: int = 0,
        batch_to_xy: Callable[[Any], tuple[Tensor, Tensor]] | None = None,
        prefix: str = "mc/",
        calibrate: bool = False,
        calibration_loader: Iterable[Any] | None = None,
        ood_loader: Iterable[Any] | None = None,
        background_plots: bool = True,
        plot_every: int | None = None,
        ignore_index: int | None = None,
        plot_format: str = "svg",
        test_prefix: str | None = None,
        units: str = "original",
        target_scaling: TargetScaling | tuple[Any, Any] | None = None,
        target: str = "batch",
        output_key: OutputKey = None,
        sample_model_stochastic: str = "auto",
        selected_kinds: Iterable[str] | None = None,
    ) -> None:
        super().__init__()
        self.samples = _check_samples(samples)
        self.sample_model_stochastic = check_setting(sample_model_stochastic)
        self.selected_kinds = None if selected_kinds is None else sorted(selected_kinds)
        if task not in TASKS:
            raise ValueError(f"MCDropoutUncertainty: task must be one of {list(TASKS)}, got {task!r}")
        if isinstance(every_n_epochs, bool) or not isinstance(every_n_epochs, int) or every_n_epochs < 1:
            raise ValueError(f"MCDropoutUncertainty: every_n_epochs must be an integer >= 1, got {every_n_epochs!r}")
        if max_batches is not None and (not isinstance(max_batches, int) or max_batches < 1):
            raise ValueError(f"MCDropoutUncertainty: max_batches must be an integer >= 1 or None, got {max_batches!r}")
        if subset is not None and not 0.0 < float(subset) <= 1.0:
            raise ValueError(f"MCDropoutUncertainty: subset must be a fraction in (0, 1] or None, got {subset!r}")
        if not 0.0 <= float(refer_fraction) <= 1.0:
            raise ValueError(f"MCDropoutUncertainty: refer_fraction must be in [0, 1], got {refer_fraction!r}")
        allowed = CLASSIFICATION_SCORES if task == "classification" else REGRESSION_SCORES
        score = score or ("mutual_information" if task == "classification" else "variance")
        if score not in allowed:
            raise ValueError(
                f"MCDropoutUncertainty: score for task={task!r} must be one of {list(allowed)}, got {score!r}")
        self._assign(strategy, budget_bytes, task, every_n_epochs, max_batches, subset, score, threshold,
                     refer_fraction, n_bins, levels, tau, output_transform, plots, plot_dir, seed, dataloader_idx,
                     batch_to_xy, prefix,
                     calibrate=calibrate, calibration_loader=calibration_loader, ood_loader=ood_loader,
                     background_plots=background_plots, plot_every=plot_every, ignore_index=ignore_index,
                     plot_format=plot_format, test_prefix=test_prefix, units=units, target_scaling=target_scaling,
                     target=target, output_key=output_key)

    @classmethod
    def from_config(cls, config: UncertaintyConfig, *, task: str = "classification",
                    output_transform: OutputTransform | None = None, plot_dir: str | None = None,
                    **options: Any) -> MCDropoutUncertainty:
        """The callback for a validated ``uncertainty:`` section, passed as one object.

        ``config`` is a :class:`regfw.config.schema.UncertaintyConfig` (from :func:`regfw.config.schema.load_config`),
        whose fields were checked when it was loaded and are not checked again; only what depends
        on the model is: ``task``, and the config's ``score`` against it (a
        :class:`~regfw.errors.ConfigError` naming ``uncertainty.score``). ``options`` are the
        constructor's other keywords (``subset``, ``n_bins``, ``levels``, ``batch_to_xy``,
        ``dataloader_idx``, ``prefix``, ``test_prefix``, ``target_scaling``, ``calibrate``,
        ``calibration_loader``, ``ood_loader``, ``background_plots``); ``plot_every``,
        ``plot_format``, ``ignore_index``, ``units`` and ``target`` come from the config.
        """
        if task not in TASKS:
            raise ValueError(f"MCDropoutUncertainty: task must be one of {list(TASKS)}, got {task!r}")
        allowed = CLASSIFICATION_SCORES if task == "classification" else REGRESSION_SCORES
        score = config.score or ("mutual_information" if task == "classification" else "variance")
        if score not in allowed:
            raise ConfigError(f"uncertainty.score: got {score!r} for a {task} model, expected one of "
                              f"{', '.join(allowed)}")
        self = cls.__new__(cls)
        pl.Callback.__init__(self)
        self.samples = config.samples
        self.sample_model_stochastic = check_setting(config.sample_model_stochastic)
        self.selected_kinds = None
        self._assign(config.strategy, int(config.budget_mb * 2**20), task, config.every_n_epochs, config.max_batches,
                     options.pop("subset", None), score, config.threshold, config.refer_fraction,
                     options.pop("n_bins", DEFAULT_BINS), options.pop("levels", DEFAULT_LEVELS), config.tau,
                     output_transform, config.plots, plot_dir, config.seed, options.pop("dataloader_idx", 0),
                     options.pop("batch_to_xy", None), options.pop("prefix", "mc/"),
                     calibrate=options.pop("calibrate", False),
                     calibration_loader=options.pop("calibration_loader", None),
                     ood_loader=options.pop("ood_loader", None),
                     background_plots=options.pop("background_plots", True),
                     plot_every=config.plot_every, ignore_index=config.ignore_index,
                     plot_format=config.plot_format, test_prefix=options.pop("test_prefix", None),
                     units=config.units, target_scaling=options.pop("target_scaling", None), target=config.target,
                     output_key=options.pop("output_key", None))
        if options:
            raise TypeError(f"MCDropoutUncertainty.from_config: unexpected keyword(s) {sorted(options)}")
        return self

    def _assign(self, strategy: str, budget_bytes: int | None, task: str, every_n_epochs: int, max_batches: int | None,
                subset: float | None, score: str, threshold: float | None, refer_fraction: float, n_bins: int,
                levels: Sequence[float], tau: float | None, output_transform: OutputTransform | None, plots: bool,
                plot_dir: str | None, seed: int | None, dataloader_idx: int,
                batch_to_xy: Callable[[Any], tuple[Tensor, Tensor]] | None, prefix: str, *,
                calibrate: bool = False, calibration_loader: Iterable[Any] | None = None,
                ood_loader: Iterable[Any] | None = None, background_plots: bool = True,
                plot_every: int | None = None, ignore_index: int | None = None, plot_format: str = "svg",
                test_prefix: str | None = None, units: str = "original",
                target_scaling: TargetScaling | tuple[Any, Any] | None = None, target: str = "batch",
                output_key: OutputKey = None) -> None:
        """Set the (checked) settings and the empty state: the one place both constructors share."""
        self.strategy = strategy
        self.budget_bytes = budget_bytes
        self.task = task
        self.every_n_epochs = every_n_epochs
        self.max_batches = max_batches
        self.subset = subset
        self.score = score
        self.threshold = threshold
        self.refer_fraction = float(refer_fraction)
        self.n_bins = n_bins
        self.levels = tuple(levels)
        self.tau = tau
        self.output_transform = output_transform
        self.output_key = check_output_key(output_key, "MCDropoutUncertainty: output_key")
        self.plots = plots
        self.plot_dir = plot_dir
        self.seed = int(seed) if seed is not None else int(torch.Generator().seed() % 2**62)
        self.dataloader_idx = dataloader_idx
        self._batch_to_xy = batch_to_xy
        self.batch_to_xy = batch_to_xy or _default_xy
        self.prefix = prefix
        self.test_prefix = "test/" + prefix if test_prefix is None else test_prefix
        if units not in UNITS:
            raise ValueError(f"MCDropoutUncertainty: units must be one of {list(UNITS)}, got {units!r}")
        if target not in TARGETS:
            raise ValueError(f"MCDropoutUncertainty: target must be one of {list(TARGETS)}, got {target!r}")
        self.units = units
        self.target = target
        self.target_scaling = TargetScaling.of(target_scaling, "MCDropoutUncertainty: target_scaling")
        #: The scaling the metrics undo (``target_scaling``, else the data module's), set at setup.
        self._scaling: TargetScaling | None = self.target_scaling
        self.ignore_index = ignore_index
        if calibrate and task != "classification":
            raise ValueError("MCDropoutUncertainty: calibrate=True (temperature scaling) needs task='classification'")
        if ood_loader is not None and task != "classification":
            raise ValueError("MCDropoutUncertainty: ood_loader needs task='classification'")
        self.calibrate = bool(calibrate)
        self.calibration_loader = calibration_loader
        self.ood_loader = ood_loader
        self.background_plots = background_plots
        if plot_every is not None and (isinstance(plot_every, bool) or not isinstance(plot_every, int)
                                       or plot_every < 1):
            raise ValueError(f"MCDropoutUncertainty: plot_every must be an integer >= 1 or None, got {plot_every!r}")
        self.plot_every = plot_every
        if plot_format not in FORMATS:
            raise ValueError(f"MCDropoutUncertainty: plot_format must be one of {list(FORMATS)}, got {plot_format!r}")
        self.plot_format = plot_format
        self._undrawn: tuple[dict[str, Any], str, list[Any], int] | None = None
        #: Fitted temperatures of the MC predictive and of the deterministic prediction (None: not fitted).
        self.temperature: float | None = None
        self.det_temperature: float | None = None
        self._cal_metric = ProbabilityCalibration(n_bins=n_bins, ignore_index=ignore_index)  # the calibrated MC
        self._det_before = ProbabilityCalibration(n_bins=n_bins, ignore_index=ignore_index)
        self._det_after = ProbabilityCalibration(n_bins=n_bins, ignore_index=ignore_index)
        self._ood_in = OODScoreStore()
        self._ood_out = OODScoreStore()
        self._plot_queue = PlotQueue()

        self.last_metrics: dict[str, float] = {}
        #: The metrics of the last ``Trainer.test`` (``{"test/mc/rmse": ..., ...}``).
        self.test_metrics: dict[str, float] = {}
        self._phase = "validate"
        self.last_plots: dict[str, str] = {}
        self.last_epoch: int | None = None  #: the last epoch the callback ran in
        self.runs = 0
        self._metric = self._make_metric()
        self._active = False
        self._batches = 0

    # ------------------------------------------------------------------ helpers

    def _make_metric(self) -> MCClassificationMetrics | MCRegressionMetrics:
        if self.task == "classification":
            return MCClassificationMetrics(
                n_bins=self.n_bins, score=self.score, threshold=self.threshold, refer_fraction=self.refer_fraction,
                ignore_index=self.ignore_index,
            )
        return MCRegressionMetrics(
            levels=self.levels, score=self.score, threshold=self.threshold, refer_fraction=self.refer_fraction
        )

    @property
    def state_key(self) -> str:
        return self._generate_state_key(task=self.task, prefix=self.prefix)

    def should_run(self, trainer: pl.Trainer) -> bool:
        """Whether this validation epoch is sampled (never during the sanity check)."""
        if trainer.sanity_checking:
            return False
        return (trainer.current_epoch + 1) % self.every_n_epochs == 0

    def _batch_limit(self, trainer: pl.Trainer, dataloader_idx: int) -> float:
        limit: float = math.inf
        if self._phase == "test":  # the test protocol scores every test input
            return limit
        if self.max_batches is not None:
            limit = self.max_batches
        if self.subset is not None:
            try:
                total = trainer.num_val_batches[dataloader_idx]
            except (IndexError, TypeError, KeyError):
                total = math.inf
            if math.isfinite(total):
                limit = min(limit, max(1, math.ceil(self.subset * total)))
        return limit

    def _split(self, pl_module: Any, batch: Any) -> tuple[Tensor, Tensor]:
        """``(x, y)`` by ``batch_to_xy``, else by the module's own ``split_batch`` (a
        :class:`~regfw.train.module.RegularizedModule`'s batch format), else ``batch[0], batch[1]``;
        with ``target="input"``, ``(x, x)``."""
        if self.target == "input":
            if isinstance(batch, Tensor):
                return batch, batch
            if self._batch_to_xy is not None:
                x = self._batch_to_xy(batch)[0]
            elif isinstance(batch, (list, tuple)) and batch:
                x = batch[0]
            elif callable(getattr(pl_module, "split_batch", None)):
                x = pl_module.split_batch(batch)[0]
            else:
                raise TypeError(f"MCDropoutUncertainty: target='input' expects batches x or (x, ...), got "
                                f"{type(batch).__name__}; pass batch_to_xy=callable returning (x, anything)")
            return x, x
        if self._batch_to_xy is None and callable(getattr(pl_module, "split_batch", None)):
            return pl_module.split_batch(batch)
        return self.batch_to_xy(batch)

    def _check_target_shape(self, result: Any, y: Tensor) -> None:
        """Regression targets must have one value per predicted mean: one line naming both shapes
        and the fix instead of torchmetrics' reshape error (an autoencoder whose batches are
        ``(x, label)`` gives the labels)."""
        mean = result.summary.mean
        if y.numel() != mean.numel():
            raise TargetShapeError(
                f"MCDropoutUncertainty: the regression targets have shape {list(y.shape)} but the model predicts "
                f"shape {list(mean.shape)} per batch; they must match. If the target is the model's input (an "
                f"autoencoder), set target='input' (uncertainty.target: input); otherwise pass "
                f"batch_to_xy=callable returning (inputs, targets) of matching shapes.")

    def _regression_target(self, result: Any, y: Tensor) -> Tensor:
        """``y`` checked against the predictions and, with a known scaling and
        ``units="original"``, in original units (the predictions are mapped by the transform)."""
        self._check_target_shape(result, y)
        scaling = self._units_scaling()
        if scaling is None:
            return y
        return scaling.to_original(y.reshape(result.summary.mean.shape))

    def _units_scaling(self) -> TargetScaling | None:
        """The scaling the regression metrics undo: None for classification or ``units="standardized"``."""
        if self.task != "regression" or self.units != "original":
            return None
        return self._scaling

    # ------------------------------------------------------------------ hooks

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if self.target_scaling is None:  # the data module's declaration, read once it is attached
            self._scaling = declared_scaling(getattr(trainer, "datamodule", None))

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        require_stochastic(pl_module)  # fail before training, with the fix in the message
        self._resolve_calibration_loader(trainer)
        self.say_what_is_sampled(pl_module)

    def say_what_is_sampled(self, pl_module: nn.Module) -> list[str]:
        """Which of the model's own stochastic layers MC dropout samples (the kinds the plan's regularizers
        select, under ``sample_model_stochastic: auto``): printed once, on rank zero; returns the lines."""
        plan = getattr(pl_module, "plan", None) or getattr(pl_module, "regfw_plan", None)
        if self.selected_kinds is None and plan is not None and hasattr(plan, "rows"):
            self.selected_kinds = sorted(plan_kinds(plan.rows()))
        layers = own_layers(pl_module, self.sample_model_stochastic, self.selected_kinds)
        lines = listing(layers, self.sample_model_stochastic)
        if lines and getattr(pl_module, "global_rank", 0) == 0:
            print("\n".join(lines))
        return lines

    def _resolve_calibration_loader(self, trainer: pl.Trainer) -> None:
        if self.calibrate and self.calibration_loader is None:
            datamodule = getattr(trainer, "datamodule", None)
            own = getattr(datamodule, "calibration_dataloader", None)
            if not callable(own):
                raise ValueError(
                    "MCDropoutUncertainty: calibrate=True needs held-out calibration data: pass "
                    "calibration_loader=DataLoader(...) or give the data module a calibration_dataloader() method")
            self.calibration_loader = own()

    def _transform(self, raw: Tensor) -> Tensor:
        """Stacked raw outputs ``[T, B, ...]`` as logits with the classes last."""
        out = raw if self.output_transform is None else self.output_transform(raw)
        assert isinstance(out, Tensor)
        return classes_last(out)

    def _predict(self, pl_module: pl.LightningModule, x: Any, seed: int, deterministic: bool = True) -> Any:
        transform = self.output_transform
        scaling = self._units_scaling()
        if scaling is not None:  # means and predicted variances in original units, where tau is stated
            transform = original_units_transform(scaling, self.output_transform)
        return mc_predict(
            pl_module, x, samples=self.samples, strategy=self.strategy, budget_bytes=self.budget_bytes,
            seed=seed, task=self.task, tau=self.tau, output_transform=transform, output_key=self.output_key,
            deterministic=deterministic, sample_model_stochastic=self.sample_model_stochastic,
            selected=self.selected_kinds,
        )

    def _fit_temperatures(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Fit the MC and deterministic temperatures on the calibration loader (held-out data)."""
        assert self.calibration_loader is not None
        mc_logits, det_logits, targets = [], [], []
        for i, batch in enumerate(self.calibration_loader):
            x, y = self._split(pl_module, batch)
            result = self._predict(pl_module, to_device(x, pl_module.device),
                                   derive_seed(self.seed, trainer.current_epoch, trainer.global_rank, 0x43414C, i))
            mc_logits.append(self._transform(result.outputs))
            if result.deterministic is not None:
                det_logits.append(self._transform(result.deterministic.unsqueeze(0))[0])
            targets.append(y.to(pl_module.device))
        if not targets:
            raise ValueError("MCDropoutUncertainty: the calibration loader yielded no batch")
        y_all = torch.cat(targets).long()
        mc_all = torch.cat(mc_logits, dim=1)
        det_all = torch.cat(det_logits) if det_logits else None
        if mc_all.dim() > 3 or self.ignore_index is not None:  # dense: every labelled position is one input
            flat = y_all.flatten()
            keep = (flat != self.ignore_index) if self.ignore_index is not None else torch.ones_like(flat).bool()
            y_all = flat[keep]
            mc_all = mc_all.reshape(mc_all.shape[0], -1, mc_all.shape[-1])[:, keep]
            det_all = None if det_all is None else det_all.reshape(-1, det_all.shape[-1])[keep]
        self.temperature = fit_temperature(mc_all, y_all, mc=True)
        if det_all is not None:
            self.det_temperature = fit_temperature(det_all, y_all)

    def on_validation_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._phase = "validate"
        self._begin(trainer, pl_module, self.should_run(trainer))

    def on_test_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._phase = "test"
        self._resolve_calibration_loader(trainer)
        self._begin(trainer, pl_module, True)

    def _begin(self, trainer: pl.Trainer, pl_module: pl.LightningModule, active: bool) -> None:
        """Reset the metric states for a sampled validation or test epoch."""
        self._active = active
        self._batches = 0
        if self._active and not stochastic_modules(pl_module) and dropout_family(pl_module):
            # every rate is 0 for now (a rate schedule's early or late phase): nothing to sample
            rank_zero_warn(f"MCDropoutUncertainty: every dropout rate is 0 at epoch {trainer.current_epoch} (a rate "
                           f"schedule?); Monte Carlo dropout is skipped this epoch")
            self._active = False
        if self._active:
            require_stochastic(pl_module)
            for name in ("_metric", "_cal_metric", "_det_before", "_det_after", "_ood_in", "_ood_out"):
                metric = getattr(self, name)
                metric.reset()
                setattr(self, name, metric.to(pl_module.device))
            if self.calibrate and (self._phase == "validate" or self.temperature is None):
                self._fit_temperatures(trainer, pl_module)  # at test: the temperature fitted in training

    def on_validation_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        self._sample_batch(trainer, pl_module, batch, batch_idx, dataloader_idx)

    on_test_batch_end = on_validation_batch_end  # the phase (validate or test) was set at the epoch's start

    def _sample_batch(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int,
                      dataloader_idx: int) -> None:
        """Sample one validation or test batch and add it to the metric states."""
        if not self._active or dataloader_idx != self.dataloader_idx:
            return
        if batch_idx >= self._batch_limit(trainer, dataloader_idx):
            return
        x, y = self._split(pl_module, batch)
        stream = _TEST_STREAM if self._phase == "test" else trainer.current_epoch  # test masks differ from val's
        result = self._predict(
            pl_module, x, derive_seed(self.seed, stream, trainer.global_rank, dataloader_idx, batch_idx)
        )
        if self.task == "regression":
            assert isinstance(self._metric, MCRegressionMetrics)
            y = self._regression_target(result, y)
            self._metric.update(result.summary, y)  # the mixture terms come from the summary's samples
        else:
            self._metric.update(result.summary, y)
            self._update_classification(result, y)
        self._batches += 1

    def _update_classification(self, result: Any, y: Tensor) -> None:
        """The calibrated predictive's metrics and the in-distribution OOD scores of one batch."""
        summary = result.summary
        logits = None
        if self.calibrate or self.ood_loader is not None:
            logits = self._transform(result.outputs)
        if self.calibrate and self.temperature is not None and logits is not None:
            probs = class_softmax(Temperature(self.temperature)(logits).float())
            summary = classification_summary(probs) if self.ood_loader is not None else summary  # OOD: calibrated
            self._cal_metric.update(probs.mean(0), y)
            if result.deterministic is not None and self.det_temperature is not None:
                det = self._transform(result.deterministic.unsqueeze(0))[0]
                self._det_before.update(torch.softmax(Temperature(1.0)(det).double(), -1), y)
                self._det_after.update(torch.softmax(Temperature(self.det_temperature)(det).double(), -1), y)
        if self.ood_loader is not None and logits is not None:
            t = self.temperature if (self.calibrate and self.temperature is not None) else 1.0
            self._ood_in.update(_per_input_scores(ood_scores(summary, Temperature(t)(logits)), y.shape[0]))

    def _ood_pass(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Sample the OOD loader (at most the configured number of batches)."""
        assert self.ood_loader is not None
        limit = self._batch_limit(trainer, self.dataloader_idx)
        t = self.temperature if (self.calibrate and self.temperature is not None) else 1.0
        for i, batch in enumerate(self.ood_loader):
            if i >= limit:
                break
            x = batch if isinstance(batch, Tensor) else split_batch(batch)[0]
            result = self._predict(pl_module, to_device(x, pl_module.device),
                                   derive_seed(self.seed, trainer.current_epoch, trainer.global_rank, 0x4F4F44, i),
                                   deterministic=False)  # OOD scores use the MC predictive only
            logits = Temperature(t)(self._transform(result.outputs))
            summary = classification_summary(class_softmax(logits.float()))
            self._ood_out.update(_per_input_scores(ood_scores(summary, logits), batch_size(x)))

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        metrics = self._finish(trainer, pl_module, self.prefix, "")
        if metrics is None:
            return
        self.last_metrics = metrics
        self.last_epoch = trainer.current_epoch
        self.runs += 1
        if self.plots:
            directory = self._plot_dir(trainer)  # every rank: trainer.log_dir broadcasts
            if trainer.is_global_zero:
                self._submit_plots(trainer, directory)
        self._metric.reset()

    def on_test_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        metrics = self._finish(trainer, pl_module, self.test_prefix, "test/")
        self._phase = "validate"
        if metrics is not None:
            self.test_metrics = metrics
            self._metric.reset()

    def _finish(self, trainer: pl.Trainer, pl_module: pl.LightningModule, prefix: str,
                extra_prefix: str) -> dict[str, float] | None:
        """Compute and log the epoch's metrics (None when nothing was sampled)."""
        if not self._active:
            return None
        self._active = False
        if self._batches == 0 and trainer.world_size <= 1:
            return None
        values = self._metric.compute()  # synchronised across processes by torchmetrics
        metrics = {prefix + k: float(v) for k, v in values.items()}
        metrics.update({extra_prefix + k: v for k, v in self._extra_metrics(trainer, pl_module).items()})
        pl_module.log_dict(metrics, on_step=False, on_epoch=True, sync_dist=True, add_dataloader_idx=False)
        return metrics

    def _extra_metrics(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, float]:
        """Calibration before/after and OOD detection (classification)."""
        if self.task != "classification":
            return {}
        metric = self._metric
        assert isinstance(metric, MCClassificationMetrics)
        out: dict[str, float] = {}
        if self.calibrate and self.temperature is not None:
            before = metric.compute()
            after = self._cal_metric.compute()
            out["cal/temperature"] = self.temperature
            out["cal/nll_before"], out["cal/nll_after"] = float(before["nll"]), float(after["nll"])
            out["cal/ece_before"], out["cal/ece_after"] = float(before["ece"]), float(after["ece"])
            if self.det_temperature is not None:
                db, da = self._det_before.compute(), self._det_after.compute()
                out["cal/det_temperature"] = self.det_temperature
                out["cal/det_nll_before"], out["cal/det_nll_after"] = float(db["nll"]), float(da["nll"])
                out["cal/det_ece_before"], out["cal/det_ece_after"] = float(db["ece"]), float(da["ece"])
        if self.ood_loader is not None:
            self._ood_pass(trainer, pl_module)
            res = ood_metrics(self._ood_in.compute_scores(), self._ood_out.compute_scores())
            out.update(res.as_metrics("ood/"))
        return out

    def _submit_plots(self, trainer: pl.Trainer, directory: str) -> None:
        """Collect the plot data now (CPU copies); draw it on the background thread when this run
        is due (``plot_every``) or the last one, else keep it for :meth:`on_fit_end`."""
        data = self._plot_data()
        loggers = list(trainer.loggers)
        step = trainer.global_step
        last = trainer.max_epochs is not None and trainer.current_epoch + 1 >= trainer.max_epochs
        due = self.plot_every is not None and self.runs % self.plot_every == 0
        if not (due or last):
            self._undrawn = (data, directory, loggers, step)
            return
        self._undrawn = None
        self._draw(data, directory, loggers, step)

    def _draw(self, data: dict[str, Any], directory: str, loggers: list[Any], step: int) -> None:
        self.flush_plots()  # one epoch's plots at a time, in order
        if not self.background_plots:
            self.last_plots = draw_plots(data, directory, loggers, step, self.prefix, self.plot_format)
            return
        self._plot_queue.submit(data, directory, loggers, step, self.prefix, self.plot_format)

    def flush_plots(self) -> dict[str, str]:
        """Wait for the plots being drawn in the background; returns :attr:`last_plots`."""
        written = self._plot_queue.wait()
        if written is not None:
            self.last_plots = written
        return self.last_plots

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._undrawn is not None:  # the fit stopped before its last epoch: draw the last run now
            undrawn, self._undrawn = self._undrawn, None
            self._draw(*undrawn)
        self.flush_plots()

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self.flush_plots()
        self._plot_queue.shutdown()

    def on_save_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                           checkpoint: dict[str, Any]) -> None:
        if self.temperature is not None:
            checkpoint["regfw_calibration"] = {"temperature": self.temperature,
                                               "det_temperature": self.det_temperature}

    # ------------------------------------------------------------------ plots

    def _plot_dir(self, trainer: pl.Trainer) -> str:
        base = self.plot_dir
        if base is None:
            root = trainer.log_dir or trainer.default_root_dir
            base = os.path.join(root, "plots")
        return os.path.join(base, f"epoch={trainer.current_epoch:03d}")

    def _plot_data(self) -> dict[str, Any]:
        """Everything the plots need, as CPU tensors (safe to hand to another thread)."""
        calibrated = self._cal_metric if self.calibrate and self.temperature is not None else None
        ood = (self._ood_in, self._ood_out) if self.ood_loader is not None else None
        return plot_data(self._metric, self.score, calibrated, self.temperature,
                         self.last_metrics.get(self.prefix + "referred_fraction"), ood)

    # ------------------------------------------------------------------ state

    def state_dict(self) -> dict[str, Any]:
        return {
            "temperature": self.temperature,
            "det_temperature": self.det_temperature,
            "seed": self.seed,
            "last_epoch": self.last_epoch,
            "runs": self.runs,
            "last_metrics": dict(self.last_metrics),
            "last_plots": dict(self.last_plots),
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.seed = int(state_dict.get("seed", self.seed))
        self.temperature = state_dict.get("temperature")
        self.det_temperature = state_dict.get("det_temperature")
        self.last_epoch = state_dict.get("last_epoch")
        self.runs = int(state_dict.get("runs", 0))
        self.last_metrics = dict(state_dict.get("last_metrics", {}))
        self.last_plots = dict(state_dict.get("last_plots", {}))


#: The first seed component of the test masks (in place of the epoch), "TEST" in ASCII.
_TEST_STREAM = 0x54455354


class TargetShapeError(RegfwError, ValueError):
    """Regression targets whose shape does not match the predictions (see ``target="input"``)."""


def _per_input_scores(scores: dict[str, Tensor], batch: int) -> dict[str, Tensor]:
    """Dense OOD scores (one per position) as one per input: the mean over its positions."""
    return {k: v.reshape(batch, -1).mean(-1) for k, v in scores.items()}
