"""Fast Monte Carlo dropout: run the deterministic part of the network once, sample only the rest.

MC dropout (Gal & Ghahramani 2016, "Dropout as a Bayesian Approximation") needs T stochastic
passes, and the usual implementations re-run the whole network T times (a loop, or the batch
repeated T times). Everything upstream of the first stochastic layer is identical in every pass.
The ``"auto"`` strategy registered here computes it once:

1. **Trace** the model with :mod:`torch.fx`. regfw inserts dropout as a child ``regfw_<name>`` of
   an anchor module, called from a forward hook (:class:`regfw.placement.surgery.ApplyAfter` /
   :class:`~regfw.placement.surgery.ApplyBefore`); fx would treat the anchor (``nn.Linear``, ``nn.ReLU``...)
   as an opaque leaf and never see the hook, so the tracer here runs those hooks itself and the
   injected module becomes a node of its own. Stochastic modules are leaves, except a module whose
   own ``forward`` calls ``F.dropout`` (timm's classifier dropout ``drop_rate``, in the model's own
   ``forward_head``): it is traced through, each dropout call reading the module's ``training``
   flag when it runs, so what comes before the call is computed once; a change of one of its scalar
   attributes (the rate) makes a new trace. Where that trace fails a check below (its forward reads
   its flag for anything else), the module is a leaf after all. A module compiled in place
   (``module.compile()``) is traced through its own ``forward``.
   Where fx cannot trace the model (Hugging Face models; a model returning a ``ModelOutput`` or a
   dict), the graph is **captured** with ``torch.export`` in MC mode, every dimension carrying the
   batch symbolic, its output the tensor ``output_key`` selects: it holds the random operators
   themselves (tagged ``nondeterministic_seeded``: dropout masks, attention with ``dropout_p``),
   which are then the stochastic sources, and the rates as numbers (a rate change makes a new
   capture). The inputs may be a dict or tuple of arguments: the graph takes their tensors as one
   flat tuple, and each tensor with the batch's rows (ids, attention masks) follows the rows.
2. **Split** by dependency: a node is *stochastic* when it is a stochastic module, a random op
   (``torch.rand``, ``F.dropout(training=True)``, ``bernoulli_``...), or has a stochastic input.
   Every other node is computed once on the batch (the *prefix*); the stochastic nodes are
   *replayed* for the T samples. Skip connections and several stochastic layers need nothing
   special: a ResNet with DropPath in its last stage reuses everything before the first DropPath,
   including that block's residual branch. In-place ops that would make the reordering observable
   are moved into the replay (see ``graph._fix_inplace``).
3. **Replay** over ``T x B`` rows, sample-major like ``batched`` (row ``t * B + b``), in chunks
   sized to ``budget_bytes`` (on CPU also to about 1 MiB of activations but at least 1024 rows, as
   ``batched`` does: :func:`regfw.uncertainty.sampling.chunk_rows_for`). The
   boundary activations are gathered per chunk: a ``[T, B, ...]`` expand must be copied anyway
   to become ``[T * B, ...]`` rows for the next module, so the copy is kept chunk-sized and the
   ``T x B`` rows never exist at once. When one pass of the prefix would exceed the budget, and
   its rows are independent, the prefix runs in row chunks too.

Before a split is used it is checked once on 2 and 3 rows of the real inputs (eval mode, on a
forked random stream, so the masks of the real call are drawn exactly as without the check):

* the traced graph reproduces the model's output, and calls every stochastic module as often as the
  model does, each from a node the split knows to be stochastic (a stochastic module called from an
  opaque place -- a foreign hook, inside a leaf module -- would otherwise be computed once); a
  captured graph, run with each random operator replaced by its deterministic stand-in
  (:mod:`.stand_in`), reproduces the model's eval output, and every stochastic module the model calls
  draws in one of its random operators (randomness the capture fixed to a number would not be sampled);
* every tensor of the replay keeps one batch dimension and its rows stay independent (no
  ``x.mean(0)`` across rows), and every stochastic node draws its randomness per row (64 copies of
  one row give different outputs). When either fails -- e.g. weight drop, which draws one mask for
  the whole batch -- the replay runs as T passes over B rows (``mode="samples"``): still no prefix
  recomputation, and exactly the semantics of ``loop``.

When neither capture gives a graph or a check fails, the strategy falls back to ``batched`` and says
why (for both captures), once per model, in a :class:`RuntimeWarning`. The split is computed once per model and input
signature and cached in a :class:`weakref.WeakKeyDictionary`; a structural change (modules added,
replaced or removed, hooks added or removed, a rate switched to or from 0) invalidates it. Python
attributes read by a traced ``forward`` (not by a leaf module) are fixed at trace time, as with
:func:`torch.fx.symbolic_trace`; call :func:`invalidate` after changing one.

The package, by concern: :mod:`.inputs` (a dict or tuple of arguments as the graph's one input),
:mod:`.graph` (node evaluation, random / view / in-place ops, closures), :mod:`.stand_in`,
:mod:`.layout` (where the batch is in each value, row gathering), :mod:`.probes` (the checks
above), :mod:`.analysis` (trace, partition, memory plan), :mod:`.execute` (prefix and chunked
replay), :mod:`.cache` (one split per model and input signature), :mod:`.work` (whether the split
beats ``batched``: the work of each node, the share computed once, the predicted cost) and
:mod:`.strategy` (the registered function). The tracer is :mod:`regfw.placement.tracing`, shared with placement.
"""
from __future__ import annotations

from .analysis import TRACEABLE_HOOKS
from .cache import invalidate, split_model
from .split import RunStats, Split
from .strategy import fast_strategy

__all__ = [
    "TRACEABLE_HOOKS",
    "Split",
    "RunStats",
    "fast_strategy",
    "split_model",
    "invalidate",
]
