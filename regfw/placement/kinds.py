"""Layer kinds, the default-rate table and the rate policy: the one place for these ideas.

Every module of a model is classified by *type* (never by class-name substring) into a kind.
Regularizers ask for modules by kind, and rates come from :data:`RATE_TABLE`:

========= ======= ====================================================================
kind      range   notes
========= ======= ====================================================================
input     0.1-0.2 the first layer to consume the model input (dropout on its input)
hidden    0.3-0.5 ``nn.Linear``, and any layer multiplying its input by one weight matrix
                  (:func:`linear_by_behaviour`: GPT-2's ``Conv1D``)
conv      0.1-0.3 convolutions; spatial dropout / DropBlock fit conv maps better
recurrent 0.2-0.3 RNN/LSTM/GRU; locked (variational) masks over time
attention 0.1     the Transformer convention
residual  0.1     stochastic depth (DropPath) on residual branches; a place, not a module kind
embedding .05-.2  ``nn.Embedding``: whole rows (words) dropped (embedding dropout)
========= ======= ====================================================================

Rules of thumb (Srivastava et al. 2014 and common practice): higher rates for smaller
datasets, lower rates for larger models. :func:`policy_rate` turns them into a monotone rule
that never leaves a kind's range.

A regularizer whose "rate" means something else declares its own range for a kind in its class
attribute ``rate_ranges`` (see :class:`regfw.Regularizer`), which :func:`choose_rate` is given:
alpha dropout for SELU networks works at 0.05-0.1 (Klambauer et al. 2017), DropConnect on
recurrent weights at up to 0.5 (Merity et al. 2018). The policy is the same; only the range
differs. This module knows no regularizer by name.
"""
from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from torch import nn

INPUT = "input"
HIDDEN = "hidden"
CONV = "conv"
RECURRENT = "recurrent"
ATTENTION = "attention"
#: A place, not a module kind: the branch operand of a residual add (see :mod:`regfw.placement.dataflow`).
RESIDUAL = "residual"
#: ``nn.Embedding`` lookups: embedding dropout drops whole rows (Gal and Ghahramani 2016).
EMBEDDING = "embedding"
NORM = "norm"
ACTIVATION = "activation"
SKIP = "skip"

#: Kinds that carry a default dropout rate, in the order plans list them.
RATE_KINDS: tuple[str, ...] = (INPUT, HIDDEN, CONV, RECURRENT, ATTENTION, RESIDUAL, EMBEDDING)
#: Every kind a module can be classified into (``skip`` excludes a module from regularizers).
KINDS: tuple[str, ...] = (HIDDEN, CONV, RECURRENT, ATTENTION, NORM, ACTIVATION, SKIP, EMBEDDING)


@dataclass(frozen=True)
class RateRange:
    """The allowed range of a kind's rate and the default inside it."""

    low: float
    high: float
    default: float


#: The seed's default-rate table. ``default`` is used with ``policy: default``.
RATE_TABLE: dict[str, RateRange] = {
    INPUT: RateRange(0.1, 0.2, 0.2),
    HIDDEN: RateRange(0.3, 0.5, 0.5),
    CONV: RateRange(0.1, 0.3, 0.2),
    RECURRENT: RateRange(0.2, 0.3, 0.25),
    ATTENTION: RateRange(0.1, 0.1, 0.1),
    # Not in the seed's table: stochastic depth's rate at the deepest block (timm and DeiT use 0.1
    # for base-size models). Bigger models use *more* drop path, so the range is a single value
    # and the policy never lowers it.
    RESIDUAL: RateRange(0.1, 0.1, 0.1),
    # Not in the seed's table: embedding dropout, the share of words (rows) dropped. AWD-LSTM
    # (Merity et al. 2018) uses 0.1 on PTB and WikiText-2; Gal and Ghahramani 2016 tune it up to
    # about 0.2 for small data.
    EMBEDDING: RateRange(0.05, 0.2, 0.1),
}

#: The Transformer range: every rate of a model with attention (Vaswani et al. 2017 use P_drop = 0.1,
#: on the embeddings too; timm and DeiT keep dropout and drop path <= 0.1, and ViTs trained on large
#: data use 0). Replaces the rows of every kind for such a model, hybrids included (a conv stem, a
#: recurrent or embedding layer in a model that attends).
TRANSFORMER_RANGE = RateRange(0.0, 0.1, 0.1)
#: The kinds whose rows the Transformer range replaces: every kind with a rate (attention is 0.1 already).
TRANSFORMER_KINDS: tuple[str, ...] = tuple(k for k in RATE_KINDS if k != ATTENTION)


