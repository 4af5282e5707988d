"""The ``noise`` regularizer: additive Gaussian noise on inputs, hidden activations and weights.

* **Inputs** (``input_std``): ``x + N(0, std^2)`` on the model input, during training only.
  Bishop, "Training with Noise is Equivalent to Tikhonov Regularization", Neural Computation
  1995; Keras' ``GaussianNoise`` layer. On by default (std 0.1, for inputs standardised or
  scaled to [0, 1]).
* **Activations** by layer kind (``hidden_std``, ``conv_std``, ``recurrent_std``): the same
  noise after the activation that follows each layer, placed exactly like dropout (never
  between a layer and its BatchNorm; not after the model's output layer). Poole, Sohl-Dickstein
  & Ganguli, "Analyzing noise in autoencoders and deep networks", 2014. Off by default.
* **Weights** (``weight_std``): each forward pass in training sees ``w + N(0, std^2)`` for the
  ``weight`` of every layer of ``weight_kinds`` (the output layer included); the gradient is
  taken at the perturbed weights and applied to the clean ones. Graves, "Practical Variational
  Inference for Neural Networks", NIPS 2011; An, "The Effects of Adding Noise During
  Backpropagation Training on a Generalization Performance", Neural Computation 1996. Off by
  default. The perturbed tensor is swapped in for the parameter during the forward pass and
  the *same* ``nn.Parameter`` object is put back afterwards (the technique of
  ``torch.func.functional_call``): the parameter's storage is never written, so it is restored
  bit for bit and no drift can accumulate, unlike subtracting the noise again, which rounds.
  Only layers whose ``forward`` reads ``self.weight`` qualify (Linear, convolutions), so
  recurrent layers are not supported (use weight drop from the dropout family there).

Everything is off in eval mode, and a std of 0 leaves that place out of the plan.

Monte Carlo dropout: the inserted :class:`GaussianNoise` subclasses
:class:`regfw.layers.StochasticModule`, so MC dropout switches it on with the dropout
layers and its samples include the noise the model was trained with (input noise is then the
first random step, so every sample re-runs the whole network). Its magnitude is ``std``, not a
rate ``p``, so dropout rate schedules and checkpointed rates leave it alone. :class:`WeightNoise`
is deliberately *not* stochastic for MC dropout: it draws one perturbation per forward pass for
the whole batch from inside its host layer, where MC's per-row sampling cannot see it, so at MC
time (as in eval) the weights are the clean ones.
"""
from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal, cast

import torch
from torch import Tensor, nn

from regfw.extend import (
    InjectingRegularizer,
    LayerInfo,
    PlanContext,
    PlanItem,
    after_anchor,
    check_finite,
    hookimpl,
    injected_name,
    model_map,
    nonneg,
)
from regfw.extend import kinds as K
from regfw.layers import StochasticModule, attach_child

#: The child name a layer's :class:`WeightNoise` is attached under.
WEIGHT_NOISE_NAME = "regfw_weight_noise"


def check_std(std: float, name: str = "std") -> float:
    """Validate a noise standard deviation: a finite number >= 0 (a ``ValueError`` otherwise)."""
    try:
        value = float(std)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a finite number >= 0, got {std!r}") from None
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
    return value


def gaussian_noise(x: Tensor, std: float, training: bool = True) -> Tensor:
    """``x + N(0, std^2)`` element-wise in training; ``x`` itself in eval or when ``std`` is 0."""
    std = check_std(std)
    if not training or std == 0.0:
        return x
    if not x.is_floating_point():
        raise TypeError(f"Gaussian noise needs a floating-point tensor, got dtype {x.dtype}; "
                        f"noise on the input of an embedding layer is not meaningful")
    return x + torch.randn_like(x) * std


class _StdMixin:
    """A validated ``std`` attribute (the noise magnitude)."""

    @property
    def std(self) -> float:
        return self._std

    @std.setter
    def std(self, value: float) -> None:
        self._std = check_std(value)


class GaussianNoise(_StdMixin, StochasticModule):
    """Additive Gaussian noise in training mode, identity in eval (Keras' ``GaussianNoise``)."""

    def __init__(self, std: float = 0.1) -> None:
        super().__init__()
        self.std = std

    def forward(self, x: Tensor) -> Tensor:
        return gaussian_noise(x, self.std, self.training)

    def extra_repr(self) -> str:
        return f"std={self.std:g}"


