"""The ``max_norm`` regularizer: each unit's incoming weight vector kept at norm <= c.

Srivastava et al., "Dropout: A Simple Way to Prevent Neural Networks from Overfitting", JMLR
2014, section 5.1: after every update, the vector of weights coming into each hidden unit is
rescaled to have L2 norm at most ``c`` (they use c = 3 to 4 with dropout; the default here is
3, as Keras' ``MaxNorm`` recommends). The constraint lets dropout use large learning rates
without the weights blowing up.

For a ``Linear`` (weight ``[out, in]``) the incoming vector of unit ``j`` is row ``j``; for a
convolution (``[out, in/groups, *kernel]``) it is output channel ``j``'s whole filter; for a
transposed convolution (``[in, out/groups, *kernel]``) it is the slice of ``weight[:, j]``
within the unit's group. Vectors already within the bound are left untouched, bit for bit
(Keras' version shrinks them slightly by an epsilon). Biases are not constrained.

By default the layers of kinds ``hidden`` and ``conv`` are constrained except the model's
output layer, whose units are not hidden units; ``output: true`` includes it. Outside
Lightning, call :meth:`MaxNorm.constrain` after ``optimizer.step()`` or
:meth:`MaxNorm.attach` to an optimizer.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import nn

from regfw.extend import PlanContext, PlanItem, Regularizer, check_finite, classify_model, hookimpl, positive

DEFAULT_MAX_VALUE = 3.0


def _unit_view(module: nn.Module, weight: torch.Tensor) -> tuple[torch.Tensor, tuple[int, ...]]:
    """A view of ``weight`` with unit axes kept and ``dims`` the axes of each incoming vector."""
    if isinstance(module, nn.modules.conv._ConvTransposeNd):
        groups = module.groups
        view = weight.unflatten(0, (groups, weight.shape[0] // groups))  # [g, in/g, out/g, *k]
        return view, (1, *range(3, view.ndim))
    return weight, tuple(range(1, weight.ndim))


def _weight(module: nn.Module) -> torch.Tensor:
    weight = module.weight
    if not isinstance(weight, torch.Tensor):
        raise TypeError(f"max_norm expects a layer with a weight tensor, got {type(module).__name__}.weight "
                        f"of type {type(weight).__name__}")
    return weight


def incoming_norms(module: nn.Module, weight: torch.Tensor | None = None) -> torch.Tensor:
    """The L2 norm of every unit's incoming weight vector, one value per output unit (flat)."""
    weight = _weight(module) if weight is None else weight
    view, dims = _unit_view(module, weight.detach())
    return torch.linalg.vector_norm(view, dim=dims).flatten()


@torch.no_grad()
def max_norm_(module: nn.Module, max_value: float = DEFAULT_MAX_VALUE) -> int:
    """Rescale in place every incoming weight vector of ``module`` with norm > ``max_value``.

    Returns how many vectors were rescaled. Those within the bound are not touched.
    """
    view, dims = _unit_view(module, _weight(module))
    norms = torch.linalg.vector_norm(view, dim=dims, keepdim=True)
    over = norms > max_value
    count = int(over.sum())
    if count:
        factor = torch.where(over, max_value / norms, torch.ones_like(norms))
        view.mul_(factor.to(view.dtype))
    return count


def _constrainable(module: nn.Module) -> bool:
    weight = getattr(module, "weight", None)
    return isinstance(weight, nn.Parameter) and weight.ndim >= 2 and weight.requires_grad


@dataclass
class MaxNormConfig:
    """``regularizers.max_norm``: the bound and the layers it applies to."""

    max_value: float = positive(DEFAULT_MAX_VALUE, doc="c: the largest allowed incoming weight norm per unit")
    #: The layer kinds whose units are bounded: hidden Linear layers, conv layers (per output channel).
    kinds: list[Literal["hidden", "conv"]] = field(default_factory=lambda: ["hidden", "conv"])
    #: Also constrain the model's output layer (its units are not hidden units).
    output: bool = False

    def __post_init__(self) -> None:
        check_finite(self, ("max_value",))
        if not self.kinds:
            raise ValueError("kinds: got an empty list, expected at least one of 'hidden', 'conv'")


class MaxNorm(Regularizer):
    """Max-norm constraint on incoming weight vectors after every optimizer step."""

    name = "max_norm"
    description = "rescale each unit's incoming weights to L2 norm <= c after every step (Srivastava 2014)"
    Config = MaxNormConfig

    def __init__(self, config: Any = None) -> None:
        super().__init__(config)
        self.targets: list[nn.Module] = []

    def plan(self, model: nn.Module, ctx: PlanContext) -> list[PlanItem]:
        c = self.config.max_value
        items = []
        for info in ctx.layers or classify_model(model, ctx.example_input):
            if info.kind is None or info.kind not in self.config.kinds or (info.is_output and not self.config.output):
                continue
            if not _constrainable(info.module):
                continue
            units = incoming_norms(info.module).numel()
            items.append(PlanItem(self.name, info.path, info.kind, f"max_norm(c={c:g})", None,
                                  f"incoming weight norm of each of {units} units <= {c:g} after every step",
                                  action="note", anchor=info.path, options={"max_value": c}))
        return items

    def apply(self, model: nn.Module, items: list[PlanItem]) -> None:
        """Remember the planned layers; the constraint runs from :meth:`callbacks` or :meth:`attach`."""
        self.targets = [model.get_submodule(item.path) if item.path else model for item in items]

    def constrain(self) -> int:
        """Apply the constraint to every planned layer now; returns the vectors rescaled."""
        return sum(max_norm_(m, self.config.max_value) for m in self.targets)

    def attach(self, optimizer: torch.optim.Optimizer) -> Any:
        """Constrain after every ``optimizer.step()`` (plain torch); returns the removable handle."""
        def hook(opt: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
            self.constrain()

        return optimizer.register_step_post_hook(hook)

    def callbacks(self) -> list:
        from regfw.extend import StepPostHookCallback

        return [StepPostHookCallback(self.constrain)]


@hookimpl
def regfw_register_regularizers(register):
    register(MaxNorm)