def transformer_ranges(model_map: object) -> dict[str, RateRange]:
    """The Transformer range for :data:`TRANSFORMER_KINDS` when the analysed model (a
    :class:`regfw.placement.surgery.ModelMap`) has attention, found by what its forward computes
    (:mod:`regfw.placement.attention`: ``ModelMap.attention``), else nothing."""
    if getattr(model_map, "attention", None):
        return {kind: TRANSFORMER_RANGE for kind in TRANSFORMER_KINDS}
    return {}


#: A regularizer's own ranges (kind -> range): a :class:`RateRange`, ``(low, high)`` (default
#: in the middle) or ``(low, high, default)``; see ``Regularizer.rate_ranges``.
OwnRanges = Mapping[str, RateRange | tuple[float, ...]]


def as_range(value: RateRange | tuple[float, ...], kind: str = "?") -> RateRange:
    """``value`` as a :class:`RateRange`, checked: ``0 <= low <= default <= high < 1``.

    ``(low, high)`` gets its default in the middle. A ``ValueError`` names the kind otherwise.
    """
    if isinstance(value, RateRange):
        rng = value
    else:
        try:
            numbers = tuple(float(v) for v in value)
        except (TypeError, ValueError):
            numbers = ()
        if len(numbers) == 2:
            rng = RateRange(numbers[0], numbers[1], (numbers[0] + numbers[1]) / 2)
        elif len(numbers) == 3:
            rng = RateRange(*numbers)
        else:
            raise ValueError(f"rate_ranges[{kind!r}]: got {value!r}, expected (low, high) or (low, high, default)")
    if not 0.0 <= rng.low <= rng.default <= rng.high < 1.0:
        raise ValueError(f"rate_ranges[{kind!r}]: got low={rng.low:g}, high={rng.high:g}, default={rng.default:g}; "
                         f"expected 0 <= low <= default <= high < 1")
    return rng


# Dataset sizes and parameter counts at which the policy reaches the ends of a range
# (log-linear in between): 1e3 examples or fewer -> top of the range, 1e6 or more -> bottom.
_N_SMALL, _N_LARGE = 1e3, 1e6
_P_SMALL, _P_LARGE = 1e4, 1e8

#: The module types of kind ``conv``.
CONV_TYPES: tuple[type, ...] = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d,
                                nn.ConvTranspose3d)

_TYPE_TABLE: tuple[tuple[tuple[type, ...], str], ...] = (
    ((nn.MultiheadAttention, nn.TransformerEncoderLayer, nn.TransformerDecoderLayer), ATTENTION),
    ((nn.RNNBase,), RECURRENT),
    (CONV_TYPES, CONV),
    ((nn.Linear, nn.Bilinear), HIDDEN),
    ((nn.Embedding,), EMBEDDING),
    ((nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm, nn.LocalResponseNorm,
      nn.RMSNorm), NORM),
    ((nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.PReLU, nn.ELU, nn.SELU, nn.CELU, nn.GELU, nn.SiLU,
      nn.Mish, nn.Tanh, nn.Sigmoid, nn.Hardtanh, nn.Hardswish, nn.Hardsigmoid, nn.Softplus,
      nn.Softsign, nn.Tanhshrink, nn.GLU, nn.LogSigmoid), ACTIVATION),
)


#: Functions that multiply their input by a weight matrix.
MATMUL_FUNCTIONS = frozenset({"linear", "addmm", "matmul", "mm", "bmm", "__matmul__", "einsum", "baddbmm"})
#: What else a linear layer's forward may do: reshape around the product and add its bias.
_LINEAR_HELPERS = frozenset({"view", "reshape", "flatten", "unflatten", "t", "transpose", "permute", "contiguous",
                             "add", "__add__", "__radd__", "add_", "to", "type_as", "__getitem__"})


