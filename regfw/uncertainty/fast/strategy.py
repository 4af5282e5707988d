"""The ``auto`` strategy itself, registered with :mod:`regfw.uncertainty.sampling` on import."""
from __future__ import annotations

import warnings
from typing import Any

import torch
from torch import Tensor, nn

from regfw.model_io import OutputKey, select_output
from regfw.uncertainty import sampling as _sampling
from regfw.uncertainty.sampling import DEFAULT_BUDGET_BYTES, batched_strategy, deterministic_pass

from .cache import split_model
from .execute import _execute
from .split import Split


def _fall_back(
    model: nn.Module, split: Split, inputs: Tensor, samples: int, budget_bytes: int | None, kw: dict,
    deterministic: bool,
) -> tuple[Tensor, Tensor | None]:
    if not split._warned:
        split._warned = True
        warnings.warn(
            f"Monte Carlo strategy 'auto' uses 'batched' for this {type(model).__name__}: {split.fallback}. "
            "Every sample then runs the whole network; pass strategy='batched' to silence this warning.",
            RuntimeWarning,
            stacklevel=5,
        )
    det = None
    if deterministic:  # before the samples, as mc_predict's own eval pass would be
        det = deterministic_pass(model, inputs, output_key=kw.get("output_key"))
    return batched_strategy(model, inputs, samples, budget_bytes=budget_bytes, **kw), det


def fast_strategy(
    model: nn.Module,
    inputs: Tensor,
    samples: int,
    *,
    budget_bytes: int | None = DEFAULT_BUDGET_BYTES,
    chunk_rows: int | None = None,
    **kw: Any,
) -> Tensor:
    """The ``auto`` strategy: deterministic prefix once, stochastic part over ``T x B`` rows.

    Same contract as the other strategies (called inside ``mc_mode`` and the forked random
    stream, returns ``[T, B, ...]``). ``budget_bytes`` bounds the activations held at once: the
    boundary values kept for the replay plus one chunk (the prefix itself is run in row chunks
    when one pass over the batch would exceed it and its rows are independent). ``chunk_rows``
    fixes the replay chunk size instead. Falls back to ``batched`` (one warning per model,
    naming the reason) when the model cannot be split.
    """
    return _run(model, inputs, samples, budget_bytes, chunk_rows, kw, deterministic=False)[0]


def fast_strategy_with_deterministic(
    model: nn.Module,
    inputs: Tensor,
    samples: int,
    *,
    budget_bytes: int | None = DEFAULT_BUDGET_BYTES,
    chunk_rows: int | None = None,
    **kw: Any,
) -> tuple[Tensor, Tensor]:
    """:func:`fast_strategy` and the model's eval-mode output ``[B, ...]`` from the same prefix.

    The deterministic comparison of ``mc_predict(deterministic=True)`` (weight scaling) then costs
    one pass of the stochastic suffix in eval mode instead of a second full pass; the samples are
    exactly those of :func:`fast_strategy`. On fallback the eval output is a separate full pass.
    """
    out, det = _run(model, inputs, samples, budget_bytes, chunk_rows, kw, deterministic=True)
    assert det is not None
    return out, det


def _run(
    model: nn.Module,
    inputs: Tensor,
    samples: int,
    budget_bytes: int | None,
    chunk_rows: int | None,
    kw: dict,
    deterministic: bool,
) -> tuple[Tensor, Tensor | None]:
    if budget_bytes is not None and budget_bytes <= 0:
        raise ValueError(f"budget_bytes must be > 0 or None, got {budget_bytes!r}")
    split = split_model(model, inputs)
    if not split.ok:
        return _fall_back(model, split, inputs, samples, budget_bytes, {"chunk_rows": chunk_rows, **kw}, deterministic)
    with torch.no_grad():
        if split._verified:
            return _selected(_execute(split, model, inputs, samples, budget_bytes, chunk_rows, deterministic),
                             kw.get("output_key"))
        state = torch.random.get_rng_state()
        try:
            out = _selected(_execute(split, model, inputs, samples, budget_bytes, chunk_rows, deterministic),
                            kw.get("output_key"))
        except Exception as exc:  # noqa: BLE001 - a first run that breaks means the split is wrong
            torch.random.set_rng_state(state)
            split.fallback = f"the split failed on its first run ({type(exc).__name__}: {exc})"
            return _fall_back(model, split, inputs, samples, budget_bytes, {"chunk_rows": chunk_rows, **kw},
                              deterministic)
        split._verified = True
        return out


def _selected(result: tuple[Tensor, Tensor | None], output_key: OutputKey) -> tuple[Tensor, Tensor | None]:
    """``output_key`` applied to each sample ``[B, ...]`` of a split run (a model whose output is one
    tensor: the split reproduces it, so each slice is one pass's output) and to the eval output."""
    if output_key is None:
        return result
    out, det = result
    return (torch.stack([select_output(o, output_key) for o in out]),
            None if det is None else select_output(det, output_key))


_sampling.register_strategy("auto", fast_strategy, with_deterministic=fast_strategy_with_deterministic)
