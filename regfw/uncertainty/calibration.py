"""Post-hoc calibration: temperature scaling of the MC predictive and of the deterministic one.

Temperature scaling (Guo et al. 2017, "On Calibration of Modern Neural Networks") divides the
logits by one scalar ``T > 0`` fitted to minimise the negative log-likelihood of a held-out
*calibration* split; the predicted class does not change (deterministic prediction), only how
sure the model says it is. For the Monte Carlo predictive ``mean_t softmax(z_t / T)`` the same
scalar divides every sample's logits before the average (Laves et al. 2019, "Well-calibrated
Model Uncertainty with Temperature Scaling for Dropout Variational Inference").

Binary models with one logit per input (``[N]`` or ``[N, 1]``, a sigmoid output) are handled as
the two-class logits ``[0, z]``, for which ``softmax([0, z] / T) = sigmoid(z / T)``: the same
fit, no special case that could silently treat a single column as a certain softmax.

The calibration split must be data the model was not trained on and that the reported metrics
are not computed on: :func:`carve_calibration_split` takes it from the *training* data, never
from validation or test, so the validation metrics before and after stay honest.

Lightning runs validation under :func:`torch.inference_mode`; fitting needs gradients, so
:func:`fit_temperature` leaves inference mode and clones its inputs into normal tensors first.
"""
from __future__ import annotations

import math
import warnings
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

__all__ = [
    "MIN_TEMPERATURE",
    "MAX_TEMPERATURE",
    "Temperature",
    "as_class_logits",
    "fit_temperature",
    "tempered_probs",
    "carve_calibration_split",
]

#: The fitted temperature is kept inside ``[MIN_TEMPERATURE, MAX_TEMPERATURE]``.
MIN_TEMPERATURE = 0.01
MAX_TEMPERATURE = 100.0


def as_class_logits(logits: Tensor, mc: bool) -> Tensor:
    """Logits as ``[T, N, C]`` (``T = 1`` when ``mc`` is False); one logit per input becomes ``[0, z]``.

    Accepted: ``[N, C]`` / ``[N]`` / ``[N, 1]`` (``mc=False``), ``[T, N, C]`` / ``[T, N]`` /
    ``[T, N, 1]`` (``mc=True``).
    """
    z = logits if mc else logits.unsqueeze(0)
    if z.dim() == 2:
        z = z.unsqueeze(-1)
    if z.dim() != 3:
        want = "[T, N, C] or [T, N]" if mc else "[N, C] or [N]"
        raise ValueError(f"temperature scaling needs logits of shape {want}, got {tuple(logits.shape)}")
    if z.shape[-1] == 1:
        z = torch.cat([torch.zeros_like(z), z], dim=-1)
    return z


def tempered_probs(logits: Tensor, temperature: float, mc: bool) -> Tensor:
    """The predictive probabilities ``mean_t softmax(z_t / T)``, ``[N, C]`` (binary: ``C = 2``)."""
    z = as_class_logits(logits, mc)
    return torch.softmax(z.double() / float(temperature), dim=-1).mean(0)


def _nll(z: Tensor, target: Tensor, log_t: Tensor) -> Tensor:
    """Mean NLL of ``target`` under ``mean_t softmax(z_t / exp(log_t))`` (logsumexp over T)."""
    logp = torch.log_softmax(z / log_t.exp(), dim=-1)  # [T, N, C]
    picked = logp.gather(-1, target.view(1, -1, 1).expand(z.shape[0], -1, 1)).squeeze(-1)  # [T, N]
    return -(torch.logsumexp(picked, dim=0) - torch.log(torch.tensor(float(z.shape[0]), dtype=z.dtype))).mean()


