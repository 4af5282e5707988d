"""The checks a split passes before it is used, run on 2 and 3 rows of the real inputs: the traced
graph reproduces the model and sees every stochastic call; rows stay independent; every stochastic
node draws its randomness per row (else the replay runs one sample at a time)."""
from __future__ import annotations

import math
from typing import Any

import torch
import torch.fx as fx
from torch import Tensor, nn

from regfw.placement import tracing
from regfw.uncertainty.sampling import is_stochastic

from .graph import _describe_target, _eval, _inputs
from .inputs import Packed, with_value
from .layout import (
    _Batch,
    _batched,
    _clean,
    _has_tensor,
    _layout_leaves,
    _nbytes,
    _repeat_row,
    _rows_differ,
    _same,
    _Seq,
)
from .split import Split
from .work import WorkMeter

_PROBE_ROWS = (2, 3)  # the two probe batch sizes (not 1: squeeze() would hide the batch dim)
_INDEPENDENCE_COPIES = 64  # copies of one row for the per-row randomness check
_INDEPENDENCE_TRIALS = 3
_INDEPENDENCE_FIRST = 4  # copies in a first, cheap trial: enough for a layer that draws per element
_INDEPENDENCE_BYTES = 16 * 2**20  # fewer copies (at least 8, more trials) for rows larger than this / 64


class _Fallback(Exception):
    """The split cannot be used; the message is the reason."""


def _probe_inputs(packed: Packed) -> tuple[Packed, Packed, bool]:
    """``(x1, x2, distinct)``: 2 and 3 rows of the inputs, x2 extending x1 (every tensor with the
    batch dimension takes the same rows; the others are kept whole).

    Distinct rows are chosen when the batch has them (rows that mix would go unnoticed on
    identical rows); one floating-point tensor with fewer distinct rows gets slightly shifted copies.
    """
    n1, n2 = _PROBE_ROWS
    rows = [t for t, b in zip(packed.tensors, packed.batched, strict=True) if b]
    device = rows[0].device
    chosen = [0]
    for i in range(1, min(packed.rows, 64)):
        if all(any(not torch.equal(t[i], t[j]) for t in rows) for j in chosen):
            chosen.append(i)
            if len(chosen) == n2:
                break
    distinct = len(chosen) == n2
    idx = torch.tensor([chosen[i % len(chosen)] for i in range(n2)], device=device)
    pairs = list(zip(packed.tensors, packed.batched, strict=True))
    taken = [t.index_select(0, idx.to(t.device)) if b else t for t, b in pairs]
    if packed.template is None and not distinct and taken[0].is_floating_point():
        x = taken[0]
        step = torch.arange(n2, device=x.device, dtype=x.dtype).view(-1, *([1] * (x.dim() - 1)))
        taken[0] = x * (1.0 + 0.05 * step) + 0.01 * step  # distinct even for rows of zeros
        distinct = True
    first = [t[:n1] if b else t for t, b in zip(taken, packed.batched, strict=True)]
    if packed.template is None:
        return with_value(packed, first[0]), with_value(packed, taken[0]), distinct
    return with_value(packed, tuple(first)), with_value(packed, tuple(taken)), distinct


def _record_real(model: nn.Module, x: Packed, stochastic: dict[int, str]) -> tuple[dict, dict, Any]:
    """One real eval pass: output structure of every module call, stochastic call counts, output."""
    records: dict[int, list] = {}
    raws: dict[int, list] = {}
    counts = {path: 0 for path in stochastic.values()}
    handles = []

    def raw_hook(m: nn.Module, args: Any, out: Any) -> None:
        raws.setdefault(id(m), []).append(tracing.structure(out))

    def final_hook(m: nn.Module, args: Any, out: Any) -> None:
        raw = raws.get(id(m), [None]).pop(0) if raws.get(id(m)) else None
        records.setdefault(id(m), []).append((raw, tracing.structure(out)))

    def count_hook(m: nn.Module, args: Any) -> None:
        counts[stochastic[id(m)]] += 1

    try:
        for m in model.modules():
            handles.append(m.register_forward_hook(raw_hook, prepend=True))
            handles.append(m.register_forward_hook(final_hook))
            if id(m) in stochastic:
                handles.append(m.register_forward_pre_hook(count_hook))
        args, kwargs = x.unpack(x.value)
        out = model(*args, **kwargs)
    finally:
        for h in handles:
            h.remove()
    return records, counts, out


