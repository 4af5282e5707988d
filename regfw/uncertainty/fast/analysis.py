"""Trace, probe and split a model: the deterministic prefix, the replayed part, the boundary
values between them, the replay mode and the memory plan."""
from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch.fx as fx
from torch import Tensor, nn

from regfw.model_io import OutputKey, OutputSelectionError, select_output
from regfw.placement import foreign, tracing
from regfw.placement.surgery import ApplyAfter, ApplyBefore
from regfw.placement.untouched import untouched
from regfw.uncertainty.modes import excluded_ids
from regfw.uncertainty.rng import model_devices
from regfw.uncertainty.sampling import eval_mode, is_stochastic, isolated_rng

from . import work
from .graph import (
    _DROPOUT_FUNCTIONS,
    _aliases_input,
    _closure,
    _cost,
    _describe_target,
    _first_node,
    _fix_inplace,
    _inputs,
    _last_uses,
    _mutates_input,
    _random_op,
    _resolve,
)
from .inputs import Packed, pack
from .layout import _batched, _has_tensor, _layout, _nbytes
from .probes import (
    _PROBE_ROWS,
    _check_covered,
    _check_output,
    _check_probe,
    _declared_shared,
    _Fallback,
    _independent_rows,
    _probe_inputs,
    _record_real,
    _rows_mode_obstacle,
    _run_probe,
)
from .split import Split

#: Hook types the tracer runs itself (pure: they only call a child module). A module with any
#: other hook is an opaque leaf, called as a whole with all its hooks.
TRACEABLE_HOOKS: tuple[type, ...] = (ApplyAfter, ApplyBefore)
_FORWARD_ONLY = tracing.FORWARD_ONLY
#: ``torch.export`` captures per model (one per input signature): each costs about a second of CPU time,
#: and a model whose input shapes keep changing (sequence lengths under dynamic padding) would pay it on
#: most calls; past this number, new signatures are sampled with ``batched``
MAX_CAPTURES = 8


def _analyse(model: nn.Module, inputs: Any, types: tuple, output_key: OutputKey = None,
             may_capture: bool = True) -> Split:
    """Trace, probe and split ``model`` for inputs like ``inputs``; raises :class:`_Fallback`.

    The graph comes from ``torch.fx`` where it traces the model (stochastic modules as calls), else
    from ``torch.export`` (:func:`_capture`: the random operators themselves, captured in MC mode),
    unless ``may_capture`` is False (the model had its share of captures).

    A module that calls ``F.dropout`` in its own ``forward`` (a functional-dropout host, such as a
    timm model's classifier dropout ``drop_rate`` in the model's own ``forward_head``) is traced
    through, its dropout calls the sources (:func:`_host_flags`), so that what comes before them is
    computed once; where that trace fails its checks, the host is called whole, as any stochastic
    module (for the model itself: nothing is computed once)."""
    off = excluded_ids()  # own stochastic layers this call does not sample: deterministic here
    through = {id(m) for _, m, _, _ in foreign.functional_hosts(model)
               if id(m) not in off and not isinstance(m, types)}
    if through:
        try:
            return _analyse_once(model, inputs, types, output_key, may_capture, off, through)
        except _Fallback:
            pass
    return _analyse_once(model, inputs, types, output_key, may_capture, off, set())


