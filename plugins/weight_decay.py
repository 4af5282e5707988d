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

The paper's prior (Gal & Ghahramani, ICML 2016, and the code published with it)
    ``prior: {length_scale: 1e-2, tau: 0.75}`` states the Gaussian prior on the weights instead
    of a strength: the paper's code gives every Dense layer Keras's ``l2(reg)``, which adds
    ``reg * sum(w ** 2)`` (no 1/2) to the mean squared error, with
    ``reg = length_scale^2 * (1 - p) / (2 * N * tau)``: ``p`` the dropout rate (``prior.dropout``,
    else the selected ``dropout`` regularizer's ``input``/``hidden`` rate, else the rate of the
    model's dropout layers at the first step), ``N`` the number of training examples
    (``prior.n_examples``, else the data's ``n_train`` or ``RegularizedModule(n_examples=...)``),
    ``tau`` the noise precision as the paper quotes it (original target units; its code uses that
    value as is, also when the model trains on standardised targets). The mode is
    ``l2`` with ``strength = 2 * reg`` (this mode adds ``strength / 2 * sum(w ** 2)``), so the
    loss is the paper's code's ``mse + reg * sum(w ** 2)`` over the same weights (Keras's
    ``W_regularizer`` leaves biases out, as the decay group does). ``regfw plan`` prints ``reg``
    and the strength. The decoupled mode is not this prior (it adds no loss term); selecting it
    in a run with MC dropout regression warns once.

Selecting this regularizer together with ``optimizer.weight_decay > 0`` is a config error
naming both keys: the weights would decay twice.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn

from regfw.extend import (
    ConfigError,
    DecaySetConfig,
    DecaySetRegularizer,
    check_finite,
    hookimpl,
    is_dropout,
    nonneg,
    positive,
    rate,
)

#: The strength of each mode when the config leaves ``strength`` unset.
DEFAULT_STRENGTH: dict[str, float] = {"decoupled": 1e-2, "l2": 5e-4}
#: The key that names a parameter group made here (``"decay"`` or ``"no_decay"``).
GROUP_KEY = "regfw_group"
#: The key a non-native optimizer's decay group keeps its decoupled strength under.
DECOUPLED_KEY = "regfw_decoupled_weight_decay"
#: How many parameter names a ``regfw plan`` line lists before it counts the rest.
MAX_LISTED = 20


#: The model losses that make a run regression (for the decoupled-mode note under MC dropout).
REGRESSION_LOSSES = ("mse", "gaussian_nll")


@dataclass
class PriorConfig:
    """``regularizers.weight_decay.prior``: the paper's prior, from which the L2 strength is computed."""

    #: The prior length-scale l (Gal & Ghahramani's UCI experiments: 1e-2).
    length_scale: float = positive(1e-2, doc="prior length-scale l")
    #: The noise precision tau as the paper quotes it (original units), used as given.
    tau: float | None = positive(None, doc="noise precision tau (required)")
    #: The dropout rate p; null: the selected dropout regularizer's rate, else the model's dropout layers'.
    dropout: float | None = rate(None, doc="dropout rate p (null: the dropout regularizer's rate)")
    #: N; null: the data's number of training examples.
    n_examples: int | None = positive(None, doc="number of training examples N (null: from the data)")

    def __post_init__(self) -> None:
        check_finite(self, ("length_scale", "tau"))
        if self.tau is None:
            raise ValueError("tau: missing; the prior needs the noise precision tau (Gal & Ghahramani's UCI grid: "
                             "0.025 to 3.5), e.g. prior: {length_scale: 1e-2, tau: 0.75}")


def prior_reg(length_scale: float, dropout: float, n_examples: int, tau: float) -> float:
    """``reg = l^2 (1 - p) / (2 N tau)``: the coefficient of ``reg * sum(w ** 2)`` in the paper's code
    (Gal & Ghahramani 2016; Keras ``l2(reg)`` on every Dense layer's weights)."""
    return length_scale ** 2 * (1.0 - dropout) / (2.0 * n_examples * tau)


@dataclass
class WeightDecayConfig(DecaySetConfig):
    """``regularizers.weight_decay``: strength and mode, or the paper's prior; see the module docstring."""

    #: The decay coefficient; null takes the mode's default (decoupled 0.01, l2 5e-4).
    strength: float | None = nonneg(None, doc="decay coefficient (null: 0.01 decoupled, 5e-4 l2)")
    #: null: ``l2`` with a ``prior``, else ``decoupled``.
    mode: Literal["decoupled", "l2"] | None = None
    #: The paper's prior; sets the ``l2`` strength (``strength`` must then be left unset).
    prior: PriorConfig | None = None

    def __post_init__(self) -> None:
        check_finite(self, ("strength",))
        if self.prior is None:
            return
        if self.strength is not None:
            raise ValueError(f"strength: got {self.strength:g} together with prior, which computes the strength "
                             f"(2 * l^2 (1 - p) / (2 N tau)); remove one of them")
        if self.mode == "decoupled":
            raise ValueError("mode: got 'decoupled' together with prior; the paper's prior is the L2 loss term "
                             "reg * sum(w^2), so remove mode (or write mode: l2)")

    @property
    def resolved_mode(self) -> str:
        """The mode in effect: as set, else ``l2`` with a prior and ``decoupled`` without."""
        if self.mode is not None:
            return self.mode
        return "l2" if self.prior is not None else "decoupled"

    @property
    def value(self) -> float:
        """The strength set (the mode's default when ``strength`` is null); with a prior, use
        :meth:`WeightDecay.strength` (it needs N and p)."""
        return DEFAULT_STRENGTH[self.resolved_mode] if self.strength is None else float(self.strength)


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
    description = "decoupled (AdamW) or L2 weight decay, or the MC dropout prior; no decay on biases, norms, 1-D"
    Config = WeightDecayConfig

    def __init__(self, config: Any = None) -> None:
        super().__init__(config)
        #: N from the plan context (the data's training-set size), for the prior.
        self._context_n: int | None = None
        #: p from the selected dropout regularizer's config (``check``), for the prior.
        self._config_dropout: float | None = None
        #: The prior's strength, once N and p are known.
        self._prior_strength: float | None = None

    # -- the prior ---------------------------------------------------------------------------------
    def _n_examples(self) -> int:
        prior = self.config.prior
        n = prior.n_examples if prior.n_examples is not None else self._context_n
        if n is None:
            raise ConfigError(
                f"regularizers.{self.name}.prior.n_examples: null and the data did not say its number of training "
                f"examples N, which the prior reg = l^2 (1 - p) / (2 N tau) needs. Set prior.n_examples, give the "
                f"data module an n_train attribute, or pass RegularizedModule(n_examples=...)."
            )
        return int(n)

    def _dropout(self, model: nn.Module | None) -> float | None:
        """p: ``prior.dropout``, else the dropout regularizer's rate, else the model's dropout layers' one
        rate (None while the model has none yet, before the plan is applied)."""
        prior = self.config.prior
        if prior.dropout is not None:
            return float(prior.dropout)
        if self._config_dropout is not None:
            return self._config_dropout
        if model is None:
            return None
        rates = sorted({round(float(getattr(m, "p", 0.0)), 12) for m in model.modules()
                        if is_dropout(m) and float(getattr(m, "p", 0.0) or 0.0) > 0})
        if len(rates) == 1:
            return rates[0]
        found = "no dropout layer" if not rates else f"dropout layers of rates {', '.join(f'{r:g}' for r in rates)}"
        raise ConfigError(
            f"regularizers.{self.name}.prior.dropout: null and the model has {found}, so the prior "
            f"reg = l^2 (1 - p) / (2 N tau) has no single rate p. Set prior.dropout to the rate to use."
        )

    def strength(self, model: nn.Module | None = None) -> float | None:
        """The ``l2`` / ``decoupled`` strength in effect; with a prior, ``2 * reg`` (None while p is not known)."""
        prior = self.config.prior
        if prior is None:
            return self.config.value
        if self._prior_strength is None:
            p = self._dropout(model)
            if p is None:
                return None
            self._prior_strength = 2.0 * prior_reg(prior.length_scale, p, self._n_examples(), float(prior.tau))
        return self._prior_strength

    def plan(self, model: nn.Module, ctx: Any) -> list:
        """Nothing to place; keeps the data's N (``ctx.n_examples``) for the prior and checks it is known."""
        self._context_n = ctx.n_examples
        self._prior_strength = None
        if self.config.prior is not None:
            self._n_examples()
        return []

    # -- optimizer and loss ------------------------------------------------------------------------
    def param_groups(self, model: nn.Module) -> list[dict]:
        """``[{decay params, weight_decay}, {no-decay params, weight_decay: 0}]``, empty groups left out.

        In ``l2`` mode both groups carry ``weight_decay: 0``: the penalty does the decay.
        """
        split = self.split(model)
        strength = self.config.value if self.config.resolved_mode == "decoupled" else 0.0
        groups = [
            {"params": split.decay_params, "weight_decay": strength, GROUP_KEY: "decay"},
            {"params": split.no_decay_params, "weight_decay": 0.0, GROUP_KEY: "no_decay"},
        ]
        return [g for g in groups if g["params"]]

    def penalty(self, model: nn.Module) -> torch.Tensor | None:
        """``strength / 2 * sum(w ** 2)`` over the decay group in ``l2`` mode; None when decoupled."""
        if self.config.resolved_mode != "l2":
            return None
        strength = self.strength(model)
        assert strength is not None  # a model with a plan applied gives p or raises
        return l2_penalty(self.decay_params(model), strength)

    def callbacks(self) -> list:
        if self.config.resolved_mode != "decoupled":
            return []
        from regfw.extend import BeforeOptimizerStepCallback

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
        if self.config.prior is not None:
            self._config_dropout = self._dropout_from_config(getattr(config, "regularizers", None) or {})
        elif self.config.resolved_mode == "decoupled" and _mc_regression(config):
            warnings.warn(
                f"regularizers.{self.name}: mode decoupled shrinks the weights each step and adds no loss term, "
                f"so it is not the L2 prior of MC dropout regression (Gal & Ghahramani); for the paper's prior "
                f"write regularizers.{self.name}.prior: {{length_scale: 1e-2, tau: TAU}} (docs/regression.md).",
                UserWarning, stacklevel=2)

    def _dropout_from_config(self, section: Any) -> float | None:
        """The one nonzero ``input``/``hidden`` rate of the selected ``dropout`` regularizer, if set."""
        if self.config.prior.dropout is not None:
            return None
        for key, settings in dict(section).items():
            if str(key).split(":")[-1] != "dropout" or not isinstance(settings, dict):
                continue
            rates = {float(settings[k]) for k in ("input", "hidden") if settings.get(k)}
            if len(rates) > 1:
                raise ConfigError(
                    f"regularizers.{self.name}.prior.dropout: null, and regularizers.{key} has input "
                    f"{settings.get('input')} and hidden {settings.get('hidden')}, so the prior has no single rate "
                    f"p. Set prior.dropout to the rate to use (the paper uses one p on the input and hidden layer)."
                )
            if rates:
                return rates.pop()
        return None

    def describe(self, model: nn.Module) -> list[str]:
        split = self.split(model)
        mode = self.config.resolved_mode
        prior = self.config.prior
        if prior is not None:
            n, p = self._n_examples(), self._dropout(None)
            if p is None:
                head = (f"mode l2 from the prior (length_scale {prior.length_scale:g}, tau {prior.tau:g}, N {n}): "
                        f"loss += reg * sum(w^2), reg = l^2 (1 - p) / (2 N tau) with p the rate of the "
                        f"model's dropout layers, computed at the first training step")
            else:
                strength = self.strength(model)
                assert strength is not None
                head = (f"mode l2 from the prior: reg = l^2 (1 - p) / (2 N tau) = {prior.length_scale:g}^2 * "
                        f"(1 - {p:g}) / (2 * {n} * {prior.tau:g}) = {strength / 2:.6g}; loss += reg * sum(w^2) "
                        f"over the decay group (strength {strength:.6g}; the paper's code's Keras l2(reg))")
        elif mode == "decoupled":
            value = self.config.value
            head = (f"mode decoupled, strength {value:g}: each optimizer step w <- w - lr*{value:g}*w "
                    f"(AdamW; applied by the callback for optimizers that lack it)")
        else:
            value = self.config.value
            head = f"mode l2, strength {value:g}: loss += {value:g}/2 * sum(w^2) over the decay group"
        frozen = f"{len(split.frozen)} tensor(s): {', '.join(split.frozen[:MAX_LISTED])}" if split.frozen else "none"
        return [
            head,
            f"decay group: {_listing(split.decay, with_reason=False)}",
            f"no-decay group: {_listing(split.no_decay, with_reason=True)}",
            f"left out (frozen): {frozen}",
        ]


def _mc_regression(config: Any) -> bool:
    """Whether a resolved config runs MC dropout on a regression task (mse / gaussian_nll loss, or the
    built-in regression data with ``loss: auto``)."""
    uncertainty = getattr(config, "uncertainty", None)
    if uncertainty is None or not getattr(uncertainty, "enabled", False):
        return False
    if getattr(uncertainty, "tau", None) is not None:
        return True
    model, data = getattr(config, "model", None), getattr(config, "data", None)
    loss = getattr(model, "loss", None)
    if loss in REGRESSION_LOSSES:
        return True
    return loss == "auto" and getattr(data, "name", None) == "diabetes"


def l2_penalty(params: list[nn.Parameter], strength: float) -> torch.Tensor | None:
    """``strength / 2 * sum(w ** 2)``: its gradient with respect to each ``w`` is ``strength * w``."""
    if not params:
        return None
    return (0.5 * strength) * torch.stack([p.pow(2).sum() for p in params]).sum()


@hookimpl
def regfw_register_regularizers(register):
    register(WeightDecay)