def linear_by_behaviour(module: nn.Module, calls: Iterable[str] | None) -> bool:
    """A linear layer by what it does, whatever its class: its own parameters are one weight matrix
    (two dimensions) and at most a bias (one), and its forward (``calls``: the torch functions it
    called, from a traced pass) multiplies by it and does nothing else but reshape and add a bias (a
    layer that also gates or activates, ``F.glu(F.linear(x, w))``, is not). GPT-2's
    ``transformers.pytorch_utils.Conv1D`` (``torch.addmm(bias, x, weight)``) is one; a convolution or
    an embedding lookup is not."""
    if calls is None or any(True for _ in module.children()):
        return False
    params = list(module.parameters(recurse=False))
    if not params or sorted(p.dim() for p in params) not in ([2], [1, 2]):
        return False
    calls = set(calls)
    return bool(calls & MATMUL_FUNCTIONS) and calls <= MATMUL_FUNCTIONS | _LINEAR_HELPERS


def builtin_kind(module: nn.Module) -> str | None:
    """The kind of ``module`` by the built-in type table, or None when it has none."""
    for types, kind in _TYPE_TABLE:
        if isinstance(module, types):
            return kind
    return None


def rate_range(kind: str, ranges: OwnRanges | None = None) -> RateRange:
    """The range of ``kind``: the regularizer's own (``ranges``, its ``rate_ranges``) where it has
    one, else the table's; a ``KeyError`` naming the known kinds otherwise."""
    own = (ranges or {}).get(kind)
    if own is not None:
        return as_range(own, kind)
    try:
        return RATE_TABLE[kind]
    except KeyError:
        raise KeyError(f"kind {kind!r} has no rate; kinds with rates: {', '.join(RATE_KINDS)}") from None


def _unit(value: float, small: float, large: float) -> float:
    """1.0 at or below ``small``, 0.0 at or above ``large``, log-linear in between."""
    if value <= small:
        return 1.0
    if value >= large:
        return 0.0
    return (math.log10(large) - math.log10(value)) / (math.log10(large) - math.log10(small))


def policy_rate(kind: str, n_examples: int | None = None, n_params: int | None = None,
                ranges: OwnRanges | None = None) -> float:
    """The rate the rules of thumb give for ``kind``.

    Monotone by construction: non-increasing in the training-set size ``n_examples`` ("higher
    rates for smaller datasets") and non-increasing in the parameter count ``n_params`` ("lower
    for larger models"), and always inside the kind's range. An unknown size or count counts as
    neutral (the middle of its scale). The position in the range is the mean of the two scores,
    each 1 at or below the small end of its scale (1e3 examples, 1e4 parameters), 0 at or above
    the large end (1e6 examples, 1e8 parameters) and log-linear in between.
    """
    rng = rate_range(kind, ranges)
    data = 0.5 if n_examples is None else _unit(float(n_examples), _N_SMALL, _N_LARGE)
    size = 0.5 if n_params is None else _unit(float(n_params), _P_SMALL, _P_LARGE)
    position = 0.5 * (data + size)
    return round(rng.low + (rng.high - rng.low) * position, 4)


def explain_policy(kind: str, n_examples: int | None, n_params: int | None,
                   ranges: OwnRanges | None = None) -> str:
    """A short reason for a policy rate, as printed by ``regfw plan``."""
    n = "N unknown" if n_examples is None else f"N={n_examples}"
    p = "P unknown" if n_params is None else f"P={n_params}"
    rng = rate_range(kind, ranges)
    if rng.low == rng.high:
        return f"table ({kind}: {rng.low:g})"
    return f"policy ({n}, {p}; range {rng.low:g}-{rng.high:g})"


def choose_rate(kind: str, explicit: float | None = None, policy: str = "auto",
                n_examples: int | None = None, n_params: int | None = None,
                ranges: OwnRanges | None = None) -> tuple[float, str]:
    """The rate of ``kind`` and why, as ``regfw plan`` shows it: the one rule every plugin uses.

    An explicit rate from the config always wins (``"explicit"``); ``policy="default"`` takes
    the table's default (``"default (rate table)"``); ``policy="auto"`` applies
    :func:`policy_rate` and says which N and P it saw.
    """
    if explicit is not None:
        return float(explicit), "explicit"
    if policy == "default":
        return rate_range(kind, ranges).default, "default (rate table)"
    return policy_rate(kind, n_examples, n_params, ranges), explain_policy(kind, n_examples, n_params, ranges)