def _run_probe(split: Split, model: nn.Module, x: Any, stochastic: dict[int, str], mods: dict,
               stand_ins: bool = False) -> tuple[dict, dict, dict]:
    """Run the whole graph on ``x`` keeping every value; also which node called which stochastic
    module, and the work of each node (:class:`.work.WorkMeter`). ``stand_ins``: random operators give
    their deterministic stand-ins (a captured graph)."""
    current: list = [None]
    calls: dict[str, list] = {path: [] for path in stochastic.values()}
    handles = []

    def count_hook(m: nn.Module, args: Any) -> None:
        calls[stochastic[id(m)]].append(current[0])

    try:
        for m in model.modules():
            if id(m) in stochastic:
                handles.append(m.register_forward_pre_hook(count_hook))
        env: dict = {split._placeholder: x}
        with WorkMeter() as meter:
            for node in split.nodes:
                if node.op in ("placeholder", "output"):
                    continue
                current[0] = meter.node = node
                env[node] = _eval(node, env, mods, model, stand_ins)
    finally:
        for h in handles:
            h.remove()
    return env, calls, meter.work


def _check_output(got: Any, ref: Tensor) -> None:
    """The graph gives the model's output."""
    if not isinstance(got, Tensor) or not _same(got, ref):
        diff: Any = "shape"
        if isinstance(got, Tensor) and got.shape == ref.shape:
            diff = (got.float() - ref.float()).abs().max().item()
        raise _Fallback(f"the traced graph does not reproduce the model's output (difference: {diff})")


def _check_covered(split: Split, real_counts: dict) -> None:
    """Every stochastic module the model calls draws in a random operator of a captured graph (a
    module whose randomness the capture fixed to a constant, e.g. drawn by Python's ``random``,
    would be the same in every sample)."""
    covered = {tracing.own_path(path) for node in split.sources
               for path, _ in (node.meta.get("nn_module_stack") or {}).values()}
    for path, count in real_counts.items():
        if count and (path if path != "<model>" else "") not in covered:
            raise _Fallback(f"stochastic module {path!r} draws nothing random in the graph torch.export captured")


def _check_probe(split: Split, got: Any, ref: Tensor, calls: dict, real_counts: dict, sources: set) -> None:
    """The graph gives the model's output and calls every stochastic module where the split sees it."""
    _check_output(got, ref)
    for path, seen in calls.items():
        if len(seen) != real_counts.get(path, 0):
            raise _Fallback(
                f"stochastic module {path!r} is called {real_counts.get(path, 0)} time(s) by the model "
                f"but {len(seen)} time(s) by the traced graph"
            )
        hidden = [n for n in seen if n not in sources]
        if hidden:
            raise _Fallback(
                f"stochastic module {path!r} is called inside {_describe_target(hidden[0])!r}, where the "
                "split cannot see it (from a hook that is not regfw's, or from a leaf module's forward)"
            )


def _rows_mode_obstacle(split: Split, env: dict, layouts: dict, distinct: bool) -> str | None:
    """Why the replay cannot run as one pass over ``T x B`` independent rows (None: it can)."""
    if not distinct:
        return "the batch has fewer than 3 distinct rows, so mixing of rows cannot be ruled out"
    for node in split.replay:
        if _has_tensor(env[node]) and not _batched(layouts[node]):
            return f"{_describe_target(node)!r} ({node.name}) mixes batch rows or has no batch dimension"
    for node, layout in split.boundary.items():
        if _has_tensor(env.get(node)) and not _clean(layout):
            return f"the replay reads {node.name}, whose batch rows cannot be separated"
    if layouts.get(split.output) != _Batch(0, 1):
        return "the output's first dimension is not the batch"
    return None


