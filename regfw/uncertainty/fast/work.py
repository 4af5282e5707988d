"""Whether a split is worth it: the work of each node, measured on the probes, and the prediction
``auto`` decides by.

A split saves the prefix's ``T - 1`` repeated passes but pays for gathering the boundary values
into ``T x B`` rows and for running its nodes one by one from Python; where the prefix is small
(the first stochastic layer near the input) and the replay runs one sample at a time (``samples``
mode: T passes over B rows, each paying every node's call again) it can cost far more than
``batched``. The decision must not depend on how busy the machine is (the samples of
a seed must be the same on every run), so it is a prediction from the graph, not a timing:

* each node's **work** is counted while the probes run it (:class:`WorkMeter`): the floating-point
  operations of its matrix products, convolutions and attention (torch's own formulas,
  :data:`torch.utils.flop_counter.flop_registry`) plus :data:`BYTE_COST` per byte of every value it
  writes (elementwise ops, norms and copies are bound by memory, not arithmetic);
* measured at the two probe sizes, the work of each node is ``constant + per_row x rows``, so it is
  known for any batch;
* every call of a node costs :data:`NODE_COST` besides its work (Python, dispatch, allocation);
* for ``B`` rows and ``T`` samples, ``batched`` costs ``T x (prefix + replay)`` plus one call of every
  node, and the split costs ``prefix + T x (replay + gather)`` plus one call of every prefix node and
  one (``rows`` mode) or T (``samples`` mode) calls of every replayed node, the gather being
  :data:`BYTE_COST` per byte of the boundary values copied into each sample's rows. The split is
  used where the prefix is at least :data:`MIN_REUSED` of one pass's work (:func:`reused_share`) and
  its predicted cost is at most :data:`MARGIN` times ``batched``'s (:func:`predicted_ratio`): a near
  tie keeps the split, so a wrapper that adds a node or two never changes which samples a seed
  draws.

``bench/auto_vs_batched.py`` prints the predicted and the measured ratio side by side.
"""
from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from torch import Tensor
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from torch.utils.flop_counter import flop_registry

#: Work units (floating-point operations) charged per byte written: on a CPU an elementwise op moves
#: about one byte in the time a matrix product does several multiply-adds.
BYTE_COST = 4.0
#: Work units charged per call of a node (about 50 us of Python and dispatch on a CPU that does 2e10 work
#: units a second): what makes a replay of T passes over a few rows slower than one pass over T x B rows.
NODE_COST = 1e6
#: The split is used unless its predicted cost is above this multiple of ``batched``'s; a near tie keeps the split,
#: so a wrapper that adds a node or two never changes which samples a seed draws.
MARGIN = 1.05
#: ... and only where the prefix it computes once is at least this share of one pass's work (:func:`reused_share`).
#: The split's whole gain is the prefix's ``T - 1`` repeats; where it reuses less, the gain is smaller than the
#: prediction's error. Measured with ``bench/auto_vs_batched.py``: with nothing reused (dropout on the input), the
#: prediction is near 1 and the split cost 1.09-1.40x ``batched`` (gMixer 1.40, Swin-V2-T 1.26, R3D-18 1.18,
#: CoaT-Lite 1.09; node-by-node Python and gathered copies the work model does not see), and 1.13x on
#: EfficientNet-B0 with spatial dropout, 4% reused; splits reusing 7-10% (ResNet-18 and MobileNetV3-Small with
#: spatial dropout, predicted 0.93) measured 0.72-0.89x. The share is a ratio of work, not of node calls, so a
#: wrapper's extra node does not move it.
MIN_REUSED = 0.05


def _attention_flops(args: tuple) -> int:
    """``softmax(q k^T) v`` of a fused attention call torch has no formula for (the CPU kernels):
    two products of ``[..., L, E] x [..., E, S]`` and ``[..., L, S] x [..., S, Ev]``."""
    q, k, v = (a for a in args[:3])
    if not all(isinstance(t, Tensor) for t in (q, k, v)) or q.dim() < 2:
        return 0
    lead = q.numel() // (q.shape[-2] * q.shape[-1])
    return 2 * lead * q.shape[-2] * k.shape[-2] * (q.shape[-1] + v.shape[-1])


class WorkMeter(TorchDispatchMode):
    """Counts the work of every torch op while it is active, added to the node in :attr:`node`."""

    def __init__(self) -> None:
        super().__init__()
        self.node: Any = None
        self.work: dict[Any, float] = {}

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if self.node is None:
            return out
        packet = getattr(func, "_overloadpacket", None)
        flops = 0.0
        formula = flop_registry.get(packet)
        try:
            if formula is not None:
                flops = float(formula(*args, **kwargs, out_val=out))
            elif "scaled_dot_product" in str(packet):
                flops = float(_attention_flops(args))
        except Exception:  # noqa: BLE001 - a formula that does not fit these arguments: bytes only
            flops = 0.0
        written = 0 if getattr(func, "is_view", False) else sum(
            t.numel() * t.element_size() for t in tree_flatten(out)[0] if isinstance(t, Tensor))
        self.work[self.node] = self.work.get(self.node, 0.0) + flops + BYTE_COST * written
        return out


def per_row(work1: dict, work2: dict, rows: tuple[int, int]) -> dict[Any, tuple[float, float]]:
    """``node -> (constant, per-row)`` work from the works measured at the two probe sizes."""
    n1, n2 = rows
    out = {}
    for node in work1.keys() | work2.keys():
        w1, w2 = work1.get(node, 0.0), work2.get(node, 0.0)
        r = max(0.0, (w2 - w1) / (n2 - n1))
        out[node] = (max(0.0, w1 - n1 * r), r)
    return out


def total(linear: dict[Any, tuple[float, float]], nodes: Iterable[Any]) -> tuple[float, float]:
    """The summed ``(constant, per-row)`` work of ``nodes``."""
    c = r = 0.0
    for node in nodes:
        nc, nr = linear.get(node, (0.0, 0.0))
        c, r = c + nc, r + nr
    return c, r


def reused_share(prefix: tuple[float, float], replay: tuple[float, float], rows: int) -> float:
    """The prefix's share of one pass's work for ``rows`` rows: what the split computes once instead of T times."""
    p = prefix[0] + prefix[1] * rows
    whole = p + replay[0] + replay[1] * rows
    return p / whole if whole > 0 else 0.0


def predicted_ratio(prefix: tuple[float, float], replay: tuple[float, float], gather_bytes: tuple[float, float],
                    rows: int, samples: int, nodes: tuple[int, int], replay_passes: int) -> float:
    """The split's predicted cost over ``batched``'s for ``rows`` rows and ``samples`` samples (see the
    module docstring); ``nodes``: how many prefix and replayed nodes; ``replay_passes``: 1 (``rows``
    mode) or T (``samples`` mode)."""
    p = prefix[0] + prefix[1] * rows
    r = replay[0] + replay[1] * rows
    g = BYTE_COST * (gather_bytes[0] + gather_bytes[1] * rows)
    n_prefix, n_replay = nodes
    plain = samples * (p + r) + NODE_COST * (n_prefix + n_replay)
    return (p + samples * (r + g) + NODE_COST * (n_prefix + replay_passes * n_replay)) / plain
