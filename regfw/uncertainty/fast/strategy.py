"""The ``auto`` strategy itself, registered with :mod:`regfw.uncertainty.sampling` on import.

``auto`` never runs its split where ``batched`` would be faster. The split saves the prefix's
``T - 1`` repeated passes but pays for gathering boundary values and for running the replay node by
node, so where the prefix is small it can cost more than ``batched``. How it decides, by ``choose``:

* ``"predict"`` (the default): from the work of each node counted while the split was checked
  (:mod:`.work`), the split's cost for this call's size (batch rows, samples) is predicted; it runs
  where that is at most :data:`.work.MARGIN` of ``batched``'s, and ``batched`` runs otherwise. The
  prediction depends on the graph and the sizes only, so a seed gives the same samples on every run
  and every machine.
* ``True`` (timed): on the first call for a model and a call size it runs both on the same random
  state, timing each in CPU time (:data:`clock`, all threads; wall time after synchronising on a
  GPU), keeps the split only when it was at least :data:`MARGIN` times faster, and returns the result
  of the one it keeps; later calls of that size run only the choice (``Split.choices``, cached with the
  split: a structural change of the model makes a new split and a new decision). A choice made by
  timing can differ between two runs on one machine, so the samples of a seed may too.
* ``False``: the split whenever the model can be split (tests and benchmarks of the split itself).
"""
from __future__ import annotations

import time
import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from regfw.model_io import OutputKey, select_output
from regfw.uncertainty import sampling as _sampling
from regfw.uncertainty.sampling import DEFAULT_BUDGET_BYTES, batched_strategy, deterministic_pass, uncompiled

from .cache import split_model
from .execute import _execute
from .inputs import pack
from .split import Split

#: The split is kept only when it ran in at most this share of ``batched``'s CPU time on the first call.
MARGIN = 0.95
#: The clock the decision is timed with: CPU time of the process, every thread counted.
clock: Callable[[], float] = time.process_time


