"""Monte Carlo dropout uncertainty at validation time, as a Lightning callback.

:class:`MCDropoutUncertainty` samples each selected validation batch right after the model's own
``validation_step`` has seen it (``on_validation_batch_end``), while the batch is still on the
device, and accumulates the metrics in :mod:`torchmetrics` states; at
``on_validation_epoch_end`` it computes them (synchronised across processes), logs them and
draws the plots. Nothing of the normal validation changes: modes are restored after sampling,
BatchNorm stays in eval, and the masks come from a forked, separately seeded random stream, so
a fit with the callback ends with bit-identical weights to a fit without it.
"""
from __future__ import annotations

import math
import os
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.utilities import rank_zero_warn
from torch import Tensor

from regfw.uncertainty.metrics import (
    DEFAULT_BINS,
    DEFAULT_LEVELS,
    MCClassificationMetrics,
    MCRegressionMetrics,
)
from regfw.uncertainty.sampling import (
    DEFAULT_BUDGET_BYTES,
    TASKS,
    OutputTransform,
    _check_samples,
    _dropout_family,
    _require_stochastic,
    derive_seed,
    mc_predict,
    stochastic_modules,
)
from regfw.uncertainty.summaries import SCORES

if TYPE_CHECKING:  # pragma: no cover
    from regfw.config import UncertaintyConfig

__all__ = ["MCDropoutUncertainty", "CLASSIFICATION_SCORES", "REGRESSION_SCORES"]

CLASSIFICATION_SCORES: tuple[str, ...] = SCORES
REGRESSION_SCORES: tuple[str, ...] = ("variance", "entropy")


def _default_xy(batch: Any) -> tuple[Tensor, Tensor]:
    if isinstance(batch, (list, tuple)) and len(batch) >= 2:
        return batch[0], batch[1]
    raise TypeError(
        f"MCDropoutUncertainty expects (x, y) batches, got {type(batch).__name__}; "
        "pass batch_to_xy=callable returning (x, y)"
    )


