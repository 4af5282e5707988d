"""Monte Carlo dropout sampling: T stochastic forward passes of a model, with dropout on.

Gal & Ghahramani 2016 ("Dropout as a Bayesian Approximation") show that a network trained with
dropout, run at test time with dropout still active, samples from an approximate posterior
predictive. :func:`mc_predict` does exactly that, and nothing else changes:

* only the stochastic modules (:func:`stochastic_modules`) are put in training mode; every
  other module, BatchNorm in particular, stays in eval mode, so running statistics are used
  and never updated (:func:`mc_mode`); every module's ``training`` flag is restored after;
* the masks come from a random stream of their own: sampling runs inside
  :func:`torch.random.fork_rng` seeded from ``seed`` (or a fresh seed / a dedicated
  :class:`torch.Generator`), so the global RNG state -- and with it training -- is exactly as
  if sampling had never happened (:func:`isolated_rng`);
* everything runs under :func:`torch.no_grad`.

Inputs and outputs follow :mod:`regfw.model_io`: ``inputs`` is a tensor, a dict of keyword
arguments (``input_ids``, ``attention_mask``...) or a tuple of positional arguments, each pass is
``call_model(model, inputs)``, and the tensor sampled from each pass's output is
``select_output(output, output_key)`` (default: the output itself when it is a tensor, else its
``logits``, else its lone tensor), so a Hugging Face model is sampled as it is, with no wrapper.

How the T passes are computed is a *strategy*, a function in :data:`STRATEGIES`::

    fn(model, inputs, samples, *, budget_bytes, **kw) -> Tensor[T, B, ...]

called inside :func:`mc_mode` and :func:`isolated_rng`; ``kw`` holds ``output_key`` when one is
set, and a strategy runs each pass as :func:`forward_output` (:func:`regfw.model_io.model_output`)
does. Built in: ``"loop"`` (T full passes) and ``"batched"`` (the batch repeated T times, run in
chunks that fit ``budget_bytes``).
``"auto"`` is the dependency-aware strategy of :mod:`regfw.uncertainty.fast`, which registers
itself on import (the package :mod:`regfw.uncertainty` imports it; this module never imports it,
so the two form no import cycle); while it is not registered ``"auto"`` means ``"batched"``.
"""
from __future__ import annotations

import sys
import weakref
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from regfw.model_io import OutputKey, call_model
from regfw.model_io import model_output as forward_output
from regfw.placement import foreign
from regfw.tensors import iter_tensors, split_mean_variance
from regfw.train.batch import batch_size, index_batch
from regfw.uncertainty.accepted import check_inputs
from regfw.uncertainty.modes import (
    TORCH_STOCHASTIC_TYPES,
    ModelIndex,
    checked_index,
    eval_mode,
    excluding,
    is_stochastic,
    mc_mode,
    model_index,
    require_stochastic,
    stochastic_modules,
    stochastic_types,
)
from regfw.uncertainty.own_layers import excluded
from regfw.uncertainty.rng import derive_seed, isolated_rng, resolve_seed, rng_devices
from regfw.uncertainty.summaries import (
    ClassificationSummary,
    RegressionSummary,
    accumulation_dtype,
    class_softmax,
    classes_last,
    classification_summary,
    dense_classification_summary,
    mixture_ll_elements,
    regression_summary,
)

__all__ = [
    "TORCH_STOCHASTIC_TYPES",
    "DEFAULT_BUDGET_BYTES",
    "DEFAULT_SAMPLES",
    "STRATEGIES",
    "WITH_DETERMINISTIC",
    "TASKS",
    "MCResult",
    "mc_predict",
    "mc_mode",
    "eval_mode",
    "isolated_rng",
    "is_stochastic",
    "stochastic_modules",
    "stochastic_types",
    "register_strategy",
    "resolve_strategy",
    "loop_strategy",
    "batched_strategy",
    "estimate_row_bytes",
    "chunk_rows_for",
    "deterministic_pass",
    "forward_output",
    "scan_functional_dropout",
    "uncompiled",
    "derive_seed",
    "split_mean_logvar",
]