def _fall_back(
    model: nn.Module, split: Split, inputs: Any, samples: int, budget_bytes: int | None, kw: dict,
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
    return _batched(model, inputs, samples, budget_bytes, kw, deterministic)


def fast_strategy(
    model: nn.Module,
    inputs: Any,
    samples: int,
    *,
    budget_bytes: int | None = DEFAULT_BUDGET_BYTES,
    chunk_rows: int | None = None,
    choose: bool | str = "predict",
    **kw: Any,
) -> Tensor:
    """The ``auto`` strategy: deterministic prefix once, stochastic part over ``T x B`` rows.

    Same contract as the other strategies (called inside ``mc_mode`` and the forked random
    stream, returns ``[T, B, ...]``). ``budget_bytes`` bounds the activations held at once: the
    boundary values kept for the replay plus one chunk (the prefix itself is run in row chunks
    when one pass over the batch would exceed it and its rows are independent). ``chunk_rows``
    fixes the replay chunk size instead. Falls back to ``batched`` (one warning per model,
    naming the reason) when the model cannot be split. ``choose`` says how the split is weighed
    against ``batched`` (see the module docstring): ``"predict"`` from the graph's work, ``True`` by
    timing both on the first call of each size, ``False`` not at all (the split whenever possible).
    """
    return _run(model, inputs, samples, budget_bytes, chunk_rows, kw, deterministic=False, choose=choose)[0]


def fast_strategy_with_deterministic(
    model: nn.Module,
    inputs: Any,
    samples: int,
    *,
    budget_bytes: int | None = DEFAULT_BUDGET_BYTES,
    chunk_rows: int | None = None,
    choose: bool | str = "predict",
    **kw: Any,
) -> tuple[Tensor, Tensor]:
    """:func:`fast_strategy` and the model's eval-mode output ``[B, ...]`` from the same prefix.

    The deterministic comparison of ``mc_predict(deterministic=True)`` (weight scaling) then costs
    one pass of the stochastic suffix in eval mode instead of a second full pass; the samples are
    exactly those of :func:`fast_strategy`. On fallback the eval output is a separate full pass.
    """
    out, det = _run(model, inputs, samples, budget_bytes, chunk_rows, kw, deterministic=True, choose=choose)
    assert det is not None
    return out, det


def _run(
    model: nn.Module,
    inputs: Any,
    samples: int,
    budget_bytes: int | None,
    chunk_rows: int | None,
    kw: dict,
    deterministic: bool,
    choose: bool | str = "predict",
) -> tuple[Tensor, Tensor | None]:
    if budget_bytes is not None and budget_bytes <= 0:
        raise ValueError(f"budget_bytes must be > 0 or None, got {budget_bytes!r}")
    eager = uncompiled(model)  # a torch.compile wrapper: the split traces and runs the module it wraps
    output_key = kw.get("output_key")
    split = split_model(eager, inputs, output_key=output_key)
    if not split.ok:
        return _fall_back(model, split, inputs, samples, budget_bytes, {"chunk_rows": chunk_rows, **kw}, deterministic)
    packed = pack(inputs)
    first = packed.tensors[0]
    key = (packed.rows, int(samples))
    if choose == "predict":
        choice: str | None = "auto" if split.pays(packed.rows, int(samples)) else "batched"
    elif choose is True:
        choice = split.choices.get(key)
    elif choose is False:
        choice = "auto"
    else:
        raise ValueError(f"choose must be 'predict', True or False, got {choose!r}")
    plain = {"chunk_rows": chunk_rows, **kw}
    if choice == "batched":
        return _batched(model, inputs, samples, budget_bytes, plain, deterministic)
    # a captured graph holds its random operators: the eval output is a pass of its own, made first
    # (as mc_predict's own pass would be); a torch.fx split runs its suffix once in eval mode instead
    separate = deterministic and split.capture != "torch.fx"
    det = deterministic_pass(model, inputs, output_key=output_key) if separate else None
    joint = deterministic and not separate
    key_out = None if split.selects else output_key

    def run() -> tuple[Tensor, Tensor | None]:
        out, det_out = _selected(_execute(split, eager, packed, samples, budget_bytes, chunk_rows, joint), key_out)
        return out, (det if separate else det_out)

    with torch.no_grad():
        if choice == "auto" and split._verified:
            return run()
        state = _rng_state(first)
        timed = choice is None  # choose=True, and this size is not decided yet
        start = _now(first) if timed else 0.0
        try:
            out = run()
        except Exception as exc:  # noqa: BLE001 - a first run that breaks means the split is wrong
            _set_rng_state(first, state)
            split.fallback = f"the split failed on its first run ({type(exc).__name__}: {exc})"
            return _fall_back(model, split, inputs, samples, budget_bytes, plain, deterministic)
        split._verified = True
        if not timed:
            return out
        auto_seconds = _now(first) - start
        after_auto = _rng_state(first)
        _set_rng_state(first, state)  # batched draws from the same state: whichever is kept, a later
        start = _now(first)           # call with this seed returns exactly these samples
        plain_out = _batched(model, inputs, samples, budget_bytes, plain, deterministic)
        batched_seconds = _now(first) - start
        split.timings[key] = (auto_seconds, batched_seconds)
        if auto_seconds <= MARGIN * batched_seconds:
            split.choices[key] = "auto"
            _set_rng_state(first, after_auto)
            return out
        split.choices[key] = "batched"
        return plain_out


def _now(inputs: Tensor) -> float:
    """:data:`clock` on the CPU; on an accelerator the wall clock once its queued work is done (the CPU
    time of a process that only queues kernels says nothing of their cost)."""
    if inputs.device.type == "cuda":
        torch.cuda.synchronize(inputs.device)
        return time.perf_counter()
    return clock()


def _batched(model: nn.Module, inputs: Any, samples: int, budget_bytes: int | None, kw: dict,
             deterministic: bool) -> tuple[Tensor, Tensor | None]:
    """``batched``, and the eval-mode output first when asked (as ``mc_predict``'s own pass would be)."""
    det = deterministic_pass(model, inputs, output_key=kw.get("output_key")) if deterministic else None
    return batched_strategy(model, inputs, samples, budget_bytes=budget_bytes, **kw), det


def _rng_state(inputs: Tensor) -> tuple[Tensor, Tensor | None]:
    """The random state the masks are drawn from: the CPU generator's, and the input device's."""
    device = inputs.device
    other = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
    return torch.random.get_rng_state(), other


def _set_rng_state(inputs: Tensor, state: tuple[Tensor, Tensor | None]) -> None:
    torch.random.set_rng_state(state[0])
    if state[1] is not None:
        torch.cuda.set_rng_state(state[1], inputs.device)


def _selected(result: tuple[Tensor, Tensor | None], output_key: OutputKey) -> tuple[Tensor, Tensor | None]:
    """``output_key`` applied to each sample ``[B, ...]`` of a split run (a model whose output is one
    tensor: the split reproduces it, so each slice is one pass's output) and to the eval output."""
    if output_key is None:
        return result
    out, det = result
    return (torch.stack([select_output(o, output_key) for o in out]),
            None if det is None else select_output(det, output_key))


_sampling.register_strategy("auto", fast_strategy, with_deterministic=fast_strategy_with_deterministic)
