"""Co-adaptation of hidden units, measured: the mean absolute correlation between units.

The measure and the Lightning callback of the ``coadaptation`` plugin (its settings and
regularizer are in :mod:`regfw_plugins.coadaptation`).

Hinton et al. ("Improving neural networks by preventing co-adaptation of feature detectors",
2012) and Srivastava et al. (JMLR 2014, section 7.1) argue that dropout stops hidden units from
relying on particular other units, so each learns a feature useful on its own. Co-adaptation has
no single definition; the usual computable proxy (Cogswell et al., "Reducing Overfitting in Deep
Networks by Decorrelating Representations", ICLR 2016) is how correlated the units' activations
are. :func:`coadaptation` computes, per chosen layer, the mean of ``|corr(h_i, h_j)|`` over all
pairs ``i != j`` of live units on some data, with the model in eval mode; :class:`CoadaptationMonitor`
logs it every validation epoch from the model's own validation forward passes (no extra pass).

Which activations: those of :func:`regfw_plugins.coadaptation.layers.unit_layers` (by default the
post-activation units of every hidden and conv layer except the output layer).
Conv maps count channels as units and every position as an observation. Units that never vary
on the data (dead ReLUs) have no correlation and are left out and counted.
"""
from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import pytorch_lightning as pl
import torch
from torch import Tensor, nn

from regfw.extend import validate_dataclass

from . import CoadaptationConfig
from .layers import unit_layers

__all__ = [
    "CorrelationStats",
    "LayerCoadaptation",
    "coadaptation",
    "mean_coadaptation",
    "CoadaptationMonitor",
    "DEFAULT_MAX_UNITS",
]

#: Units per layer kept by default (evenly spaced) to bound the ``units x units`` statistics.
DEFAULT_MAX_UNITS = 512
#: A unit whose standard deviation on the data is below this is dead (left out).
DEAD_STD = 1e-6


@dataclass
class LayerCoadaptation:
    """The co-adaptation measure of one layer."""

    path: str
    mean_abs_corr: float  #: mean ``|corr|`` over pairs of live units (nan with fewer than 2)
    units: int  #: units measured (after ``max_units``)
    dead: int  #: measured units that never varied on the data
    observations: int  #: rows seen (examples, times positions for conv maps)


class CorrelationStats:
    """Streaming first and second moments of ``[rows, units]`` activations, in float64.

    The sums are additive, so batches (and processes) combine by adding them.
    """

    def __init__(self, units: int) -> None:
        self.units = units
        self.n = 0
        self.total = torch.zeros(units, dtype=torch.float64)
        self.outer = torch.zeros(units, units, dtype=torch.float64)

    def update(self, h: Tensor) -> None:
        """Add rows ``h`` of shape ``[rows, units]``."""
        h = h.detach().to(device="cpu", dtype=torch.float64)
        if h.dim() != 2 or h.shape[1] != self.units:
            raise ValueError(f"expected activations of shape [rows, {self.units}], got {tuple(h.shape)}")
        self.n += h.shape[0]
        self.total += h.sum(0)
        self.outer += h.T @ h

    def correlation(self) -> tuple[Tensor, Tensor]:
        """The correlation matrix of the live units, and the live mask over all units."""
        if self.n < 2:
            return torch.empty(0, 0, dtype=torch.float64), torch.zeros(self.units, dtype=torch.bool)
        mean = self.total / self.n
        cov = self.outer / self.n - torch.outer(mean, mean)
        std = cov.diagonal().clamp_min(0.0).sqrt()
        live = std > DEAD_STD
        cov, std = cov[live][:, live], std[live]
        corr = (cov / torch.outer(std, std)).clamp(-1.0, 1.0)
        return corr, live

    def mean_abs_correlation(self) -> float:
        """Mean ``|corr(h_i, h_j)|`` over ordered pairs ``i != j`` of live units (nan if < 2)."""
        corr, _ = self.correlation()
        m = corr.shape[0]
        if m < 2:
            return math.nan
        off = corr.abs().sum() - corr.diagonal().abs().sum()
        return float(off / (m * (m - 1)))

    def result(self, path: str) -> LayerCoadaptation:
        _, live = self.correlation()
        return LayerCoadaptation(path, self.mean_abs_correlation(), self.units,
                                 int(self.units - live.sum()) if self.n >= 2 else self.units, self.n)