class MCDropoutUncertainty(pl.Callback):
    """Monte Carlo dropout uncertainty metrics and plots every ``every_n_epochs`` validations.

    Works with any LightningModule whose ``forward(x)`` returns logits (classification) or
    means (regression) and whose validation batches are ``(x, y)``.

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
        tau: regression fixed noise precision (aleatoric variance ``1 / tau``).
        output_transform: see :func:`regfw.uncertainty.mc_predict`.
        plots: write (and send to an image-capable logger) the plots each run.
        plot_dir: where ``epoch=NNN/*.png`` go; default ``<trainer.log_dir>/plots``.
        seed: base seed of the MC masks (mixed with epoch, rank and batch index); None draws
            one at construction, kept in the checkpoint state.
        dataloader_idx: the validation dataloader to use.
        batch_to_xy: maps a batch to ``(x, y)`` when batches are not tuples.
        prefix: prefix of the logged names (``"mc/"``).

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
    ) -> None:
        super().__init__()
        self.samples = _check_samples(samples)
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
            raise ValueError(f"MCDropoutUncertainty: score for task={task!r} must be one of {list(allowed)}, got {score!r}")
        self._assign(strategy, budget_bytes, task, every_n_epochs, max_batches, subset, score, threshold, refer_fraction,
                     n_bins, levels, tau, output_transform, plots, plot_dir, seed, dataloader_idx, batch_to_xy, prefix)

    @classmethod
    def from_config(cls, config: UncertaintyConfig, *, task: str = "classification",
                    output_transform: OutputTransform | None = None, plot_dir: str | None = None,
                    **options: Any) -> MCDropoutUncertainty:
        """The callback for a validated ``uncertainty:`` section, passed as one object.

        ``config`` is a :class:`regfw.config.UncertaintyConfig` (from :func:`regfw.config.load_config`),
        whose fields were checked when it was loaded and are not checked again; only what depends
        on the model is: ``task``, and the config's ``score`` against it (a
        :class:`~regfw.errors.ConfigError` naming ``uncertainty.score``). ``options`` are the
        constructor's other keywords (``subset``, ``n_bins``, ``levels``, ``batch_to_xy``,
        ``dataloader_idx``, ``prefix``).
        """
        from regfw.errors import ConfigError

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
        self._assign(config.strategy, int(config.budget_mb * 2**20), task, config.every_n_epochs, config.max_batches,
                     options.pop("subset", None), score, config.threshold, config.refer_fraction,
                     options.pop("n_bins", DEFAULT_BINS), options.pop("levels", DEFAULT_LEVELS), config.tau,
                     output_transform, config.plots, plot_dir, config.seed, options.pop("dataloader_idx", 0),
                     options.pop("batch_to_xy", None), options.pop("prefix", "mc/"))
        if options:
            raise TypeError(f"MCDropoutUncertainty.from_config: unexpected keyword(s) {sorted(options)}")
        return self

    def _assign(self, strategy: str, budget_bytes: int | None, task: str, every_n_epochs: int, max_batches: int | None,
                subset: float | None, score: str, threshold: float | None, refer_fraction: float, n_bins: int,
                levels: Sequence[float], tau: float | None, output_transform: OutputTransform | None, plots: bool,
                plot_dir: str | None, seed: int | None, dataloader_idx: int,
                batch_to_xy: Callable[[Any], tuple[Tensor, Tensor]] | None, prefix: str) -> None:
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
        self.plots = plots
        self.plot_dir = plot_dir
        self.seed = int(seed) if seed is not None else int(torch.Generator().seed() % 2**62)
        self.dataloader_idx = dataloader_idx
        self.batch_to_xy = batch_to_xy or _default_xy
        self.prefix = prefix

        self.last_metrics: dict[str, float] = {}
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
                n_bins=self.n_bins, score=self.score, threshold=self.threshold, refer_fraction=self.refer_fraction
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

    # ------------------------------------------------------------------ hooks

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        _require_stochastic(pl_module)  # fail before training, with the fix in the message

    def on_validation_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._active = self.should_run(trainer)
        self._batches = 0
        if self._active and not stochastic_modules(pl_module) and _dropout_family(pl_module):
            # every rate is 0 for now (a rate schedule's early or late phase): nothing to sample
            rank_zero_warn(f"MCDropoutUncertainty: every dropout rate is 0 at epoch {trainer.current_epoch} (a rate "
                           f"schedule?); Monte Carlo dropout is skipped this epoch")
            self._active = False
        if self._active:
            _require_stochastic(pl_module)
            self._metric.reset()
            self._metric = self._metric.to(pl_module.device)

    def on_validation_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        if not self._active or dataloader_idx != self.dataloader_idx:
            return
        if batch_idx >= self._batch_limit(trainer, dataloader_idx):
            return
        x, y = self.batch_to_xy(batch)
        result = mc_predict(
            pl_module,
            x,
            samples=self.samples,
            strategy=self.strategy,
            budget_bytes=self.budget_bytes,
            seed=derive_seed(self.seed, trainer.current_epoch, trainer.global_rank, dataloader_idx, batch_idx),
            task=self.task,
            tau=self.tau,
            output_transform=self.output_transform,
        )
        self._metric.update(result.summary, y)
        self._batches += 1

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self._active:
            return
        self._active = False
        if self._batches == 0 and trainer.world_size <= 1:
            return
        values = self._metric.compute()  # synchronised across processes by torchmetrics
        metrics = {self.prefix + k: float(v) for k, v in values.items()}
        pl_module.log_dict(metrics, on_step=False, on_epoch=True, sync_dist=True, add_dataloader_idx=False)
        self.last_metrics = metrics
        self.last_epoch = trainer.current_epoch
        self.runs += 1
        if self.plots:
            directory = self._plot_dir(trainer)  # every rank: trainer.log_dir broadcasts
            if trainer.is_global_zero:
                self.last_plots = self._write_plots(trainer, directory)
        self._metric.reset()

    # ------------------------------------------------------------------ plots

    def _plot_dir(self, trainer: pl.Trainer) -> str:
        base = self.plot_dir
        if base is None:
            root = trainer.log_dir or trainer.default_root_dir
            base = os.path.join(root, "plots")
        return os.path.join(base, f"epoch={trainer.current_epoch:03d}")

    def _write_plots(self, trainer: pl.Trainer, directory: str) -> dict[str, str]:
        from regfw.uncertainty import plots
        from regfw.uncertainty.metrics import retained_curve

        figures = {}
        if self.task == "classification":
            metric = self._metric
            assert isinstance(metric, MCClassificationMetrics)
            score, correct = metric.score_and_correct()
            fr, acc = retained_curve(score, correct)
            ref = self.last_metrics.get(self.prefix + "referred_fraction")
            figures["reliability"] = plots.reliability_figure(metric.reliability())
            figures["referral"] = plots.referral_figure(fr, acc, marker=ref)
            figures["score_hist"] = plots.score_histogram_figure(score, correct.bool(), score_name=self.score)
        else:
            metric = self._metric
            assert isinstance(metric, MCRegressionMetrics)
            score, sq = metric.score_and_error()
            fr, mse = retained_curve(score, sq)
            cov = metric.coverage()
            figures["coverage"] = plots.coverage_figure(list(cov), list(cov.values()))
            figures["referral"] = plots.referral_figure(
                fr, mse.clamp_min(0).sqrt(), ylabel="RMSE on retained", title="Referral curve"
            )
            figures["score_hist"] = plots.score_histogram_figure(score, None, score_name=self.score)
        written: dict[str, str] = {}
        for name, fig in figures.items():
            written[name] = plots.save_figure(fig, os.path.join(directory, f"{name}.png"))
            for logger in trainer.loggers:
                experiment = getattr(logger, "experiment", None)
                add_figure = getattr(experiment, "add_figure", None)
                if callable(add_figure):
                    try:
                        add_figure(f"{self.prefix}{name}", fig, global_step=trainer.global_step, close=False)
                    except Exception as exc:  # a logger failing to take an image must not stop training
                        rank_zero_warn(f"MCDropoutUncertainty: could not send plot {name!r} to the logger: {exc}")
        return written

    # ------------------------------------------------------------------ state

    def state_dict(self) -> dict[str, Any]:
        return {
            "seed": self.seed,
            "last_epoch": self.last_epoch,
            "runs": self.runs,
            "last_metrics": dict(self.last_metrics),
            "last_plots": dict(self.last_plots),
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.seed = int(state_dict.get("seed", self.seed))
        self.last_epoch = state_dict.get("last_epoch")
        self.runs = int(state_dict.get("runs", 0))
        self.last_metrics = dict(state_dict.get("last_metrics", {}))
        self.last_plots = dict(state_dict.get("last_plots", {}))
