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

The fit is a one-dimensional search over ``log T`` without autograd (a coarse grid, then Newton
steps with closed-form derivatives around its best point), so it runs as it is under Lightning's
:func:`torch.inference_mode`.
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


def _nll_at(z: Tensor, y: Tensor, log_ts: Tensor) -> Tensor:
    """The mean NLL of ``y`` under ``mean_t softmax(z_t / exp(log_t))`` (logsumexp over T) at each
    of the ``log T`` values ``log_ts`` (``[G]``), a few at a time (about 4M elements per batched
    evaluation, no gradients): ``[G]``.

    The classes are moved first (``[C, G, T, N]``), so the logsumexp over the few classes and the
    one over the samples reduce along outer dimensions, vectorised over the inputs: ``log_softmax``
    over a last dimension of 5 classes ran about 20x slower (one short row at a time)."""
    classes = z.permute(2, 0, 1).unsqueeze(1)  # [C, 1, T, N]
    chosen = z.gather(-1, y.view(1, -1, 1).expand(z.shape[0], -1, 1)).squeeze(-1)  # [T, N]
    per_chunk = max(1, int(2**22 // max(z.numel(), 1)))
    log_samples = math.log(z.shape[0])
    losses = []
    for chunk in log_ts.split(per_chunk):
        t = chunk.exp().view(-1, 1, 1)  # [G, 1, 1]
        picked = chosen / t - torch.logsumexp(classes / t, dim=0)  # [G, T, N]: log p_t(y) at each T
        losses.append(-(torch.logsumexp(picked, dim=1) - log_samples).mean(-1))
    return torch.cat(losses)


#: Points of the coarse grid over ``[log MIN_TEMPERATURE, log MAX_TEMPERATURE]`` and of each refinement.
_GRID_POINTS = 25
_REFINE_POINTS = 17
#: The search stops when its step in ``log T`` is below this (a relative error of T under 1e-9).
_LOG_T_TOLERANCE = 1e-9
_NEWTON_STEPS = 60


def _grid_start(z: Tensor, y: Tensor, points: int = _GRID_POINTS) -> float:
    """The best ``log T`` of a coarse grid over ``[log MIN_TEMPERATURE, log MAX_TEMPERATURE]``."""
    grid = torch.linspace(math.log(MIN_TEMPERATURE), math.log(MAX_TEMPERATURE), points, dtype=z.dtype,
                          device=z.device)
    return float(grid[int(_nll_at(z, y, grid).argmin())])


class _LogTObjective:
    """The NLL ``f(u)`` of :func:`_nll_at` at one ``u = log T`` with its first two derivatives in
    ``u``, in closed form (no autograd).

    With ``b = exp(-u)`` and ``d = z - max_c z`` (so every exponential is at most 1):
    ``a_tn = log p_t(y_n) = b d_y - log sum_c exp(b d_c)``, ``da/db = d_y - E_p[d]``,
    ``d2a/db2 = -Var_p[d]``; the mixture ``L_n = logsumexp_t a_tn - log T`` has
    ``dL/db = sum_t w_t da/db`` and ``d2L/db2 = sum_t w_t (d2a/db2 + (da/db)^2) - (dL/db)^2``
    with ``w = softmax_t(a)``; and ``df/du = -b df/db``, ``d2f/du2 = b^2 d2f/db2 + b df/db``.
    The classes are the leading dimension, as in :func:`_nll_at`."""

    def __init__(self, z: Tensor, y: Tensor) -> None:
        shifted = z - z.amax(-1, keepdim=True)  # [T, N, C], <= 0
        self.d = shifted.permute(2, 0, 1).contiguous()  # [C, T, N]
        self.d2 = self.d * self.d
        self.dy = shifted.gather(-1, y.view(1, -1, 1).expand(z.shape[0], -1, 1)).squeeze(-1)  # [T, N]
        self.log_samples = math.log(z.shape[0])

    def __call__(self, u: float) -> tuple[float, float, float]:
        b = math.exp(-u)
        e = torch.exp(self.d * b)
        total = e.sum(0)  # [T, N], >= 1
        mean_d = (e * self.d).sum(0) / total
        var_d = (e * self.d2).sum(0) / total - mean_d * mean_d
        a = self.dy * b - total.log()
        a1 = self.dy - mean_d
        w = torch.softmax(a, dim=0)
        l1 = (w * a1).sum(0)
        l2 = (w * (a1 * a1 - var_d)).sum(0) - l1 * l1
        f = -float((torch.logsumexp(a, dim=0) - self.log_samples).mean())
        fb, fbb = -float(l1.mean()), -float(l2.mean())
        return f, -b * fb, b * b * fbb + b * fb


def _newton_log_t(objective: _LogTObjective, start: float, step: float) -> float | None:
    """The minimum of ``f(u)`` near the grid point ``start`` by Newton's method on ``f'``, safeguarded
    by bisection inside ``[start - step, start + step]`` (``rtsafe``, Numerical Recipes 9.4): a few
    iterations of one small evaluation each. None when it does not end below ``f(start)`` (the
    basin is not the simple one the method assumes; the caller then searches by grid)."""
    lo_bound, hi_bound = math.log(MIN_TEMPERATURE), math.log(MAX_TEMPERATURE)
    lo, hi = max(lo_bound, start - step), min(hi_bound, start + step)
    u = start
    f0, g, h = objective(u)
    for _ in range(_NEWTON_STEPS):
        if g < 0:
            lo = u
        else:
            hi = u
        nxt = u - g / h if h > 0 else math.nan
        if not lo < nxt < hi:
            nxt = 0.5 * (lo + hi)
        done = abs(nxt - u) < _LOG_T_TOLERANCE or hi - lo < _LOG_T_TOLERANCE
        u = nxt
        f, g, h = objective(u)
        if done or g == 0.0:
            break
    else:
        return None
    return u if math.isfinite(f) and f <= f0 + 1e-14 * max(1.0, abs(f0)) else None


def _minimise_log_t(z: Tensor, y: Tensor, start: float, step: float) -> float:
    """Refine the grid minimum ``start`` (grid spacing ``step``) by grid alone: evaluate
    :data:`_REFINE_POINTS` points across ``[best - step, best + step]`` at once, keep the best,
    shrink the spacing 8-fold, until it is below ``1e-7``. The best value never gets worse from
    round to round; slower than :func:`_newton_log_t`, which it backs up."""
    lo, hi = math.log(MIN_TEMPERATURE), math.log(MAX_TEMPERATURE)
    best = start
    while step > 1e-7:
        points = torch.linspace(max(lo, best - step), min(hi, best + step), _REFINE_POINTS, dtype=z.dtype,
                                device=z.device)
        best = float(points[int(_nll_at(z, y, points).argmin())])
        step = 2 * step / (_REFINE_POINTS - 1)
    return best


def fit_temperature(logits: Tensor, target: Tensor, *, mc: bool = False) -> float:
    """The temperature ``T`` minimising the NLL of ``target`` on held-out logits.

    Args:
        logits: ``[N, C]`` or ``[N]`` (binary, one logit) for the deterministic prediction;
            ``[T, N, C]`` or ``[T, N]`` for the Monte Carlo predictive (``mc=True``).
        target: ``[N]`` integer classes (binary: 0 or 1).
        mc: whether ``logits`` hold T stochastic samples whose softmaxes are averaged.

    The minimum over ``log T`` is found by a coarse grid over ``[MIN_TEMPERATURE,
    MAX_TEMPERATURE]``, then by safeguarded Newton steps with the closed-form derivatives around
    its best point (:func:`_newton_log_t`; a finer grid search if those fail), to a relative
    precision of T of about 1e-9: a one-dimensional problem needs no L-BFGS, whose closures and
    line search cost several milliseconds a fit. Returns the fitted temperature, within ``[MIN_TEMPERATURE,
    MAX_TEMPERATURE]``; > 1 softens an over-confident model. When the NLL has no minimum at a
    positive temperature (every calibration input already classified right, so it keeps falling
    as ``T -> 0``) it returns 1.0 with a :class:`RuntimeWarning` rather than a degenerate
    sharpening. Works under :func:`torch.inference_mode` and :func:`torch.no_grad` (it needs no
    gradients).
    """
    with torch.no_grad():
        z = as_class_logits(logits, mc).detach().double()
        y = target.detach().long().flatten().to(z.device)
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
        step = (math.log(MAX_TEMPERATURE) - math.log(MIN_TEMPERATURE)) / (_GRID_POINTS - 1)
        u = _newton_log_t(_LogTObjective(z, y), start, step)
        t = math.exp(_minimise_log_t(z, y, start, step) if u is None else u)
    if not math.isfinite(t):
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