def _rows(output: Any, unit_dim: int) -> Tensor:
    """``[rows, units]`` from a layer output (the first element of a tuple output)."""
    if isinstance(output, (tuple, list)):
        output = output[0]
    if output.dim() == 1:
        return output.reshape(-1, 1)
    return output.movedim(unit_dim, -1).reshape(-1, output.shape[unit_dim])


def _unit_index(units: int, max_units: int | None) -> Tensor | None:
    if max_units is None or units <= max_units:
        return None
    return torch.linspace(0, units - 1, max_units).round().long()


class _Recorder:
    """Forward hooks that feed :class:`CorrelationStats`, one per layer.

    ``armed`` gates recording: each layer records at most once per :meth:`arm` call, so only the
    first forward pass after arming is measured (the model's own validation step, not the
    Monte Carlo passes another callback may run on the same batch).
    """

    def __init__(self, model: nn.Module, layers: Mapping[str, int], max_units: int | None) -> None:
        self.layers = dict(layers)
        self.max_units = max_units
        self.stats: dict[str, CorrelationStats] = {}
        self.index: dict[str, Tensor | None] = {}
        self.pending: set[str] = set()
        self.handles = [model.get_submodule(path).register_forward_hook(self._hook(path)) for path in self.layers]

    def arm(self) -> None:
        self.pending = set(self.layers)

    def _hook(self, path: str):
        def hook(module: nn.Module, args: Any, output: Any) -> None:
            if path not in self.pending:
                return
            self.pending.discard(path)
            rows = _rows(output, self.layers[path])
            if path not in self.stats:
                units = rows.shape[1]
                index = _unit_index(units, self.max_units)
                self.index[path] = index
                self.stats[path] = CorrelationStats(units if index is None else len(index))
            idx = self.index[path]
            self.stats[path].update(rows if idx is None else rows[:, idx.to(rows.device)])
        return hook

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles = []


def _inputs(batch: Any) -> Any:
    if isinstance(batch, (tuple, list)):
        return batch[0]
    return batch


def coadaptation(
    model: nn.Module,
    data: Tensor | Iterable[Any],
    layers: Any = None,
    max_batches: int | None = None,
    max_units: int | None = DEFAULT_MAX_UNITS,
) -> dict[str, LayerCoadaptation]:
    """Mean absolute correlation between the hidden units of ``model`` on ``data``, per layer.

    Args:
        model: any module; it runs in eval mode (deterministic; flags restored after).
        data: an input tensor, or an iterable of batches (``(x, y)`` tuples or inputs).
        layers: see :func:`unit_layers` (None: every hidden and conv layer but the output one).
        max_batches: use at most this many batches.
        max_units: measure at most this many (evenly spaced) units per layer; None for all.

    Returns ``{path: LayerCoadaptation}``; :func:`mean_coadaptation` averages the layers.
    """
    batches = [data] if isinstance(data, Tensor) else data
    iterator = iter(batches)
    try:
        first = next(iterator)
    except StopIteration:
        raise ValueError("coadaptation needs at least one batch of data") from None
    saved = [(m, m.training) for m in model.modules()]
    recorder = None
    try:
        model.eval()
        chosen = unit_layers(model, _inputs(first), layers)
        if not chosen:
            raise ValueError(
                f"{type(model).__name__} has no hidden or conv layer besides its output layer to measure; "
                f"pass layers=[module paths]"
            )
        recorder = _Recorder(model, chosen, max_units)
        with torch.no_grad():
            for n, batch in enumerate(_chain(first, iterator)):
                if max_batches is not None and n >= max_batches:
                    break
                recorder.arm()
                model(_inputs(batch))
    finally:
        if recorder is not None:
            recorder.remove()
        for m, flag in saved:
            m.training = flag
    return {path: recorder.stats[path].result(path) for path in chosen if path in recorder.stats}


def _chain(first: Any, rest: Iterable[Any]) -> Iterable[Any]:
    yield first
    yield from rest


def mean_coadaptation(results: Mapping[str, LayerCoadaptation]) -> float:
    """The mean of the per-layer measures (layers with nan are left out)."""
    values = [r.mean_abs_corr for r in results.values() if not math.isnan(r.mean_abs_corr)]
    return sum(values) / len(values) if values else math.nan


