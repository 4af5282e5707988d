"""The ``weight_decay`` regularizer: decoupled (AdamW-style) or L2 weight decay on the right parameters.

Which parameters decay follows timm's ``param_groups_weight_decay`` and nanoGPT's
``configure_optimizers``: weights of matrix multiplications and convolutions decay; biases,
normalization parameters and every other 1-D parameter (PReLU slopes, scales, gains) do not.
Embeddings decay by default (as in timm and nanoGPT; ``embeddings: false`` leaves them out, as
minGPT does). Frozen parameters (``requires_grad=False``) are left out of the optimizer
altogether. ``exclude`` takes parameter names or ``fnmatch`` globs (``"head.*"``,
``"*.pos_embed"``), and a module path excludes everything under it (``"classifier"``); a
pattern that matches no parameter is an error, so a typo never decays silently. A model
method ``no_weight_decay()`` returning names (timm's convention) is honoured the same way.
Every parameter is in exactly one group: tied parameters are listed once.

Two modes:

``decoupled`` (default, strength 0.01 as ``torch.optim.AdamW``)
    Loshchilov & Hutter, "Decoupled Weight Decay Regularization", ICLR 2019. Each optimizer
    step shrinks the decaying weights, ``w <- w - lr * strength * w``, apart from the gradient
    step; nothing is added to the loss. The decay group carries ``weight_decay: strength``, so
    optimizers that decay decoupled natively (``adamw``; any group with
    ``decoupled_weight_decay=True``, such as ``Adam(decoupled_weight_decay=True)``) do it
    themselves. For every other optimizer (``adam``, ``sgd``, ``rmsprop`` or a custom one,
    whose ``weight_decay`` would be coupled L2 on the gradient) the regularizer's Lightning
    callback moves the strength out of the group (its ``weight_decay`` becomes 0, so nothing
    decays twice) and applies exactly AdamW's shrink after the backward pass and before
    ``optimizer.step()`` (SGDW / AdamW of the paper): the selected mode means the same thing
    whatever optimizer is configured. Outside Lightning, call :func:`decoupled_decay_` between
    ``loss.backward()`` and ``optimizer.step()``.
``l2`` (strength 5e-4, the AlexNet/VGG convention for SGD)
    The penalty ``strength / 2 * sum(w ** 2)`` over the decaying weights is added to the loss;
    its gradient is exactly ``strength * w``. With plain SGD this is the same update as
    ``decoupled``; with adaptive optimizers it is not (the paper's point). SGD's own
    ``weight_decay`` is this mode applied to every parameter, biases and norms included.

Selecting this regularizer together with ``optimizer.weight_decay > 0`` is a config error
naming both keys: the weights would decay twice.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn

import regfw
from regfw.config import check_finite, nonneg
from regfw.errors import ConfigError
from regfw.params import DecaySetConfig, DecaySetRegularizer

#: The strength of each mode when the config leaves ``strength`` unset.
DEFAULT_STRENGTH: dict[str, float] = {"decoupled": 1e-2, "l2": 5e-4}
#: The key that names a parameter group made here (``"decay"`` or ``"no_decay"``).
GROUP_KEY = "regfw_group"
#: The key a non-native optimizer's decay group keeps its decoupled strength under.
DECOUPLED_KEY = "regfw_decoupled_weight_decay"
#: How many parameter names a ``regfw plan`` line lists before it counts the rest.
MAX_LISTED = 20


@dataclass
class WeightDecayConfig(DecaySetConfig):
    """``regularizers.weight_decay``: strength and mode; see the module docstring."""

    #: The decay coefficient; null takes the mode's default (decoupled 0.01, l2 5e-4).
    strength: float | None = nonneg(None, doc="decay coefficient (null: 0.01 decoupled, 5e-4 l2)")
    mode: Literal["decoupled", "l2"] = "decoupled"

    def __post_init__(self) -> None:
        check_finite(self, ("strength",))

    @property
    def value(self) -> float:
        """The strength in effect (the mode's default when ``strength`` is null)."""
        return DEFAULT_STRENGTH[self.mode] if self.strength is None else float(self.strength)


def _listing(entries: list[tuple[str, nn.Parameter, str]], with_reason: bool) -> str:
    if not entries:
        return "none"
    values = sum(p.numel() for _, p, _ in entries)
    shown = [f"{n} ({r})" if with_reason else n for n, _, r in entries[:MAX_LISTED]]
    more = f" ... (+{len(entries) - MAX_LISTED} more)" if len(entries) > MAX_LISTED else ""
    return f"{len(entries)} tensor(s), {values:,} values: {', '.join(shown)}{more}"


@torch.no_grad()
def decoupled_decay_(optimizer: torch.optim.Optimizer) -> int:
    """Apply decoupled weight decay to the groups of ``optimizer`` made by :class:`WeightDecay`.

    Call it after the backward pass and before ``optimizer.step()``. Groups whose optimizer
    decays decoupled natively (``torch.optim.AdamW``, or ``decoupled_weight_decay=True``)
    are left to it. In any other decay group the strength is moved (once) from
    ``weight_decay``, which that optimizer would apply as coupled L2, to
    :data:`DECOUPLED_KEY`, and every parameter with a gradient is shrunk as AdamW does:
    ``w <- w * (1 - lr * strength)``. Returns the number of tensors shrunk.
    """
    shrunk = 0
    native_class = isinstance(optimizer, torch.optim.AdamW)
    for group in optimizer.param_groups:
        if group.get(GROUP_KEY) != "decay":
            continue
        if DECOUPLED_KEY not in group:
            if native_class or group.get("decoupled_weight_decay", False):
                continue
            group[DECOUPLED_KEY] = float(group.get("weight_decay", 0.0))
            group["weight_decay"] = 0.0
        strength = group[DECOUPLED_KEY]
        if not strength:
            continue
        lr = float(group["lr"])
        tensors = [p for p in group["params"] if p.grad is not None]
        if tensors:
            torch._foreach_mul_(tensors, 1.0 - lr * strength)
            shrunk += len(tensors)
    return shrunk


class WeightDecay(DecaySetRegularizer):
    """Weight decay with timm's decay / no-decay parameter groups, decoupled or as an L2 penalty."""

    name = "weight_decay"
    description = "decoupled (AdamW) or L2 weight decay; no decay on biases, norms and 1-D parameters"
    Config = WeightDecayConfig

    def param_groups(self, model: nn.Module) -> list[dict]:
        """``[{decay params, weight_decay}, {no-decay params, weight_decay: 0}]``, empty groups left out.

        In ``l2`` mode both groups carry ``weight_decay: 0``: the penalty does the decay.
        """
        split = self.split(model)
        strength = self.config.value if self.config.mode == "decoupled" else 0.0
        groups = [
            {"params": split.decay_params, "weight_decay": strength, GROUP_KEY: "decay"},
            {"params": split.no_decay_params, "weight_decay": 0.0, GROUP_KEY: "no_decay"},
        ]
        return [g for g in groups if g["params"]]

    def penalty(self, model: nn.Module) -> torch.Tensor | None:
        """``strength / 2 * sum(w ** 2)`` over the decay group in ``l2`` mode; None when decoupled."""
        if self.config.mode != "l2":
            return None
        return l2_penalty(self.decay_params(model), self.config.value)

    def callbacks(self) -> list:
        if self.config.mode != "decoupled":
            return []
        from regfw.step_hooks import BeforeOptimizerStepCallback

        return [BeforeOptimizerStepCallback(decoupled_decay_)]

    def check(self, config: Any) -> None:
        optimizer = getattr(config, "optimizer", None)
        coupled = float(getattr(optimizer, "weight_decay", 0.0) or 0.0)
        if coupled > 0:
            raise ConfigError(
                f"optimizer.weight_decay={coupled:g} and regularizers.{self.name} both decay the weights, "
                f"so they would decay twice. Set optimizer.weight_decay: 0 and the strength in "
                f"regularizers.{self.name}.strength, or remove regularizers.{self.name} to keep the "
                f"optimizer's own decay (on every parameter, biases and norms included)."
            )

    def describe(self, model: nn.Module) -> list[str]:
        split = self.split(model)
        value = self.config.value
        if self.config.mode == "decoupled":
            head = (f"mode decoupled, strength {value:g}: each optimizer step w <- w - lr*{value:g}*w "
                    f"(AdamW; applied by the callback for optimizers that lack it)")
        else:
            head = f"mode l2, strength {value:g}: loss += {value:g}/2 * sum(w^2) over the decay group"
        frozen = f"{len(split.frozen)} tensor(s): {', '.join(split.frozen[:MAX_LISTED])}" if split.frozen else "none"
        return [
            head,
            f"decay group: {_listing(split.decay, with_reason=False)}",
            f"no-decay group: {_listing(split.no_decay, with_reason=True)}",
            f"left out (frozen): {frozen}",
        ]


def l2_penalty(params: list[nn.Parameter], strength: float) -> torch.Tensor | None:
    """``strength / 2 * sum(w ** 2)``: its gradient with respect to each ``w`` is ``strength * w``."""
    if not params:
        return None
    return (0.5 * strength) * torch.stack([p.pow(2).sum() for p in params]).sum()


@regfw.hookimpl
def regfw_register_regularizers(register):
    register(WeightDecay)