#: Default memory budget of the ``batched`` strategy for the activations of one chunk.
DEFAULT_BUDGET_BYTES: int = 256 * 2**20
#: On a CPU a chunk holds about this many activation bytes at most (fewer where the budget says so): cache-sized
#: chunks reuse memory that is already mapped, where one big chunk takes fresh pages for every tensor. An MLP
#: 784-512-512-10 with dropout on every layer, batch 256 and T = 30, ran in 0.85x the CPU time in chunks of 1024
#: rows than in one chunk of 7680.
CPU_CHUNK_BYTES: int = 1 * 2**20
#: ... but at least this many rows: per-chunk Python cost and small matrix products (the same MLP ran 1.45x slower
#: in chunks of 64 rows than of 1024).
CPU_MIN_ROWS: int = 1024
#: Default number of Monte Carlo samples T.
DEFAULT_SAMPLES: int = 30
TASKS: tuple[str, ...] = ("classification", "regression")

Strategy = Callable[..., Tensor]


# --------------------------------------------------------------------------- strategies


def _first_row(inputs: Any) -> Any:
    """The first example of ``inputs`` (every tensor with the batch dimension sliced to one row)."""
    return inputs[:1] if isinstance(inputs, Tensor) else index_batch(inputs, slice(0, 1))


def _has_rows(inputs: Any) -> bool:
    if isinstance(inputs, Tensor):
        return inputs.dim() > 0
    try:
        return batch_size(inputs) > 0
    except TypeError:
        return False


def uncompiled(model: nn.Module) -> nn.Module:
    """The module that a ``torch.compile`` wrapper (``OptimizedModule``) runs, or ``model`` itself.

    What regfw observes in Python as a forward runs (the functional-dropout watch, the fx trace of
    the ``auto`` split) needs the eager module: a compiled forward runs none of that Python. The
    samples of ``loop`` and ``batched`` still come from the compiled module.
    """
    frame = sys.modules.get("torch._dynamo.eval_frame")  # not imported: nothing was compiled
    if frame is not None and isinstance(model, frame.OptimizedModule):
        return uncompiled(model._orig_mod)
    return model


def _needs_scan(model: nn.Module, index: ModelIndex) -> nn.Module | None:
    """The eager module to watch for functional dropout (:func:`uncompiled`), or None when the
    model as it is now was watched already."""
    eager = uncompiled(model)
    return eager if foreign.needs_scan(eager, len(index.modules) + 1 if eager is model else None) else None


def scan_functional_dropout(model: nn.Module, inputs: Any, index: ModelIndex | None = None) -> None:
    """Find the modules of ``model`` that call ``F.dropout`` in their forward (one eval-mode pass
    of one row, :func:`regfw.placement.foreign.watch_functional_dropout`), unless the model as it is now was
    watched already; the hosts found are then switched on by :func:`mc_mode`."""
    index = model_index(model) if index is None else index
    eager = _needs_scan(model, index)
    if eager is not None and _has_rows(inputs):
        with eval_mode(model, index=index), foreign.watch_functional_dropout(eager):
            call_model(eager, _first_row(inputs))


def deterministic_pass(model: nn.Module, inputs: Any, index: ModelIndex | None = None,
                       output_key: OutputKey = None) -> Tensor:
    """The eval-mode output of ``model`` (weight scaling, the comparison of
    ``mc_predict(deterministic=True)``), every flag restored after. The pass also serves as the
    functional-dropout scan when the model needs one (:func:`scan_functional_dropout`).

    The one eval pass of Monte Carlo prediction: :func:`mc_predict` runs it for strategies without
    a ``with_deterministic`` variant, and the ``auto`` strategy when it falls back to ``batched``.
    """
    index = model_index(model) if index is None else index
    eager = _needs_scan(model, index)
    if eager is None:
        with eval_mode(model, index=index):
            return forward_output(model, inputs, output_key)
    with eval_mode(model, index=index), foreign.watch_functional_dropout(eager):
        return forward_output(eager, inputs, output_key)


def loop_strategy(model: nn.Module, inputs: Any, samples: int, *, budget_bytes: int | None = None,
                  output_key: OutputKey = None, **kw: Any) -> Tensor:
    """T full forward passes of the batch, stacked: ``[T, B, ...]``. Memory of one pass."""
    return torch.stack([forward_output(model, inputs, output_key) for _ in range(samples)])