def _grid_start(z: Tensor, y: Tensor, points: int = 25) -> float:
    """The best ``log T`` of a coarse grid over ``[log MIN_TEMPERATURE, log MAX_TEMPERATURE]``
    (no gradients, a few grid points per batched evaluation), where L-BFGS starts: near the
    optimum it needs a handful of iterations instead of dozens."""
    grid = torch.linspace(math.log(MIN_TEMPERATURE), math.log(MAX_TEMPERATURE), points, dtype=z.dtype,
                          device=z.device)
    per_chunk = max(1, int(2**22 // max(z.numel(), 1)))  # about 4M elements per evaluation
    losses = []
    with torch.no_grad():
        for chunk in grid.split(per_chunk):
            logp = torch.log_softmax(z.unsqueeze(0) / chunk.exp().view(-1, 1, 1, 1), dim=-1)  # [G, T, N, C]
            index = y.view(1, 1, -1, 1).expand(chunk.numel(), z.shape[0], -1, 1)
            picked = logp.gather(-1, index).squeeze(-1)  # [G, T, N]
            losses.append(-(torch.logsumexp(picked, dim=1) - math.log(z.shape[0])).mean(-1))
    return float(grid[int(torch.cat(losses).argmin())])


def fit_temperature(logits: Tensor, target: Tensor, *, mc: bool = False, max_iter: int = 20) -> float:
    """The temperature ``T`` minimising the NLL of ``target`` on held-out logits.

    Args:
        logits: ``[N, C]`` or ``[N]`` (binary, one logit) for the deterministic prediction;
            ``[T, N, C]`` or ``[T, N]`` for the Monte Carlo predictive (``mc=True``).
        target: ``[N]`` integer classes (binary: 0 or 1).
        mc: whether ``logits`` hold T stochastic samples whose softmaxes are averaged.
        max_iter: L-BFGS iterations on ``log T``, started from the best point of a coarse grid.

    Returns the fitted temperature, clipped to ``[MIN_TEMPERATURE, MAX_TEMPERATURE]``; > 1
    softens an over-confident model. When the NLL has no minimum at a positive temperature
    (every calibration input already classified right, so it keeps falling as ``T -> 0``) it
    returns 1.0 with a :class:`RuntimeWarning` rather than a degenerate sharpening. Works under
    :func:`torch.inference_mode` (it leaves it) and :func:`torch.no_grad` (it enables gradients
    locally).
    """
    with torch.inference_mode(False), torch.enable_grad():
        z = as_class_logits(logits, mc).detach().clone().double()
        y = target.detach().clone().long().flatten().to(z.device)
        if y.numel() != z.shape[1]:
            raise ValueError(f"fit_temperature: {z.shape[1]} inputs in logits but {y.numel()} targets")
        if y.numel() == 0:
            raise ValueError("fit_temperature: the calibration split is empty; give it at least one input")
        if int(y.min()) < 0 or int(y.max()) >= z.shape[-1]:
            raise ValueError(f"fit_temperature: targets must be classes in [0, {z.shape[-1] - 1}], "
                             f"got values in [{int(y.min())}, {int(y.max())}]")
        start = _grid_start(z, y)
        if start <= math.log(MIN_TEMPERATURE) + 1e-9:
            # The NLL still falls as T -> 0: every calibration input is already right with all its
            # probability mass (typical of a small split with no errors), so there is no finite
            # optimum and sharpening would only overfit the split. Keep the model as it is.
            warnings.warn(
                f"fit_temperature: the NLL on the {y.numel()} calibration inputs has no minimum at a positive "
                "temperature (no errors to calibrate against); keeping T = 1. Use a larger calibration split.",
                RuntimeWarning, stacklevel=2)
            return 1.0
        log_t = torch.tensor(start, dtype=torch.float64, device=z.device, requires_grad=True)
        opt = torch.optim.LBFGS([log_t], lr=0.5, max_iter=max_iter, line_search_fn="strong_wolfe")

        def closure() -> Tensor:
            opt.zero_grad()
            loss = _nll(z, y, log_t)
            loss.backward()
            return loss

        opt.step(closure)
        t = float(log_t.detach().exp())
    if not torch.isfinite(torch.tensor(t)):
        t = 1.0
    return min(max(t, MIN_TEMPERATURE), MAX_TEMPERATURE)


@dataclass
class Temperature:
    """An ``output_transform`` dividing logits by a fitted temperature (picklable, checkpointable).

    Pass it to :func:`regfw.uncertainty.mc_predict` (``output_transform=Temperature(t)``) so the
    MC predictive, its entropies and mutual information are those of the calibrated model.
    """

    value: float = 1.0

    def __call__(self, logits: Tensor) -> Tensor:
        if logits.shape[-1] == 1:  # binary: the two-class form, so softmax is sigmoid(z / T)
            logits = torch.cat([torch.zeros_like(logits), logits], dim=-1)
        return logits / self.value


def carve_calibration_split(datamodule: Any, fraction: float, seed: int, batch_size: int = 256) -> Iterable[Any]:
    """A held-out calibration loader taken from the training data of ``datamodule``.

    A data module with a ``calibration_dataloader()`` method provides its own split. Otherwise
    the built-in data modules (tensors ``x_train``/``y_train``) give up ``fraction`` of their
    training inputs, chosen with ``seed``: those are removed from training (``n_train`` shrinks)
    and returned, in order, as the calibration loader. Validation and test data are never used.

    Raises:
        ValueError: ``fraction`` outside (0, 1), too few training inputs, or a data module that
            offers neither a ``calibration_dataloader()`` nor training tensors to carve.
    """
    from torch.utils.data import DataLoader, TensorDataset

    own = getattr(datamodule, "calibration_dataloader", None)
    if callable(own):
        return own()
    if not 0.0 < float(fraction) < 1.0:
        raise ValueError(f"uncertainty.calibration.fraction: got {fraction!r}, expected a fraction in (0, 1)")
    x, y = getattr(datamodule, "x_train", None), getattr(datamodule, "y_train", None)
    if not isinstance(x, Tensor) or not isinstance(y, Tensor):
        raise ValueError(
            f"uncertainty.calibration: the data module {type(datamodule).__name__} has no calibration_dataloader() "
            "and no x_train/y_train tensors to carve a calibration split from. Add a calibration_dataloader() method "
            "returning held-out training data, or set uncertainty.calibration.enabled=false."
        )
    n = x.shape[0]
    n_cal = int(round(n * float(fraction)))
    if n_cal < 1 or n - n_cal < 1:
        raise ValueError(f"uncertainty.calibration.fraction: {fraction!r} of {n} training inputs leaves "
                         f"{n_cal} for calibration and {n - n_cal} for training; choose a fraction that keeps both")
    order = torch.randperm(n, generator=torch.Generator().manual_seed(int(seed) ^ 0x43414C))
    cal, keep = order[:n_cal].sort().values, order[n_cal:].sort().values
    datamodule.x_cal, datamodule.y_cal = x[cal], y[cal]
    datamodule.x_train, datamodule.y_train = x[keep], y[keep]
    if hasattr(datamodule, "n_train"):
        datamodule.n_train = int(keep.numel())
    return DataLoader(TensorDataset(datamodule.x_cal, datamodule.y_cal), batch_size=batch_size, shuffle=False)
