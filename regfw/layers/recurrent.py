"""Dropout for recurrent networks: locked (variational) dropout and weight drop (DropConnect).

* :class:`LockedDropout`: one mask per sequence shared by all time steps (Gal and Ghahramani, "A
  Theoretically Grounded Application of Dropout in Recurrent Neural Networks", NeurIPS 2016; the
  ``LockedDropout`` of AWD-LSTM, Merity et al., "Regularizing and Optimizing LSTM Language Models",
  ICLR 2018).
* :func:`apply_weight_drop` / :class:`WeightDrop`: DropConnect (Wan et al., "Regularization of Neural
  Networks using DropConnect", ICML 2013) on the hidden-to-hidden matrices ``weight_hh_l*`` of an
  ``nn.RNN``/``nn.LSTM``/``nn.GRU``, as in AWD-LSTM's ``WeightDrop``.

How weight drop works here, and why. AWD-LSTM (and fastai's port) delete the registered parameter,
keep a copy under a new name (``weight_hh_l0_raw``) and assign a plain tensor to the old name before
each forward. That doubles or renames state-dict keys, leaves a stale tensor behind after ``.to()``,
and breaks ``flatten_parameters`` (they patch it to a no-op). A ``torch.nn.utils.parametrize``
parametrization renames keys too (``parametrizations.weight_hh_l0.original``), and both it and
``torch.func.functional_call`` make the RNN rebuild (and, on CUDA, re-flatten) its weight list on every
call. Here nothing is renamed or copied: the parameter stays registered under its own name, and a
forward pre-hook puts the dropped tensor, computed from that parameter, into the RNN's
``_flat_weights`` list, the list its forward passes to the fused kernel (the same list torch's own
``RNNBase.__setattr__`` keeps up to date); a forward hook registered with ``always_call=True`` puts
the parameter back, even if the forward raised. Consequences, each tested:

* state-dict keys and parameter count are exactly those of the plain RNN (a state dict loads into a
  plain or a weight-dropped RNN alike);
* ``.to(device/dtype)`` needs nothing special: the dropped weight is computed from the current
  parameter at every call;
* gradients reach the registered parameter through the dropout mask;
* the rate and train/eval state live in a :class:`WeightDrop` child module (``rnn.weight_drop``), a
  :class:`~regfw.layers.base.StochasticModule` without tensors: rate schedules and Monte Carlo dropout
  find it like any other stochastic layer (MC dropout can switch it on while the RNN stays in eval).

On CUDA with cuDNN, weights that are not views of one flat buffer make cuDNN copy them into one and
warn ("RNN module weights are not part of single contiguous chunk of memory"); the copy is inherent
to dropping weights, so that one warning is silenced for the duration of a weight-dropped forward.
"""
from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils.rnn import PackedSequence

from .base import Rate, StochasticModule, check_rate, zeros_like_graph
from .masks import keep_scale_mask, masked_scale, use_words

__all__ = [
    "locked_dropout",
    "LockedDropout",
    "drop_connect",
    "WeightDrop",
    "apply_weight_drop",
    "remove_weight_drop",
]

SequenceInput = Tensor | PackedSequence | tuple

#: Name of the child module that :func:`apply_weight_drop` adds to an RNN.
WEIGHT_DROP_ATTR = "weight_drop"


def _locked_tensor(x: Tensor, p: float, batch_first: bool) -> Tensor:
    if x.dim() == 2:  # one unbatched sequence (L, F), as nn.LSTM accepts
        shape = (1,) + tuple(x.shape[1:])
    elif x.dim() >= 3:
        dims = list(x.shape)
        dims[1 if batch_first else 0] = 1
        shape = tuple(dims)
    else:
        raise ValueError(
            "locked_dropout expects a sequence of shape (B, T, F) (batch_first=True), (T, B, F) "
            f"(batch_first=False) or (T, F), got shape {tuple(x.shape)}"
        )
    return x * keep_scale_mask(x, shape, p)


def _locked_packed(x: PackedSequence, p: float) -> PackedSequence:
    data, batch_sizes = x.data, x.batch_sizes
    steps, batch = batch_sizes.numel(), int(batch_sizes[0])
    # PackedSequence.data is time-major: step t holds sequences 0 .. batch_sizes[t] - 1 (sorted order).
    index = torch.arange(batch).expand(steps, batch)
    sequence_of_row = index[index < batch_sizes[:, None]].to(data.device)
    mask = keep_scale_mask(data, (batch,) + tuple(data.shape[1:]), p)
    return x._replace(data=data * mask[sequence_of_row])


