"""The result of the analysis: :class:`Split` (what is computed once, what is replayed) and
:class:`RunStats` (how its last call ran)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch.fx as fx
from torch import nn

from . import work
from .graph import _describe_target, _eval, _resolve
from .inputs import Packed, pack

__all__ = ["RunStats", "Split"]


@dataclass
class RunStats:
    """How the last call of a split was executed (for benchmarks and tests)."""

    samples: int = 0
    batch: int = 0
    prefix_chunks: int = 0  #: passes of the deterministic prefix (1 unless over budget)
    chunks: int = 0  #: passes of the replay
    chunk_rows: int = 0  #: largest replay chunk, in rows
    kept_bytes: int = 0  #: boundary activations held for the whole replay
    planned_peak_bytes: int = 0  #: estimated activation peak: kept + largest chunk (or prefix chunk)
    budget_bytes: int | None = None


@dataclass(eq=False)
class Split:
    """The deterministic / stochastic split of one model for one input signature.

    ``fallback`` is the reason the split cannot be used (then ``batched`` runs); otherwise
    ``mode`` is ``"rows"`` (one replay over ``T x B`` rows, chunked) or ``"samples"`` (T replays
    over ``B`` rows, see ``mode_reason``).
    """

    fallback: str | None = None
    mode: str = "fallback"
    mode_reason: str | None = None
    #: how the graph was captured: ``"torch.fx"`` (stochastic modules called as modules) or
    #: ``"torch.export"`` (the random operators themselves, captured in MC mode; ``capture_note``
    #: says what stopped ``torch.fx``)
    capture: str = "torch.fx"
    capture_note: str | None = None
    selects: bool = False  #: the graph's output is already the tensor ``output_key`` selects
    #: the graph holds rates as numbers (a captured graph; dropout calls traced inside their host): a
    #: change of :attr:`rates` makes a new split
    holds_rates: bool = False
    #: the stochastic modules' rates the graph was made with
    rates: tuple = ()
    #: the functional-dropout hosts traced through (paths under the tracing wrapper) and their scalar
    #: attributes then (:meth:`hosts_changed`): the rate they pass is a number in the graph
    host_paths: tuple = ()
    host_scalars: tuple = ()
    input_layout: Any = field(default=None, repr=False)  #: where the batch is in the graph's input
    nodes: list = field(default_factory=list, repr=False)
    replay: list = field(default_factory=list, repr=False)  #: replayed nodes, in graph order
    sources: list = field(default_factory=list, repr=False)  #: stochastic source nodes
    boundary: dict = field(default_factory=dict, repr=False)  #: node -> layout, prefix values the replay reads
    mutated: set = field(default_factory=set, repr=False)  #: boundary nodes the replay changes in place
    output: Any = field(default=None, repr=False)
    prefix_chunkable: bool = False
    prefix_cost: tuple = (0, 0)  #: (constant, per-row) bytes of the prefix at its peak
    replay_cost: tuple = (0, 0)  #: (constant, per-row) bytes of one replay chunk at its peak
    boundary_cost: tuple = (0, 0)  #: (constant, per-row) bytes of the kept boundary values
    #: (constant, per-row) work of the prefix and of one replay pass (:mod:`.work`): what ``auto``'s
    #: choice between the split and ``batched`` is predicted from
    prefix_work: tuple = (0.0, 0.0)
    replay_work: tuple = (0.0, 0.0)
    last_run: RunStats = field(default_factory=RunStats)
    _prefix: list = field(default_factory=list, repr=False)
    _prefix_free: dict = field(default_factory=dict, repr=False)
    _replay_free: dict = field(default_factory=dict, repr=False)
    _targets: tuple = field(default=(), repr=False)
    #: ``_targets`` resolved to the modules (None for the model itself, which is not referenced),
    #: on first run; the cache gives a new split whenever the module tree changes
    _mods: dict | None = field(default=None, repr=False)
    _placeholder: Any = field(default=None, repr=False)
    #: ``(batch rows, samples)`` -> ``"auto"`` or ``"batched"``: which of the two the strategy runs for
    #: calls of that size, timed on the first such call with ``choose=True`` (:mod:`.strategy`)
    choices: dict = field(default_factory=dict)
    #: ``(batch rows, samples)`` -> ``(auto seconds, batched seconds)``: the CPU times that decided it
    timings: dict = field(default_factory=dict)
    _verified: bool = field(default=False, repr=False)  #: ran once without error
    _warned: bool = field(default=False, repr=False)  #: the fallback warning was given

    def scalars_of_hosts(self, model: nn.Module) -> tuple:
        """The float and bool attributes (``drop_rate``, flags) of the hosts traced through, as they are now
        (not ints: a forward may count its calls in one)."""
        hosts = (_resolve(model, path) for path in self.host_paths)
        return tuple(tuple((k, v) for k, v in vars(m).items() if isinstance(v, (bool, float)) and k != "training")
                     for m in hosts)

    def hosts_changed(self, model: nn.Module) -> bool:
        """Whether a host traced through has changed a float or bool attribute since (its rate, a flag its
        forward reads): the graph holds what they were."""
        return bool(self.host_paths) and self.scalars_of_hosts(model) != self.host_scalars

    @property
    def ok(self) -> bool:
        """True when the split is used (no fallback)."""
        return self.fallback is None

    def predicted_ratio(self, rows: int, samples: int) -> float:
        """The split's predicted cost over ``batched``'s for a call of this size (:func:`.work.predicted_ratio`)."""
        passes = samples if self.mode == "samples" else 1
        return work.predicted_ratio(self.prefix_work, self.replay_work, self.boundary_cost, rows, samples,
                                    (len(self._prefix), len(self.replay)), passes)

    def reused_share(self, rows: int) -> float:
        """The share of one pass's work the split computes once for ``rows`` rows (:func:`.work.reused_share`)."""
        return work.reused_share(self.prefix_work, self.replay_work, rows)

    def pays(self, rows: int, samples: int) -> bool:
        """Whether the split reuses at least :data:`.work.MIN_REUSED` of a pass's work and is predicted to
        cost at most :data:`.work.MARGIN` times ``batched`` for a call of this size."""
        return (self.reused_share(rows) >= work.MIN_REUSED
                and self.predicted_ratio(rows, samples) <= work.MARGIN)

    @property
    def deterministic_names(self) -> list[str]:
        """Names of the nodes computed once (graph order)."""
        replay = set(self.replay)
        return [n.name for n in self.nodes if n not in replay and n.op not in ("placeholder", "output")]

    @property
    def replay_names(self) -> list[str]:
        """Names of the nodes computed for every sample (graph order)."""
        return [n.name for n in self.replay]

    @property
    def source_targets(self) -> list[str]:
        """The stochastic sources: module paths (``m.`` is the model) or op names."""
        return [_describe_target(n) for n in self.sources]

    def node_targets(self) -> list[str]:
        """Every node's target (module path, function or method name), graph order."""
        return [_describe_target(n) for n in self.nodes]

    def describe(self) -> str:
        """A few lines: what is computed once, what is replayed, and how."""
        if not self.ok:
            return f"fallback to 'batched': {self.fallback}"
        work = [n for n in self.nodes if n.op in ("call_module", "call_function", "call_method")]
        replay = set(self.replay)
        once = sum(1 for n in work if n not in replay)
        lines = [
            f"graph: {self.capture}" + (f" ({self.capture_note})" if self.capture_note else ""),
            f"mode {self.mode}" + (f" ({self.mode_reason})" if self.mode_reason else ""),
            f"{once} of {len(work)} ops computed once; {len(work) - once} replayed per sample",
            "stochastic sources: " + ", ".join(self.source_targets),
            "boundary: " + ", ".join(n.name for n in self.boundary),
        ]
        return "\n".join(lines)

    def graph_input(self, packed: Packed) -> Any:
        """The graph's one input for these inputs: the tensor itself or the flat tuple of tensors
        (a captured graph always takes the tuple)."""
        return packed.tensors if self.capture == "torch.export" else packed.value

    def graph_forward(self, model: nn.Module, inputs: Any) -> Any:
        """Run the whole traced graph on ``inputs`` (in the model's current modes)."""
        mods = {t: _resolve(model, t) for t in self._targets}
        env: dict = {self._placeholder: self.graph_input(pack(inputs))}
        for node in self.nodes:
            if node.op == "placeholder":
                continue
            if node.op == "output":
                return fx.node.map_arg(node.args[0], env.__getitem__)
            env[node] = _eval(node, env, mods, model)
        raise RuntimeError("graph without output")  # pragma: no cover