class WeightNoise(_StdMixin, nn.Module):
    """Perturbs its host layer's weights for each forward pass in training mode.

    Attached with :func:`add_weight_noise`: a forward pre-hook on the host calls
    :meth:`perturb`, which replaces each named parameter in the host's ``_parameters`` by
    ``w + std * N(0, 1)`` (a tensor computed from ``w``, so gradients reach ``w``); a forward
    hook that runs even when ``forward`` raises calls :meth:`restore`, which puts the original
    ``nn.Parameter`` objects back. The parameters are never written, so nothing is lost to
    rounding. With ``std = 0`` the host sees a view of ``w`` and no random numbers are drawn.
    """

    def __init__(self, std: float = 0.01, names: Sequence[str] = ("weight",)) -> None:
        super().__init__()
        self.std = std
        self.names = tuple(names)
        self._saved: dict[str, nn.Parameter] = {}

    def perturb(self, host: nn.Module) -> None:
        if not self.training or self._saved:
            return
        for name in self.names:
            param = host._parameters.get(name)
            if param is None:
                continue
            self._saved[name] = param
            noisy = param + torch.randn_like(param) * self.std if self.std else param.view_as(param)
            # a plain tensor stands in for the parameter during the forward pass (see the class docstring)
            host._parameters[name] = noisy  # type: ignore[assignment]  # torch declares Parameter values

    def restore(self, host: nn.Module) -> None:
        for name, param in self._saved.items():
            host._parameters[name] = param
        self._saved.clear()

    def forward(self, x: Tensor) -> Tensor:  # pragma: no cover - it acts through hooks
        return x

    def extra_repr(self) -> str:
        return f"std={self.std:g}, names={list(self.names)}"

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_saved"] = {}
        return state


class _Perturb:
    """Forward pre-hook: perturb the host's weights through its child ``name``."""

    def __init__(self, name: str) -> None:
        self.name = name

    def __call__(self, module: nn.Module, args: tuple) -> None:
        getattr(module, self.name).perturb(module)


class _Restore:
    """Forward hook (always called): put the host's own parameters back."""

    def __init__(self, name: str) -> None:
        self.name = name

    def __call__(self, module: nn.Module, args: tuple, output: object) -> None:
        getattr(module, self.name).restore(module)


def add_weight_noise(module: nn.Module, std: float, names: Sequence[str] = ("weight",)) -> WeightNoise:
    """Attach weight noise of ``std`` to ``module``'s parameters ``names``; returns the noise module.

    A module that carries weight noise already gets its ``std`` and ``names`` updated instead
    of a second one.
    """
    for name in names:
        if not isinstance(module._parameters.get(name), nn.Parameter):
            raise ValueError(f"{type(module).__name__} has no parameter {name!r} to perturb; "
                             f"its parameters: {', '.join(module._parameters) or '(none)'}")
    noise = attach_child(module, WEIGHT_NOISE_NAME, WeightNoise(std, names), pre_hook=_Perturb(WEIGHT_NOISE_NAME),
                         hook=_Restore(WEIGHT_NOISE_NAME), always_call=True)
    if not isinstance(noise, WeightNoise):
        raise ValueError(f"{type(module).__name__} has a child {WEIGHT_NOISE_NAME!r} that is not weight noise")
    noise.std = std  # a module that carried weight noise already: updated, not doubled
    noise.names = tuple(names)
    return noise


def remove_weight_noise(module: nn.Module) -> bool:
    """Undo :func:`add_weight_noise`; returns whether there was weight noise to remove."""
    if WEIGHT_NOISE_NAME not in module._modules:
        return False
    for hooks in (module._forward_pre_hooks, module._forward_hooks):
        for key in [k for k, h in hooks.items() if isinstance(h, (_Perturb, _Restore))]:
            del hooks[key]
            module._forward_hooks_always_called.pop(key, None)
    del module._modules[WEIGHT_NOISE_NAME]
    return True


_STD_FIELDS = ("input_std", "hidden_std", "conv_std", "recurrent_std", "weight_std")


@dataclass
class NoiseConfig:
    """``regularizers.noise``: standard deviations per place; 0 leaves a place out."""

    input_std: float = nonneg(0.1, doc="noise on the model input")
    hidden_std: float = nonneg(0.0, doc="noise after hidden Linear layers (after their activation)")
    conv_std: float = nonneg(0.0, doc="noise after conv layers (after BatchNorm and activation)")
    recurrent_std: float = nonneg(0.0, doc="noise on recurrent layer outputs")
    weight_std: float = nonneg(0.0, doc="noise on the weights of layers of weight_kinds, per forward pass")
    #: The layer kinds whose weights get ``weight_std`` noise (put back exactly after each forward pass).
    weight_kinds: list[Literal["hidden", "conv"]] = field(default_factory=lambda: ["hidden", "conv"])

    def __post_init__(self) -> None:
        check_finite(self, _STD_FIELDS)