def locked_dropout(
    x: SequenceInput, p: float = 0.5, training: bool = True, batch_first: bool = True
) -> SequenceInput:
    """Variational dropout: one mask per sequence, the same at every time step (inverted scaling).

    Accepts a tensor ``(B, T, *F)`` (``batch_first=True``), ``(T, B, *F)`` (``batch_first=False``) or an
    unbatched ``(T, F)``; a ``PackedSequence``; or an RNN's output tuple ``(output, hidden)``, in which
    case only ``output`` is dropped and the tuple is returned with ``hidden`` unchanged (so the layer
    can follow an ``nn.LSTM`` in an ``nn.Sequential``). Eval and ``p = 0`` return ``x`` itself.
    """
    p = check_rate(p)
    if not training or p == 0.0:
        return x
    if isinstance(x, PackedSequence):
        if p == 1.0:
            return x._replace(data=zeros_like_graph(x.data))
        return _locked_packed(x, p)
    if isinstance(x, tuple):
        if not x:
            raise ValueError("locked_dropout got an empty tuple; expected (output, hidden)")
        return (locked_dropout(x[0], p, training, batch_first),) + tuple(x[1:])
    if not isinstance(x, Tensor):
        raise TypeError(
            f"locked_dropout expects a Tensor, PackedSequence or (output, hidden) tuple, got {type(x).__name__}"
        )
    if p == 1.0:
        return zeros_like_graph(x)
    return _locked_tensor(x, p, batch_first)


class LockedDropout(StochasticModule):
    """Locked (variational) dropout over time; see :func:`locked_dropout`.

    Args:
        p: drop probability (0.2-0.3 for recurrent layers is the usual range).
        batch_first: input layout ``(B, T, F)`` if true (default), ``(T, B, F)`` otherwise. Match the
            ``batch_first`` of the RNN around it.
    """

    p = Rate()

    def __init__(self, p: float = 0.5, batch_first: bool = True) -> None:
        super().__init__()
        self.p = p
        self.batch_first = bool(batch_first)

    def forward(self, x: SequenceInput) -> SequenceInput:
        return locked_dropout(x, self.p, self.training, self.batch_first)

    def extra_repr(self) -> str:
        return f"p={self.p}, batch_first={self.batch_first}"


def drop_connect(weight: Tensor, p: float = 0.5, training: bool = True) -> Tensor:
    """DropConnect (Wan et al., ICML 2013): drop individual weights, scaling kept ones by ``1 / (1 - p)``.

    The inverted scaling of AWD-LSTM; the paper's moment-matching inference is not used, so eval is the
    identity (the weight itself).
    """
    p = check_rate(p)
    if not training or p == 0.0:
        return weight
    if p == 1.0:
        return zeros_like_graph(weight)
    if use_words(weight):
        return masked_scale(weight, p)
    return F.dropout(weight, p, training=True)


class WeightDrop(StochasticModule):
    """The weight-drop state of one RNN: rate, weight names and train/eval switch.

    Installed by :func:`apply_weight_drop` as the child ``rnn.weight_drop``; it holds no tensors, so the
    RNN's state dict is unchanged. Calling it on a weight tensor applies :func:`drop_connect` at rate
    ``p`` when it is in training mode. The RNN's hooks consult this module's ``training`` flag (not the
    RNN's), which ``rnn.train()``/``rnn.eval()`` propagate as usual.
    """

    p = Rate()
    batch_shared = True  # one weight mask per forward pass, shared by every row of the batch

    def __init__(self, p: float = 0.5, weights: Sequence[str] = ("weight_hh_l0",)) -> None:
        super().__init__()
        self.p = p
        if isinstance(weights, str):
            weights = (weights,)
        self.weights = tuple(weights)
        self._warnings_ctx: Any = None

    def forward(self, weight: Tensor) -> Tensor:
        return drop_connect(weight, self.p, self.training)

    def extra_repr(self) -> str:
        return f"p={self.p}, weights={list(self.weights)}"


def _hidden_weight_names(rnn: nn.RNNBase) -> list[str]:
    return [name for name in rnn._flat_weights_names if name.startswith("weight_hh_l")]