def _declared_shared(sources: list, mods: dict, types: tuple) -> str | None:
    """Why some source draws a batch-shared mask by declaration (None: none does).

    A module with ``batch_shared = True`` (weight drop: one weight mask per forward pass) inside a
    source makes the rows of one replay share that mask, even when the same source also draws per
    row (an LSTM with weight drop and locked dropout on its output, both run by the LSTM's hooks):
    the per-row check below would pass on the per-row part alone and T samples would reuse a
    handful of weight masks. Such a split replays one sample at a time, exactly like ``loop``.
    """
    for node in sources:
        if node.op != "call_module":
            continue
        for m in mods[node.target].modules():
            if getattr(m, "batch_shared", False) and is_stochastic(m, types):
                return (f"{_describe_target(node)!r} draws one random mask for the whole batch "
                        f"({type(m).__name__} declares batch_shared)")
    return None


def _independent_rows(node: fx.Node, env: dict, layouts: dict, mods: dict, model: nn.Module) -> bool:
    """Whether a stochastic node draws its randomness per row: identical rows in, different rows out.

    Runs the node on 4 copies of one probe row, then, unless their rows differ, on 64 copies (fewer
    for large rows, with more trials), up to 3 times. A module that draws one mask for the whole
    batch (weight drop) gives identical rows every time. A per-row module gives identical rows with a
    probability like ``(1 - p) ** 63`` per trial (DropPath, one draw per row); then the samples mode,
    slower but exact, is chosen.
    """
    if node.op != "call_module":
        return True  # random functions and methods draw per element
    out_layout = layouts.get(node)
    per_row = isinstance(out_layout, _Seq) and any(isinstance(x, _Batch) for x in _layout_leaves(out_layout))
    if not isinstance(out_layout, _Batch) and not per_row:
        return False
    arg_nodes = _inputs(node)
    if not any(isinstance(layouts.get(a), (_Batch, _Seq)) for a in arg_nodes):
        return False
    first = next((a for a in arg_nodes if isinstance(layouts.get(a), _Batch)), None)
    row = 0
    if first is not None:
        lay, val = layouts[first], env[first]
        norms = [float(val.narrow(lay.d, r * lay.k, lay.k).abs().sum()) for r in range(val.shape[lay.d] // lay.k)]
        row = max(range(len(norms)), key=norms.__getitem__) if norms else 0
    row_bytes = sum(_nbytes(_repeat_row(env[a], layouts.get(a), row, 1)) for a in arg_nodes
                    if isinstance(layouts.get(a), (_Batch, _Seq)))
    copies = max(8, min(_INDEPENDENCE_COPIES, _INDEPENDENCE_BYTES // max(1, row_bytes)))
    trials = max(_INDEPENDENCE_TRIALS, math.ceil(_INDEPENDENCE_COPIES * _INDEPENDENCE_TRIALS / copies))
    def repeated(n: int) -> dict:
        # attributes (a host's training flag) are read now, in MC mode, not as the eval-mode probe saw them
        return {a: (_eval(a, {}, mods, model) if a.op == "get_attr"
                    else _repeat_row(env[a], layouts.get(a), row, n)) for a in arg_nodes}

    try:
        # a first trial on a few copies settles a layer that draws per element; the full trials decide the rest
        few = min(_INDEPENDENCE_FIRST, copies)
        if _rows_differ(_eval(node, repeated(few), mods, model), out_layout, few):
            return True
        local = repeated(copies)
        return any(_rows_differ(_eval(node, local, mods, model), out_layout, copies) for _ in range(trials))
    except Exception:  # noqa: BLE001 - cannot tell: assume shared, the samples mode is exact
        return False