class CoadaptationMonitor(pl.Callback):
    """Log the co-adaptation measure of chosen layers every ``every_n_epochs`` validations.

    The statistics come from the model's own validation forward passes (forward hooks armed at
    each validation batch start, first pass only), so no extra pass runs and Monte Carlo
    sampling on the same batch is not counted. Logged: ``coadaptation/<layer path>`` per layer
    and ``coadaptation/mean``. :attr:`last` holds the last per-layer results.

    Args:
        config: the settings as one :class:`~regfw_plugins.coadaptation.CoadaptationConfig` (what the
            ``coadaptation`` regularizer passes); or give them as the keywords below, validated the
            same way (a :class:`~regfw.errors.ConfigError` naming ``CoadaptationMonitor.<keyword>``).
        layers: see :func:`unit_layers`; None measures every hidden and conv layer but the
            output one (of ``pl_module.model`` when it has one, e.g. a ``RegularizedModule``).
        every_n_epochs: measure after every N-th training epoch.
        max_batches: measure at most this many validation batches.
        max_units: see :func:`coadaptation`.
        prefix: prefix of the logged names.
    """

    def __init__(self, config: CoadaptationConfig | None = None, *, prefix: str = "coadaptation/",
                 **settings: Any) -> None:
        super().__init__()
        if config is not None and settings:
            raise TypeError(f"CoadaptationMonitor: give the settings as one CoadaptationConfig or as keywords, "
                            f"not both (got {sorted(settings)})")
        #: The validated settings; keywords go through the same validation as the config section.
        self.config: CoadaptationConfig = (
            config if config is not None else validate_dataclass(CoadaptationConfig, settings, "CoadaptationMonitor"))
        self.prefix = prefix
        self.last: dict[str, LayerCoadaptation] = {}
        self.history: list[dict[str, float]] = []
        self._recorder: _Recorder | None = None
        self._batches = 0

    @staticmethod
    def _target(pl_module: nn.Module) -> tuple[nn.Module, str]:
        model = getattr(pl_module, "model", None)
        if isinstance(model, nn.Module):
            return model, "model."
        return pl_module, ""

    def _layers(self, pl_module: nn.Module) -> dict[str, int]:
        model, _ = self._target(pl_module)
        if self.config.layers is not None:
            return unit_layers(model, None, self.config.layers)
        example = getattr(pl_module, "example_input_array", None)
        return unit_layers(model, example if isinstance(example, Tensor) else None)

    def on_fit_start(self, trainer: Any, pl_module: Any) -> None:
        if not self._layers(pl_module):
            raise ValueError(
                f"CoadaptationMonitor: {type(self._target(pl_module)[0]).__name__} has no hidden or conv layer "
                f"besides its output layer; pass layers=[module paths] (regularizers.coadaptation.layers)"
            )

    def on_validation_epoch_start(self, trainer: Any, pl_module: Any) -> None:
        self._batches = 0
        if trainer.sanity_checking or (trainer.current_epoch + 1) % self.config.every_n_epochs:
            return
        model, _ = self._target(pl_module)
        self._recorder = _Recorder(model, self._layers(pl_module), self.config.max_units)

    def on_validation_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int,
                                  dataloader_idx: int = 0) -> None:
        if self._recorder is None:
            return
        if self.config.max_batches is not None and self._batches >= self.config.max_batches:
            self._recorder.pending = set()
            return
        self._batches += 1
        self._recorder.arm()

    def on_validation_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int,
                                dataloader_idx: int = 0) -> None:
        if self._recorder is not None:
            self._recorder.pending = set()

    def on_validation_epoch_end(self, trainer: Any, pl_module: Any) -> None:
        recorder, self._recorder = self._recorder, None
        if recorder is None:
            return
        recorder.remove()
        results = {}
        for path, stats in recorder.stats.items():
            if trainer.world_size > 1:  # the sums are additive: combine them across processes
                for name in ("total", "outer"):
                    local = getattr(stats, name).to(pl_module.device)
                    setattr(stats, name, trainer.strategy.reduce(local, reduce_op="sum").cpu())
                count = torch.tensor(float(stats.n), device=pl_module.device)
                stats.n = int(trainer.strategy.reduce(count, reduce_op="sum"))
            results[path] = stats.result(path)
        self.last = results
        logged = {f"{self.prefix}{path}": r.mean_abs_corr for path, r in results.items()}
        logged[f"{self.prefix}mean"] = mean_coadaptation(results)
        self.history.append({"epoch": trainer.current_epoch, **logged})
        for name, value in logged.items():
            if not math.isnan(value):
                pl_module.log(name, value, on_step=False, on_epoch=True)

    def on_fit_end(self, trainer: Any, pl_module: Any) -> None:
        if self._recorder is not None:
            self._recorder.remove()
            self._recorder = None
