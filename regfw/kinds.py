"""Layer kinds, the default-rate table and the rate policy: the one place for these ideas.

Every module of a model is classified by *type* (never by class-name substring) into a kind.
Regularizers ask for modules by kind, and rates come from :data:`RATE_TABLE`:

======== ========= ===================================================================
kind     range     notes
======== ========= ===================================================================
input    0.1-0.2   the first layer to consume the model input (dropout on its input)
hidden   0.3-0.5   ``nn.Linear``
conv     0.1-0.3   convolutions; spatial dropout / DropBlock fit conv maps better
recurrent 0.2-0.3  RNN/LSTM/GRU; locked (variational) masks over time
attention 0.1      the Transformer convention
======== ========= ===================================================================

Rules of thumb (Srivastava et al. 2014 and common practice): higher rates for smaller
datasets, lower rates for larger models. :func:`policy_rate` turns them into a monotone rule
that never leaves a kind's range.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

from torch import nn

INPUT = "input"
HIDDEN = "hidden"
CONV = "conv"
RECURRENT = "recurrent"
ATTENTION = "attention"
NORM = "norm"
ACTIVATION = "activation"
SKIP = "skip"

#: Kinds that carry a default dropout rate, in the order plans list them.
RATE_KINDS: tuple[str, ...] = (INPUT, HIDDEN, CONV, RECURRENT, ATTENTION)
#: Every kind a module can be classified into (``skip`` excludes a module from regularizers).
KINDS: tuple[str, ...] = (*RATE_KINDS[1:], NORM, ACTIVATION, SKIP)


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
}

# Dataset sizes and parameter counts at which the policy reaches the ends of a range
# (log-linear in between): 1e3 examples or fewer -> top of the range, 1e6 or more -> bottom.
_N_SMALL, _N_LARGE = 1e3, 1e6
_P_SMALL, _P_LARGE = 1e4, 1e8

_TYPE_TABLE: tuple[tuple[tuple[type, ...], str], ...] = (
    ((nn.MultiheadAttention, nn.TransformerEncoderLayer, nn.TransformerDecoderLayer), ATTENTION),
    ((nn.RNNBase,), RECURRENT),
    ((nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d,
      nn.ConvTranspose3d), CONV),
    ((nn.Linear, nn.Bilinear), HIDDEN),
    ((nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm, nn.LocalResponseNorm,
      nn.RMSNorm), NORM),
    ((nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.PReLU, nn.ELU, nn.SELU, nn.CELU, nn.GELU, nn.SiLU,
      nn.Mish, nn.Tanh, nn.Sigmoid, nn.Hardtanh, nn.Hardswish, nn.Hardsigmoid, nn.Softplus,
      nn.Softsign, nn.Tanhshrink, nn.GLU, nn.LogSigmoid), ACTIVATION),
)


def builtin_kind(module: nn.Module) -> Optional[str]:
    """The kind of ``module`` by the built-in type table, or None when it has none."""
    for types, kind in _TYPE_TABLE:
        if isinstance(module, types):
            return kind
    return None


def rate_range(kind: str) -> RateRange:
    """The table row of ``kind``; a ``KeyError`` naming the known kinds otherwise."""
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


def policy_rate(kind: str, n_examples: Optional[int] = None, n_params: Optional[int] = None) -> float:
    """The rate the rules of thumb give for ``kind``.

    Monotone by construction: non-increasing in the training-set size ``n_examples`` ("higher
    rates for smaller datasets") and non-increasing in the parameter count ``n_params`` ("lower
    for larger models"), and always inside the kind's range. An unknown size or count counts as
    neutral (the middle of its scale). The position in the range is the mean of the two scores.
    """
    rng = rate_range(kind)
    data = 0.5 if n_examples is None else _unit(float(n_examples), _N_SMALL, _N_LARGE)
    size = 0.5 if n_params is None else _unit(float(n_params), _P_SMALL, _P_LARGE)
    position = 0.5 * (data + size)
    return round(rng.low + (rng.high - rng.low) * position, 4)


def explain_policy(kind: str, n_examples: Optional[int], n_params: Optional[int]) -> str:
    """A short reason for a policy rate, as printed by ``regfw plan``."""
    n = "N unknown" if n_examples is None else f"N={n_examples}"
    p = "P unknown" if n_params is None else f"P={n_params}"
    rng = rate_range(kind)
    return f"policy ({n}, {p}; range {rng.low:g}-{rng.high:g})"
