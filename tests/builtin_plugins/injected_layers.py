"""Measuring a regularizer's injected layer *inside the model*, shared by the dropout-family plugin tests.

The model is put in eval mode with only regfw's inserted modules in training mode (as Monte Carlo
dropout does), a forward hook registered after regfw's hook reads what the next layer receives, and
the same input in full eval mode gives the reference. Statistical tests built on these helpers fix
their seeds and state each tolerance next to its assertion (binomial standard error
``sigma(p, n) = sqrt(p (1 - p) / n)``, allowed 5 sigma unless said otherwise).
"""
from __future__ import annotations

import math
import warnings

import torch
from torch import nn

from regfw.build.models import BUILTIN_MODELS
from regfw.extend import PlanItem
from regfw.placement.plan import Plan, apply_plan, make_plan
from regfw.registry.regularizers import build_regularizers


def regularize(model: nn.Module, x: torch.Tensor, regs: dict, n: int = 1000) -> Plan:
    """Plan and apply the regularizers of the config section ``regs`` on ``model`` (N = ``n`` examples)."""
    rs = build_regularizers(regs)
    plan = make_plan(model, rs, n, x)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        apply_plan(model, rs, plan)
    return plan


def builtin(name: str) -> nn.Module:
    """The built-in model ``name`` for 64 features and 10 classes, seeded."""
    torch.manual_seed(0)
    return BUILTIN_MODELS[name](in_features=64, num_outputs=10)


def only_injected_in_training(model: nn.Module) -> None:
    """Eval mode except for the modules regfw inserted (their names start with ``regfw_``)."""
    model.eval()
    for name, module in model.named_modules():
        if name.split(".")[-1].startswith("regfw_"):
            module.train()


def seen_after(model: nn.Module, path: str, x: torch.Tensor, seed: int = 0, reference: bool = False):
    """What the module at ``path`` passes on (after regfw's hooks): stochastic, or the reference."""
    got = []
    # A copy: the model may change the tensor in place afterwards (``out += identity``).
    handle = model.get_submodule(path).register_forward_hook(
        lambda m, a, out: got.append(out.clone() if isinstance(out, torch.Tensor) else out))
    try:
        if reference:
            model.eval()
        else:
            only_injected_in_training(model)
        torch.manual_seed(seed)
        with torch.no_grad():
            model(x)
    finally:
        handle.remove()
    return got[0]


def row(plan: Plan, **match) -> PlanItem:
    """The one row of ``plan`` whose fields equal ``match``."""
    rows = [r for r in plan.rows() if all(getattr(r, k) == v for k, v in match.items())]
    assert len(rows) == 1, rows
    return rows[0]


def sigma(p: float, n: int) -> float:
    """The binomial standard error of a rate ``p`` measured on ``n`` draws."""
    return math.sqrt(p * (1 - p) / n)