def _analyse_once(model: nn.Module, inputs: Any, types: tuple, output_key: OutputKey, may_capture: bool,
                  off: frozenset[int], through: set[int]) -> Split:
    """:func:`_analyse` with the functional-dropout hosts in ``through`` traced through (their ids); ``off``: the
    own stochastic layers this call does not sample (deterministic here)."""
    try:
        packed = pack(inputs)
    except TypeError as exc:
        raise _Fallback(str(exc)) from None
    from torch.nn.modules import module as module_globals

    if module_globals._global_forward_hooks or module_globals._global_forward_pre_hooks:
        raise _Fallback("global module hooks are registered (torch.nn.modules.module.register_module_forward_hook)")
    stochastic = {id(m): (path or "<model>") for path, m in model.named_modules()
                  if is_stochastic(m, types) and id(m) not in off and id(m) not in through}
    x1, x2, distinct = _probe_inputs(packed)
    devices = model_devices(model, packed.tensors[0])

    with isolated_rng(0, devices), eval_mode(model):
        records, real_counts, raw = _record_real(model, x2, stochastic)
    if isinstance(raw, Tensor):
        # unsampled stochastic layers stay leaves of the trace (their forward may branch on tensors), deterministic
        split, mods, why = _trace(model, x2, {**stochastic, **dict.fromkeys(off, "")}, records)
    else:
        split, mods, why = None, {}, f"the model returns {type(raw).__name__}, not one tensor"
    if through:
        if split is None:
            raise _Fallback(why)
        _host_flags(split, model, through)
    if split is None:
        try:
            ref = select_output(raw, output_key)
        except OutputSelectionError as exc:
            raise _Fallback(str(exc)) from None
        if not may_capture:
            raise _Fallback(f"{why}, and its graph was captured with torch.export for {MAX_CAPTURES} input shapes "
                            "already (each capture costs about a second): inputs whose shapes change from call to "
                            "call, such as sequence lengths under dynamic padding, are sampled with 'batched'; pad "
                            "the batches to a few fixed lengths to let auto split")
        split = _capture(model, x2, output_key, why)
        sources = [n for n in _work(split) if _random_op(n)]
        split.sources = sources
        _check_covered(split, real_counts)
        with isolated_rng(0, devices):  # random operators give their stand-ins: no draw, eval values
            env1, _, work1 = _run_probe(split, model, split.graph_input(x1), {}, mods, stand_ins=True)
            env2, _, work2 = _run_probe(split, model, split.graph_input(x2), {}, mods, stand_ins=True)
        _check_output(env2[split.output], ref)
    else:
        ref = raw
        sources = _sources(split, mods, stochastic)
        with eval_mode(model):  # each run on the stream of the real run (random ops in eval agree)
            with isolated_rng(0, devices):
                env1, _, work1 = _run_probe(split, model, x1.value, stochastic, mods)
            with isolated_rng(0, devices):
                env2, calls, work2 = _run_probe(split, model, x2.value, stochastic, mods)
        _check_probe(split, env2[split.output], ref, calls, real_counts, set(sources))

    _partition(split, sources, env2, mods, types)
    n1, n2 = _PROBE_ROWS
    layouts = {n: _layout(env1[n], env2[n], n1, n2) for n in split.nodes if n in env1 and n in env2}
    split.input_layout = layouts[split._placeholder]
    split.boundary = {n: layouts.get(n) for n in split.boundary}
    reason = _rows_mode_obstacle(split, env2, layouts, distinct)
    if reason is None:
        reason = _declared_shared(sources, mods, types)
    if reason is None:
        with isolated_rng(1, devices):
            shared = next((n for n in sources if not _independent_rows(n, env2, layouts, mods, model)), None)
        if shared is not None:
            reason = (f"{_describe_target(shared)!r} gives identical rows for identical inputs (one random "
                      "mask for the whole batch, or no randomness at all in MC mode)")
    split.mode, split.mode_reason = ("rows", None) if reason is None else ("samples", reason)
    _plan_memory(split, env1, env2, layouts, distinct)
    linear = work.per_row(work1, work2, _PROBE_ROWS)
    split.prefix_work = work.total(linear, split._prefix)
    split.replay_work = work.total(linear, split.replay)
    return split


def _trace(model: nn.Module, x: Packed, stochastic: dict[int, str], records: dict) -> tuple[Split | None, dict, str]:
    """The ``torch.fx`` graph as a fresh :class:`Split` and the modules its nodes call, by target; or
    ``(None, {}, why)`` when ``torch.fx`` cannot trace the model."""
    leaves = [m for m in model.modules() if id(m) in stochastic]
    unpack = None if x.template is None else x.unpack
    try:
        # a forward that caches what it computes keeps no proxy of this trace; a module compiled in place
        # (``module.compile()``) is traced through its own Python code, which its compiled call runs
        with untouched(model), _eager_calls(model):
            graph = tracing.trace(tracing.Root(model, unpack), leaves, hooks=TRACEABLE_HOOKS, records=records)
    except Exception as exc:  # noqa: BLE001 - any tracing failure means: capture with torch.export
        return None, {}, f"torch.fx cannot trace it: {_first_line(exc)}"
    split = Split(mode="rows")
    split.nodes = list(graph.nodes)
    split._placeholder = next(n for n in split.nodes if n.op == "placeholder")
    out = next(n for n in split.nodes if n.op == "output").args[0]
    if not isinstance(out, fx.Node):
        raise _Fallback("the traced graph does not return one tensor")
    split.output = out
    split._targets = tuple(sorted({n.target for n in split.nodes if n.op == "call_module"}))
    try:
        mods = {t: _resolve(model, t) for t in split._targets}
    except AttributeError as exc:
        raise _Fallback(f"a traced module could not be found again ({exc})") from None
    return split, mods, ""


