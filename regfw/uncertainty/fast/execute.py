"""Running a split: the prefix once (in row chunks when over budget), then the replay over
``T x B`` rows in chunks (or T passes over ``B`` rows in the ``samples`` mode)."""
from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from regfw.uncertainty.sampling import chunk_rows_for

from .graph import _eval, _resolve
from .inputs import Packed
from .layout import _alloc, _gather, _nbytes, _write
from .split import RunStats, Split


def _even_chunks(total: int, rows: int) -> list[tuple[int, int]]:
    """``[start, stop)`` chunks of at most about ``rows`` rows, near-equal, at least 2 rows each."""
    rows = max(1, min(rows, total))
    n = math.ceil(total / rows)
    if total >= 2:
        n = max(1, min(n, total // 2))
    base, extra = divmod(total, n)
    out, start = [], 0
    for i in range(n):
        stop = start + base + (1 if i < extra else 0)
        out.append((start, stop))
        start = stop
    return out


def _modules(split: Split, model: nn.Module) -> dict:
    """The modules the split calls, by target: resolved once (about 10 us a target on a deep
    model) and kept on the split without a reference to ``model`` itself."""
    if split._mods is None:
        mods = {t: _resolve(model, t) for t in split._targets}
        split._mods = {t: (None if m is model else m) for t, m in mods.items()}
        return mods
    if any(m is None for m in split._mods.values()):
        return {t: (model if m is None else m) for t, m in split._mods.items()}
    return split._mods


def _run_prefix(split: Split, model: nn.Module, mods: dict, rows: Tensor) -> dict:
    env: dict = {split._placeholder: rows}
    keep = split.boundary
    free = split._prefix_free
    for i, node in enumerate(split._prefix):
        env[node] = _eval(node, env, mods, model)
        for dead in free.get(i, ()):
            if dead not in keep:
                env.pop(dead, None)
    return {n: env[n] for n in keep}


def _suffix_once(split: Split, model: nn.Module, mods: dict, values: dict) -> Tensor:
    """The replayed nodes once over the ``B`` rows of the batch, in eval mode: the deterministic
    (weight-scaled) prediction, from the prefix values the samples reuse.

    Equal to a separate eval-mode pass of the model: the prefix holds no stochastic node, so its
    values are the same in eval and in MC mode, and the probes checked that the graph run in eval
    mode reproduces the model's eval output.
    """
    env = {n: _gather(v, split.boundary[n], None, n in split.mutated) for n, v in values.items()}
    # Under mc_mode only the stochastic modules train, and each lies inside a module the replay
    # calls or is a host whose flag it reads: switching those off is eval mode for the replay, without
    # walking the whole model
    # (``model.eval()`` on a 200-module network costs about as much as a small suffix).
    on = [m for node in split.replay if node.op == "call_module" for m in mods[node.target].modules() if m.training]
    on += [host for host in (_resolve(model, path) for path in split.host_paths) if host.training]
    try:
        for m in on:
            m.training = False
        for i, node in enumerate(split.replay):
            env[node] = _eval(node, env, mods, model)
            for dead in split._replay_free.get(i, ()):
                if dead is not split.output:
                    env.pop(dead, None)
    finally:
        for m in on:
            m.training = True
    return env[split.output]


def _execute(
    split: Split,
    model: nn.Module,
    packed: Packed,
    samples: int,
    budget: int | None,
    chunk_rows: int | None,
    deterministic: bool = False,
) -> tuple[Tensor, Tensor | None]:
    """``([T, B, ...] samples, [B, ...] eval-mode output or None)``; the eval output, when asked for,
    is computed after the prefix and before any sample, so the masks are those of a run without it
    (a ``torch.fx`` split only: a captured graph holds its random operators, not modules to switch off)."""
    mods = _modules(split, model)
    inputs = split.graph_input(packed)
    device = packed.tensors[0].device
    b = packed.rows
    stats = RunStats(samples=samples, batch=b, budget_bytes=budget)
    c_p, r_p = split.prefix_cost
    c_b, r_b = split.boundary_cost
    kept_est = c_b + r_b * b
    prefix_rows = b
    if budget is not None and split.prefix_chunkable and c_p + r_p * b > budget and r_p > 0:
        prefix_rows = max(2, (budget - kept_est - c_p) // r_p)
    if prefix_rows >= b:
        values = _run_prefix(split, model, mods, inputs)
        stats.prefix_chunks = 1
        prefix_peak = c_p + r_p * b
    else:
        values = {}
        chunks = _even_chunks(b, prefix_rows)
        for start, stop in chunks:
            part = _run_prefix(split, model, mods,
                               _gather(inputs, split.input_layout, torch.arange(start, stop, device=device), False))
            for node, v in part.items():
                layout = split.boundary[node]
                if node not in values:
                    values[node] = _alloc(v, layout, stop - start, b)
                _write(values[node], v, layout, start)
        stats.prefix_chunks = len(chunks)
        prefix_peak = kept_est + c_p + r_p * max(stop - start for start, stop in chunks)
    kept = sum(_nbytes(v) for v in values.values())
    stats.kept_bytes = kept

    out_node = split.output
    if out_node not in set(split.replay):  # the output does not depend on any stochastic node
        det = values[out_node]
        stats.planned_peak_bytes = prefix_peak
        split.last_run = stats
        return det.unsqueeze(0).expand(samples, *det.shape).clone(), (det.clone() if deterministic else None)
    det_out = _suffix_once(split, model, mods, values) if deterministic else None

    c_r, r_r = split.replay_cost
    total = samples * b
    if split.mode == "samples":
        chunks = [(t * b, (t + 1) * b) for t in range(samples)]
    else:
        if chunk_rows is None:
            chunk_rows = total if budget is None or r_r == 0 else max(2, (budget - kept - c_r) // r_r)
            chunk_rows = chunk_rows_for(chunk_rows, r_r, device)  # the chunks batched runs on this device
        elif chunk_rows < 1:
            raise ValueError(f"chunk_rows must be >= 1, got {chunk_rows!r}")
        chunks = _even_chunks(total, int(chunk_rows))
    largest = max(stop - start for start, stop in chunks)
    stats.chunks, stats.chunk_rows = len(chunks), largest
    stats.planned_peak_bytes = max(prefix_peak, kept + c_r + r_r * largest)

    result: Tensor | None = None
    free = split._replay_free
    mutated = split.mutated
    for start, stop in chunks:
        rows = None if split.mode == "samples" else torch.arange(start, stop, device=device) % b
        env = {n: _gather(v, split.boundary[n], rows, n in mutated) for n, v in values.items()}
        for i, node in enumerate(split.replay):
            env[node] = _eval(node, env, mods, model)
            for dead in free.get(i, ()):
                if dead is not out_node:
                    env.pop(dead, None)
        y = env[out_node]
        if result is None:
            result = y.new_empty((total, *y.shape[1:]))
        result[start:stop] = y
    split.last_run = stats
    assert result is not None
    return result.view(samples, b, *result.shape[1:]), det_out