class _WeightDropPreHook:
    """Forward pre-hook: put dropped copies of the selected weights into ``rnn._flat_weights``."""

    def __call__(self, rnn: nn.RNNBase, args: tuple) -> None:
        ctrl = rnn._modules.get(WEIGHT_DROP_ATTR)
        if not isinstance(ctrl, WeightDrop) or not ctrl.training or ctrl.p == 0.0:
            return None
        # Let the RNN pick up re-assigned parameters (e.g. under torch.func.functional_call) now, so
        # that its own check at the start of forward does not rebuild the list over our entries.
        update = getattr(rnn, "_update_flat_weights", None)
        if update is not None:
            update()
        names = rnn._flat_weights_names
        on_cuda = False
        for name in ctrl.weights:
            weight = getattr(rnn, name)
            on_cuda = on_cuda or weight.is_cuda
            rnn._flat_weights[names.index(name)] = ctrl(weight)
        if on_cuda:
            ctx = warnings.catch_warnings()
            ctx.__enter__()
            warnings.filterwarnings("ignore", message=".*not part of single contiguous chunk of memory.*")
            ctrl._warnings_ctx = ctx
        return None


class _WeightDropPostHook:
    """Forward hook (``always_call=True``): put the registered parameters back into ``_flat_weights``."""

    def __call__(self, rnn: nn.RNNBase, args: tuple, output: Any) -> None:
        ctrl = rnn._modules.get(WEIGHT_DROP_ATTR)
        if not isinstance(ctrl, WeightDrop):
            return None
        names = rnn._flat_weights_names
        for name in ctrl.weights:
            rnn._flat_weights[names.index(name)] = getattr(rnn, name)
        ctx, ctrl._warnings_ctx = ctrl._warnings_ctx, None
        if ctx is not None:
            ctx.__exit__(None, None, None)
        return None


def apply_weight_drop(
    rnn: nn.RNNBase, p: float = 0.5, weights: Sequence[str] | None = None
) -> nn.RNNBase:
    """Add weight drop (DropConnect on recurrent weights) to ``rnn`` in place and return it.

    Args:
        rnn: an ``nn.RNN``, ``nn.LSTM`` or ``nn.GRU`` (or a subclass).
        p: drop rate of the weights (AWD-LSTM uses 0.5 on ``weight_hh``).
        weights: names of the weights to drop; default all hidden-to-hidden matrices
            (``weight_hh_l{k}`` and ``weight_hh_l{k}_reverse``).

    Applying it again updates the rate (and the names, if given) without adding a second set of hooks.
    Undo with :func:`remove_weight_drop`. The state dict, parameters and their names are unchanged.
    """
    if not isinstance(rnn, nn.RNNBase):
        raise TypeError(
            f"apply_weight_drop expects an nn.RNN, nn.LSTM or nn.GRU, got {type(rnn).__name__}; "
            "for other layers use drop_connect on the weight"
        )
    p = check_rate(p)
    if isinstance(weights, str):
        weights = [weights]
    names = list(weights) if weights is not None else _hidden_weight_names(rnn)
    unknown = [n for n in names if n not in rnn._flat_weights_names]
    if unknown:
        raise ValueError(
            f"weights {unknown} are not weights of this {type(rnn).__name__}; "
            f"available: {list(rnn._flat_weights_names)}"
        )
    existing = rnn._modules.get(WEIGHT_DROP_ATTR)
    if isinstance(existing, WeightDrop):
        existing.p = p
        if weights is not None:
            existing.weights = tuple(names)
        return rnn
    if hasattr(rnn, WEIGHT_DROP_ATTR):
        raise ValueError(f"{type(rnn).__name__} already has an attribute {WEIGHT_DROP_ATTR!r}; cannot add weight drop")
    ctrl = WeightDrop(p, names)
    ctrl.train(rnn.training)
    rnn.add_module(WEIGHT_DROP_ATTR, ctrl)
    rnn.register_forward_pre_hook(_WeightDropPreHook())
    rnn.register_forward_hook(_WeightDropPostHook(), always_call=True)
    return rnn


def remove_weight_drop(rnn: nn.RNNBase) -> nn.RNNBase:
    """Undo :func:`apply_weight_drop`: remove the hooks and the ``weight_drop`` child; return ``rnn``."""
    for hooks in (rnn._forward_pre_hooks, rnn._forward_hooks):
        for key in [k for k, hook in hooks.items() if isinstance(hook, (_WeightDropPreHook, _WeightDropPostHook))]:
            del hooks[key]
            rnn._forward_hooks_always_called.pop(key, None)
    if isinstance(rnn._modules.get(WEIGHT_DROP_ATTR), WeightDrop):
        del rnn._modules[WEIGHT_DROP_ATTR]
    rnn._init_flat_weights()
    return rnn