def chunk_rows_for(budget_rows: int, row_bytes: int, device: torch.device) -> int:
    """Rows per chunk: ``budget_rows`` (what the memory budget allows), on a CPU at most
    :data:`CPU_CHUNK_BYTES` of activations but never under :data:`CPU_MIN_ROWS` rows. Used by ``batched``
    and by the replay of ``auto``'s split, each with its own count of a row's bytes."""
    if device.type != "cpu" or row_bytes <= 0:
        return budget_rows
    return min(budget_rows, max(CPU_MIN_ROWS, CPU_CHUNK_BYTES // row_bytes))


def estimate_row_bytes(model: nn.Module, row: Any, output_key: OutputKey = None) -> int:
    """Estimate the activation memory of one input row in one forward pass, in bytes.

    One probe pass of the single row ``row`` (batch size 1) is run with forward hooks on every
    leaf module. The estimate is::

        bytes(input row) + 2 * (sum of the output bytes of every leaf module + root output)

    Under ``no_grad`` each intermediate is freed once consumed, so the sum over all module
    outputs is an upper bound for what the modules hold at once; the factor 2 covers tensors
    made by functional operations between modules (``F.relu``, ``torch.cat``, views made
    contiguous), which have no hook. Activations scale linearly with the number of rows, so a
    chunk of ``n`` rows is estimated at ``n`` times this value. Weights are not counted (they
    are already resident) and neither is the final ``[T, B, ...]`` output buffer.
    """
    total = 0

    def hook(_m: nn.Module, _inp: Any, out: Any) -> None:
        nonlocal total
        for t in iter_tensors(out):
            total += t.numel() * t.element_size()

    leaves = [m for m in model.modules() if next(m.children(), None) is None and m is not model]
    handles = [m.register_forward_hook(hook) for m in leaves]
    try:
        out = forward_output(model, row, output_key)
    finally:
        for h in handles:
            h.remove()
    total += out.numel() * out.element_size()
    in_bytes = sum(t.numel() * t.element_size() for t in iter_tensors(row))
    return max(1, in_bytes + 2 * total)


def batched_strategy(
    model: nn.Module,
    inputs: Any,
    samples: int,
    *,
    budget_bytes: int | None = DEFAULT_BUDGET_BYTES,
    chunk_rows: int | None = None,
    output_key: OutputKey = None,
    **kw: Any,
) -> Tensor:
    """The batch repeated T times (sample-major rows ``t * B + b``), run in chunks.

    A dict (or tuple) of inputs is repeated tensor by tensor: every tensor whose first dimension is
    the batch size B (ids, attention masks, decoder inputs, pixel values) gets the same rows, other
    values (flags, tensors broadcast over the batch) are passed as they are
    (:func:`regfw.train.batch.index_batch`).

    Each chunk holds at most ``chunk_rows`` rows; by default ``budget_bytes //
    estimate_row_bytes(...)`` (at least 1), so a large ``T x B`` runs in several passes
    instead of failing with out-of-memory, and on a CPU at most about 1 MiB of activations but no
    fewer than 1024 rows (:func:`chunk_rows_for`; cache-sized chunks run faster there). The
    repeated batch is never materialised: each chunk gathers its own rows. ``budget_bytes=None``
    means one chunk (on a CPU, as the CPU rule allows).

    A model with a batch-shared stochastic module (``batch_shared = True``, e.g. weight drop:
    one mask per forward pass) runs as ``loop`` instead: repeated rows in one pass would all see
    the same mask, giving T copies of one sample.
    """
    if any(getattr(m, "batch_shared", False) or foreign.is_batch_shared(m) for _, m in stochastic_modules(model)):
        return loop_strategy(model, inputs, samples, budget_bytes=budget_bytes, output_key=output_key, **kw)
    b = batch_size(inputs)
    total = samples * b
    if chunk_rows is None:
        if budget_bytes is not None and budget_bytes <= 0:
            raise ValueError(f"budget_bytes must be > 0 or None, got {budget_bytes!r}")
        row_bytes = estimate_row_bytes(model, _first_row(inputs), output_key)
        budget_rows = total if budget_bytes is None else max(1, int(budget_bytes) // row_bytes)
        chunk_rows = chunk_rows_for(budget_rows, row_bytes, next(iter_tensors(inputs)).device)
    elif chunk_rows < 1:
        raise ValueError(f"chunk_rows must be >= 1, got {chunk_rows!r}")
    chunk_rows = min(int(chunk_rows), total)
    out: Tensor | None = None
    for start in range(0, total, chunk_rows):
        stop = min(start + chunk_rows, total)
        if isinstance(inputs, Tensor) and start == 0 and stop == total and samples > 1:
            rows = inputs.repeat(samples, *([1] * (inputs.dim() - 1)))
        elif isinstance(inputs, Tensor):
            rows = inputs.index_select(0, torch.arange(start, stop, device=inputs.device) % b)
        else:
            device = next(iter_tensors(inputs)).device
            rows = index_batch(inputs, torch.arange(start, stop, device=device) % b, b)
        y = forward_output(model, rows, output_key)
        if out is None:
            out = y.new_empty((total, *y.shape[1:]))
        out[start:stop] = y
    assert out is not None
    return out.view(samples, b, *out.shape[1:])


#: Registered sampling strategies, by name. ``"auto"`` is added by :mod:`regfw.uncertainty.fast`.
STRATEGIES: dict[str, Strategy] = {
    "loop": loop_strategy,
    "batched": batched_strategy,
}


#: Per strategy name, an optional variant that also returns the eval-mode output from shared work:
#: ``fn(model, inputs, samples, *, budget_bytes, **kw) -> (Tensor[T, B, ...], Tensor[B, ...])``,
#: called like the strategy (inside :func:`mc_mode`); it must draw the same masks as the strategy.
WITH_DETERMINISTIC: dict[str, Callable[..., tuple[Tensor, Tensor]]] = {}


def register_strategy(name: str, fn: Strategy, *, with_deterministic: Callable[..., Any] | None = None) -> None:
    """Register (or replace) the strategy ``name``; see the module docstring for the contract.

    ``with_deterministic``: the same strategy also returning the deterministic (eval-mode) output,
    computed from work it shares (``auto``: the cached prefix, the suffix once in eval mode);
    :func:`mc_predict` uses it instead of a second full pass when ``deterministic=True``.
    """
    if not callable(fn):
        raise TypeError(f"strategy {name!r} must be callable, got {fn!r}")
    STRATEGIES[name] = fn
    WITH_DETERMINISTIC.pop(name, None)
    if with_deterministic is not None:
        WITH_DETERMINISTIC[name] = with_deterministic


def resolve_strategy(name: str) -> str:
    """The registered strategy name that ``name`` stands for (``"auto"`` may become ``"batched"``)."""
    if name == "auto" and "auto" not in STRATEGIES:
        return "batched"
    if name not in STRATEGIES:
        known = sorted({*STRATEGIES, "auto"})
        raise ValueError(f"strategy must be one of {known}, got {name!r}")
    return name


# --------------------------------------------------------------------------- mc_predict


@dataclass
class MCResult:
    """All T stochastic outputs of :func:`mc_predict` and their summaries.

    Attributes of :attr:`summary` are reachable directly, e.g. ``result.mutual_information``
    or ``result.mean_probs`` (classification), ``result.variance`` (regression).

    Regression outputs keep the dtype the model (or ``output_transform``) produced: float64 stays
    float64 end to end; float16 and bfloat16 are summarised in float32.
    """

    outputs: Tensor  #: ``[T, B, ...]`` the raw model outputs (logits or means)
    summary: ClassificationSummary | RegressionSummary
    task: str
    strategy: str  #: the strategy that ran (``"auto"`` resolved)
    seed: int  #: the seed of the MC masks; pass it again to reproduce them
    deterministic: Tensor | None = None  #: ``[B, ...]`` raw eval-mode output
    probs: Tensor | None = None  #: ``[T, B, C]`` softmax of the logits (classification)
    variances: Tensor | None = None  #: ``[T, B, ...]`` predicted variances (regression)
    tau: float | None = None  #: the noise precision the regression samples were summarised with

    @property
    def samples(self) -> int:
        """The number of Monte Carlo samples T."""
        return int(self.outputs.shape[0])

    def score(self, name: str) -> Tensor:
        """Per-input uncertainty score ``[B]``; see the summaries' ``score``."""
        return self.summary.score(name)

    def _mixture_tau(self, tau: float | None) -> float | None:
        """The noise precision of the mixture: the one :func:`mc_predict` sampled with, or ``tau``
        when none was stored; a ``tau`` that differs from the stored one is an error."""
        if self.task != "regression":
            raise ValueError("ll_mixture / nll_mixture is the regression likelihood (task='regression'); for "
                             "classification use the mean probabilities (mc/nll)")
        if tau is None:
            return self.tau
        if self.variances is not None:
            raise ValueError(
                f"tau={tau!r} given, but these samples carry predicted variances, which the mixture uses; "
                f"leave tau out")
        if self.tau is not None and float(tau) != self.tau:
            raise ValueError(
                f"tau={tau!r} differs from the tau={self.tau!r} these samples were drawn and summarised with "
                f"(mc_predict(..., tau={self.tau!r})); leave tau out to use the stored value, or sample again "
                f"with mc_predict(..., tau={tau!r})")
        return float(tau)

    def ll_mixture(self, targets: Tensor, tau: float | None = None) -> Tensor:
        """Regression: per-input test log-likelihood ``[B]`` (nats per output element, higher is
        better) of ``targets`` under the mixture of the T Gaussians, Gal & Ghahramani 2016's
        predictive log-likelihood; see :func:`regfw.uncertainty.summaries.mixture_ll_elements`.
        Uses the predicted variances when the model has them, otherwise the ``tau`` given to
        :func:`mc_predict` (stored in :attr:`tau`). ``tau`` here is only needed when none was
        stored; a different value from the stored one raises ``ValueError`` naming both."""
        tau = self._mixture_tau(tau)
        summary = self.summary
        assert isinstance(summary, RegressionSummary)
        means = summary.sample_means if summary.sample_means is not None else self.outputs
        if self.variances is None and tau is None:
            raise ValueError(
                "the mixture log-likelihood needs a noise precision: pass mc_predict(..., tau=...) "
                "(uncertainty.tau in a config) or give the model predicted variances (an output_transform "
                "returning (means, variances), e.g. split_mean_logvar)")
        return mixture_ll_elements(means, targets, self.variances, None if self.variances is not None else tau)

    def nll_mixture(self, targets: Tensor, tau: float | None = None) -> Tensor:
        """The negative of :meth:`ll_mixture` (``[B]``, nats per output element, lower is better)."""
        return -self.ll_mixture(targets, tau)

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__") or name == "summary":
            raise AttributeError(name)
        try:
            summary = object.__getattribute__(self, "summary")
        except AttributeError:
            raise AttributeError(name) from None
        try:
            return getattr(summary, name)
        except AttributeError:
            raise AttributeError(f"{type(self).__name__!s} has no attribute {name!r}") from None


def check_spread(model: nn.Module, outputs: Tensor, strategy: str) -> None:
    """Raise when T samples are all identical although some stochastic module has a rate > 0:
    those modules were not random, and zero variance must never be reported silently."""
    if outputs.shape[0] < 2 or outputs.numel() == 0 or not bool(torch.all(outputs == outputs[:1])):
        return
    named = [(p or "<model>", m) for p, m in stochastic_modules(model)]
    names = ", ".join(f"{p} ({type(m).__name__}, rate {foreign.get_rate(m)})" for p, m in named[:8])
    more = f" and {len(named) - 8} more" if len(named) > 8 else ""
    raise RuntimeError(
        f"Monte Carlo dropout ({strategy!r}) drew {outputs.shape[0]} identical samples although these modules "
        f"have a rate > 0 and should have been random: {names}{more}. Either a module stays deterministic in "
        f"training mode (a fused inference path, dropout applied under a flag regfw does not set, a custom "
        f"stochastic layer regfw does not know of: subclass regfw.layers.base.StochasticModule or declare the "
        f"type through the regfw_stochastic_types hook), or what they drop is zero (e.g. a residual branch "
        f"whose last BatchNorm is zero-initialised, as timm and torchvision do before training)"
    )


OutputTransform = Callable[[Tensor], Tensor | Sequence[Tensor]]

#: Per model: ``(index, setting, selected) -> the own stochastic layers not sampled``, recomputed when the
#: model's index changes (a walk over the model per Monte Carlo call would cost more than the call's bookkeeping).
_NOT_SAMPLED: weakref.WeakKeyDictionary[nn.Module, tuple[tuple[ModelIndex, tuple], list[nn.Module]]] = (
    weakref.WeakKeyDictionary())


def not_sampled(model: nn.Module, index: ModelIndex, setting: str,
                selected: Iterable[str] | None) -> list[nn.Module]:
    """The model's own stochastic layers ``setting`` leaves in eval mode (:mod:`regfw.uncertainty.own_layers`)."""
    key = (setting, None if selected is None else frozenset(selected))
    held = _NOT_SAMPLED.get(model)
    if held is not None and held[0][0] is index and held[0][1] == key:
        return held[1]
    found = excluded(model, setting, selected)
    _NOT_SAMPLED[model] = ((index, key), found)
    return found


def split_mean_logvar(outputs: Tensor) -> tuple[Tensor, Tensor]:
    """``output_transform`` for heteroscedastic regression: the last dimension holds the means
    followed by the log-variances (``2 * D`` values); returns ``(means, variances)``."""
    return split_mean_variance(outputs, link="exp")


def _check_samples(samples: Any) -> int:
    if isinstance(samples, bool) or not isinstance(samples, int) or samples < 2:
        raise ValueError(
            f"samples must be an integer >= 2 (Monte Carlo dropout needs at least two stochastic "
            f"passes to measure disagreement), got samples={samples!r}; 20-50 is usual"
        )
    return samples


def _summarise(
    task: str,
    outputs: Tensor,
    det: Tensor | None,
    tau: float | None,
    transform: OutputTransform | None,
) -> tuple[Any, Tensor | None, Tensor | None]:
    def apply(x: Tensor) -> Any:
        return x if transform is None else transform(x)

    if task == "classification":
        logits = apply(outputs)
        if isinstance(logits, (tuple, list)):
            raise TypeError("for classification, output_transform must return one tensor of logits")
        if logits.dim() != 3:
            if logits.dim() < 3:
                raise ValueError(
                    f"classification needs logits of shape [B, C], [B, L, V] or [B, C, H, W] per pass "
                    f"([T, B, ...] stacked), got {tuple(logits.shape)}; use task='regression' for other outputs"
                )

            d = None if det is None else classes_last(apply(det.unsqueeze(0)))[0]
            return dense_classification_summary(classes_last(logits), d, DEFAULT_BUDGET_BYTES), None, None
        probs = class_softmax(accumulation_dtype(logits))
        det_probs = None
        if det is not None:
            det_probs = torch.softmax(accumulation_dtype(apply(det.unsqueeze(0))), dim=-1)[0]
        return classification_summary(probs, det_probs), probs, None
    out = apply(outputs)
    means, variances = (out[0], out[1]) if isinstance(out, (tuple, list)) else (out, None)
    det_mean = None
    if det is not None:
        d = apply(det.unsqueeze(0))
        det_mean = (d[0] if isinstance(d, (tuple, list)) else d)[0]
    means = accumulation_dtype(means)
    variances = None if variances is None else accumulation_dtype(variances)
    summary = regression_summary(means, variances, tau=tau, deterministic_mean=det_mean)
    return summary, None, variances


def mc_predict(
    model: nn.Module,
    inputs: Any,
    samples: int = DEFAULT_SAMPLES,
    strategy: str = "auto",
    budget_bytes: int | None = DEFAULT_BUDGET_BYTES,
    seed: int | None = None,
    task: str = "classification",
    *,
    generator: torch.Generator | None = None,
    tau: float | None = None,
    output_transform: OutputTransform | None = None,
    output_key: OutputKey = None,
    deterministic: bool = True,
    sample_model_stochastic: str = "auto",
    selected: Iterable[str] | None = None,
    **strategy_kwargs: Any,
) -> MCResult:
    """Monte Carlo dropout prediction: ``samples`` stochastic passes of ``model`` on ``inputs``.

    Args:
        model: any module whose output (selected by ``output_key``) is logits ``[B, C]``
            (classification) or means ``[B, ...]`` (regression), with at least one stochastic
            module; a Hugging Face model as it is.
        inputs: a batch on the model's device: a tensor (first dimension B), a dict of keyword
            arguments or a tuple of positional arguments whose tensors have B rows
            (:func:`regfw.model_io.call_model`); every strategy repeats all of them.
        samples: T >= 2.
        strategy: a name in :data:`STRATEGIES`, or ``"auto"`` (the fastest available).
        budget_bytes: activation memory allowed per chunk (``batched``); None = unlimited.
        seed: seed of the masks; None draws one from ``generator`` or, without it, a fresh
            non-deterministic one. The seed used is returned as ``result.seed``.
        task: ``"classification"`` (softmax of logits) or ``"regression"``.
        tau: regression only, fixed noise precision (aleatoric variance ``1 / tau``), in the units
            of the output; kept as ``result.tau`` for :meth:`MCResult.ll_mixture`.
        output_transform: maps the stacked raw outputs ``[T, B, ...]`` to logits
            (classification) or to means / ``(means, variances)`` (regression), e.g.
            :func:`split_mean_logvar`; applied after ``output_key``'s selection.
        output_key: which tensor of each pass's output is sampled
            (:func:`regfw.model_io.select_output`): None (a tensor; else the ``logits`` entry;
            else the lone tensor), a key, a position or a callable ``output -> Tensor``.
        deterministic: also compute the eval-mode output (weight scaling) for comparison: one
            more pass for ``loop`` and ``batched``; under ``auto`` only the stochastic suffix, run
            once in eval mode on the cached prefix.
        sample_model_stochastic: which of the model's own stochastic layers (stochastic depth,
            attention dropout, its own ``nn.Dropout``) are sampled: ``"auto"`` those of a kind in
            ``selected``, ``"all"``, or ``"none"`` (only regfw's); see :mod:`regfw.uncertainty.own_layers`.
        selected: the kinds the user selected regularizers for (``"dropout"``, ``"drop_path"``,
            ``"attention_dropout"``); by default read off the layers regfw inserted.
        strategy_kwargs: passed to the strategy (e.g. ``chunk_rows`` for ``batched``).

    The global RNG state, every module's ``training`` flag and BatchNorm statistics are the
    same after the call as before.

    Raises:
        ValueError: ``samples < 2``; no stochastic module with a rate > 0 in ``model``;
            unknown ``task`` or ``strategy``.
        regfw.model_io.OutputSelectionError: ``output_key`` finds no tensor in the model's output
            (the message names what the output holds).
        RuntimeError: all T samples identical although some module has a rate > 0 (the
            message names those modules).
    """
    samples = _check_samples(samples)
    if task not in TASKS:
        raise ValueError(f"task must be one of {list(TASKS)}, got {task!r}")
    if task == "classification" and tau is not None:
        raise ValueError("tau (noise precision) applies to task='regression' only")
    name = resolve_strategy(strategy)
    check_inputs(inputs, name)
    fn = STRATEGIES[name]
    if output_key is not None:
        strategy_kwargs = {**strategy_kwargs, "output_key": output_key}
    used_seed = resolve_seed(seed, generator)
    index = model_index(model)
    with torch.no_grad(), isolated_rng(used_seed, rng_devices(model, inputs, [model, *index.modules])):
        det = None
        joint = WITH_DETERMINISTIC.get(name) if deterministic else None
        # inside the fork too, in case a module is random even in eval mode
        if deterministic and joint is None:
            det = deterministic_pass(model, inputs, index, output_key)
        else:
            scan_functional_dropout(model, inputs, index)
        if index.functional != foreign.functional_generation():  # the scan found functional-dropout hosts
            index = model_index(model, index.types)
        stoch = require_stochastic(model, index)
        off = not_sampled(model, index, sample_model_stochastic, selected)
        if off:
            stoch = [m for m in stoch if all(m is not o for o in off)]
            if not stoch:
                raise ValueError(
                    f"Monte Carlo dropout has nothing to sample: sample_model_stochastic={sample_model_stochastic!r} "
                    f"leaves all {len(off)} of the model's own stochastic layers in eval mode and regfw inserted none; "
                    "select a dropout regularizer, or pass sample_model_stochastic='all'")
        with excluding(off), mc_mode(model, stoch, index=index), checked_index(model, index):
            if joint is not None:  # the eval-mode output from the strategy's shared work (one pass less)
                outputs, det = joint(model, inputs, samples, budget_bytes=budget_bytes, **strategy_kwargs)
            else:
                outputs = fn(model, inputs, samples, budget_bytes=budget_bytes, **strategy_kwargs)
        if not isinstance(outputs, Tensor) or outputs.dim() < 2 or outputs.shape[0] != samples:
            shape = tuple(outputs.shape) if isinstance(outputs, Tensor) else type(outputs).__name__
            raise RuntimeError(f"strategy {name!r} must return a tensor [T={samples}, B, ...], got {shape}")
        check_spread(model, outputs, name)
        summary, probs, variances = _summarise(task, outputs, det, tau, output_transform)
    return MCResult(
        outputs=outputs,
        summary=summary,
        task=task,
        strategy=name,
        seed=used_seed,
        deterministic=det,
        probs=probs,
        variances=variances,
        tau=None if tau is None else float(tau),
    )