class Noise(InjectingRegularizer):
    """Gaussian noise on the input, on activations per layer kind, and on weights."""

    name = "noise"
    family = "noise"
    description = "additive Gaussian noise on inputs, activations per layer kind, and weights (training only)"
    Config = NoiseConfig
    kinds = (K.INPUT, K.HIDDEN, K.CONV, K.RECURRENT)
    variant = "gaussian_noise"

    def rate_for(self, kind: str, ctx: PlanContext, layer: LayerInfo | None = None) -> tuple[float | None, str]:
        """The std for ``kind`` from ``<kind>_std`` (None when 0: the kind is left out), the same for every layer."""
        std = float(getattr(self.config, f"{kind}_std", 0.0) or 0.0)
        return (std or None), f"{kind}_std={std:g}"

    def make_module(self, kind: str, rate: float, item: PlanItem) -> nn.Module:
        return GaussianNoise(rate)

    def claims(self) -> tuple[str, ...]:
        """The kinds with a std > 0 (for the family check of :func:`regfw.placement.plan.make_plan`)."""
        return tuple(k for k in self.kinds if getattr(self.config, f"{k}_std", 0.0))

    def plan(self, model: nn.Module, ctx: PlanContext) -> list[PlanItem]:
        """Input and activation noise placed as dropout is, plus one ``wrap`` row per noisy weight.

        Unlike dropout, an existing dropout layer after a layer is neither reused nor changed:
        the noise goes after the activation, before that dropout. Noise regfw inserted earlier
        (planning a model twice) gets a ``set`` row that updates its std.
        """
        mm = model_map(model, ctx)
        items: list[PlanItem] = []
        for info in mm.layers:
            if info.is_input:
                std, reason = self.rate_for(K.INPUT, ctx)
                if std:
                    items.append(self._row(mm, info.path, K.INPUT, std, reason, "before", info.path))
            if info.kind in self.kinds and info.kind != K.INPUT and not info.is_output:
                std, reason = self.rate_for(info.kind, ctx)
                if std:
                    anchor, _existing, skipped = after_anchor(mm, info.path)
                    if skipped:
                        reason += f"; after {', '.join(skipped)}"
                    items.append(self._row(mm, info.path, info.kind, std, reason, "after", anchor))
            weight_std = self.config.weight_std
            if weight_std and info.kind is not None and info.kind in self.config.weight_kinds and info.path:
                if isinstance(info.module._parameters.get("weight"), nn.Parameter):
                    items.append(PlanItem(self.name, info.path, info.kind, "weight_noise", weight_std,
                                          f"weight_std={weight_std:g}", action="wrap", anchor=info.path,
                                          options={"names": ["weight"]}))
        if not items:
            warnings.warn(
                f"regularizer {self.name!r} found nothing to do in {type(model).__name__}: every std is 0 "
                f"or no layer matches; set one of {', '.join(_STD_FIELDS)} > 0",
                stacklevel=3,
            )
        return items

    def _row(self, mm, path: str, kind: str, std: float, reason: str, action: str, anchor: str) -> PlanItem:
        own = injected_name(self.name, action)
        if own in mm.module(anchor)._modules:
            target = f"{anchor}.{own}" if anchor else own
            return PlanItem(self.name, path, kind, self.variant, std, reason + "; inserted before, std set",
                            action="set", anchor=target)
        return PlanItem(self.name, path, kind, self.variant, std, reason, action=action, anchor=anchor)

    def set_existing(self, model: nn.Module, item: PlanItem) -> None:
        """A set row names a GaussianNoise this regularizer inserted in an earlier plan: its std."""
        assert item.anchor is not None and item.rate is not None  # _row() fills both on a set row
        cast(GaussianNoise, model.get_submodule(item.anchor)).std = item.rate

    def wrap(self, model: nn.Module, item: PlanItem) -> None:
        """A wrap row: weight noise on the layer at ``item.path``."""
        assert item.rate is not None  # plan() gives every wrap row its weight_std
        host = model.get_submodule(item.path)
        add_weight_noise(host, item.rate, item.options.get("names", ["weight"]))


@hookimpl
def regfw_register_regularizers(register):
    register(Noise)