@contextlib.contextmanager
def _eager_calls(model: nn.Module) -> Iterator[None]:
    """The modules of ``model`` compiled in place (``module.compile()``) call their own ``forward`` while
    the block runs (``torch.fx`` cannot trace a compiled call); the compiled calls are restored after."""
    compiled = [(m, m._compiled_call_impl) for m in model.modules() if getattr(m, "_compiled_call_impl", None)]
    for m, _ in compiled:
        m._compiled_call_impl = None
    try:
        yield
    finally:
        for m, impl in compiled:
            m._compiled_call_impl = impl


def _host_flags(split: Split, model: nn.Module, through: set[int]) -> None:
    """Let each dropout call traced inside a functional-dropout host in ``through`` read the host's
    ``training`` flag when it runs, not the value the flag had while tracing: the probes run in eval
    mode, the samples in MC mode, the deterministic suffix in eval mode again. Raises
    :class:`_Fallback` when a host's dropout is not among the traced calls (it would be lost).

    The graph then holds the rates the hosts passed (``split.holds_rates``); a change of a host's scalar
    attributes makes a new split (:meth:`Split.hosts_changed`)."""
    graph = split.nodes[0].graph
    seen: set[int] = set()
    paths: set[str] = set()
    for node in list(split.nodes):
        spec = _DROPOUT_FUNCTIONS.get(node.target) if node.op == "call_function" else None
        stack = node.meta.get("nn_module_stack") or {}
        if spec is None or not stack:
            continue
        path = next(reversed(stack.values()))[0]  # the innermost module calling it
        host = _resolve(model, path)
        if id(host) not in through:
            continue
        with graph.inserting_before(node):
            flag = graph.create_node("get_attr", f"{path}.training", (), {})
        name, pos, _ = spec
        if len(node.args) > pos:
            node.args = (*node.args[:pos], flag, *node.args[pos + 1:])
        else:
            node.kwargs = {**node.kwargs, name: flag}
        seen.add(id(host))
        paths.add(path)
    if seen != through:
        raise _Fallback("a functional-dropout host's dropout call is not in the traced graph")
    split.nodes = list(graph.nodes)
    split.holds_rates = True
    split.host_paths = tuple(sorted(paths))
    split.host_scalars = split.scalars_of_hosts(model)


def _first_line(exc: BaseException) -> str:
    return f"{type(exc).__name__}: " + (str(exc).strip().splitlines() or [""])[0]


def _capture(model: nn.Module, x: Packed, output_key: OutputKey, why: str) -> Split:
    """The graph ``torch.export`` captures of the model in MC mode (the modes it is in), every
    dimension that carries the batch symbolic, as a fresh :class:`Split` whose output is the tensor
    ``output_key`` selects; ``why``: what stopped ``torch.fx``."""
    import torch

    flat = x.tensors
    batch = torch.export.Dim("batch")
    dynamic = tuple({0: batch} if b else None for b in x.batched)

    def unpack(values: Any) -> tuple[tuple, dict]:
        return x.unpack(values[0] if x.template is None else tuple(values))

    try:
        with untouched(model):
            program = tracing.export(tracing.Call(model, unpack, lambda out: select_output(out, output_key)),
                                     flat, dynamic_shapes=(dynamic,))  # one entry: the *flat arguments
        graph = tracing.executable(program)
    except Exception as exc:  # noqa: BLE001 - both captures failed: say why for each
        raise _Fallback(f"{why}; torch.export cannot capture it either ({_first_line(exc)})") from None
    split = Split(mode="rows", capture="torch.export", capture_note=why, selects=True, holds_rates=True)
    split.nodes = list(graph.nodes)
    split._placeholder = next(n for n in split.nodes if n.op == "placeholder")
    split.output = next(n for n in split.nodes if n.op == "output").args[0]
    return split


def _work(split: Split) -> list:
    return [n for n in split.nodes if n.op not in ("placeholder", "output")]


def _sources(split: Split, mods: dict, stochastic: dict[int, str]) -> list:
    """Stochastic modules, opaque modules that contain one, and random ops."""
    sources = []
    for node in _work(split):
        if node.op == "call_module":
            mod = mods[node.target]
            if id(mod) in stochastic:
                sources.append(node)
                continue
            hooked = set()  # children the traced hooks call are nodes of their own
            if node.meta.get(_FORWARD_ONLY):
                hooked = {h.name for h in (*mod._forward_pre_hooks.values(), *mod._forward_hooks.values())}
            inner = [c for name, c in mod.named_children() if name not in hooked]
            if any(id(d) in stochastic for c in inner for d in c.modules()):
                sources.append(node)
        elif _random_op(node):
            sources.append(node)
    return sources


def _partition(split: Split, sources: list, env: dict, mods: dict, types: tuple) -> None:
    """Fill ``replay``, the prefix, ``boundary`` (keys) and ``mutated``.

    Stochastic: the sources and everything downstream (grown by :func:`_fix_inplace`). The
    replay also recomputes the non-tensor values it reads (``x.shape[0]`` gives the chunk's rows,
    not ``B``; a host's ``training`` flag is read in the mode the replay runs in); those stay in the
    prefix as well when the prefix reads them.
    """
    work = _work(split)
    stoch = _closure(set(sources), work)
    stoch = _fix_inplace([split._placeholder, *work], stoch, mods, types)
    replay = set(stoch)
    todo = list(replay)
    while todo:
        node = todo.pop()
        for inp in _inputs(node):
            if inp not in replay and inp.op in ("call_function", "call_method", "get_attr") \
                    and not _has_tensor(env.get(inp)):
                replay.add(inp)
                todo.append(inp)
    split.sources = sources
    split.replay = [n for n in work if n in replay]
    split._prefix = [n for n in work if n not in stoch]
    boundary = [n for n in [split._placeholder, *split._prefix]
                if n not in replay and any(u in replay for u in n.users)]
    if split.output not in replay and split.output not in boundary:
        boundary.append(split.output)
    split.boundary = dict.fromkeys(boundary)
    for node in split.replay:  # boundary values the replay writes to in place are copied per chunk
        if _mutates_input(node, mods):
            base = _first_node(node)
            while base is not None and base in replay and _aliases_input(base, mods, types):
                base = _first_node(base)
            if base is not None and base in split.boundary:
                split.mutated.add(base)


def _plan_memory(split: Split, env1: dict, env2: dict, layouts: dict, distinct: bool) -> None:
    """(constant, per-row) bytes of every value from the two probes, and the peaks they add up to."""
    n1, n2 = _PROBE_ROWS
    per_node = {}
    for node in split.nodes:
        if node in env1 and node in env2:
            b1, b2 = _nbytes(env1[node]), _nbytes(env2[node])
            r = max(0, (b2 - b1) // (n2 - n1))
            per_node[node] = (max(0, b1 - n1 * r), r)
    keep = set(split.boundary)
    split._prefix_free = _last_uses(split._prefix, {split._placeholder, *split._prefix})
    split._replay_free = _last_uses(split.replay, set(split.replay) | keep)
    shifted = {i + 1: dead for i, dead in split._prefix_free.items()}
    split.prefix_cost = _cost([split._placeholder, *split._prefix], shifted, keep, per_node)
    b_c = sum(per_node.get(n, (0, 0))[0] for n in keep)
    b_r = sum(per_node.get(n, (0, 0))[1] for n in keep)
    split.boundary_cost = (b_c, b_r)
    r_c, r_r = _cost(split.replay, split._replay_free, set(), per_node)
    split.replay_cost = (r_c + b_c, r_r + b_r)  # boundary values enter each chunk as gathered copies
    depends = _closure({split._placeholder}, _work(split))
    split.prefix_chunkable = distinct and all(
        _batched(layouts.get(n)) for n in split._prefix if n in depends and _has_tensor(env2.get(n))
    )
