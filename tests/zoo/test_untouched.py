"""Planning, applying and sampling leave a zoo model as it was, apart from what the plan says it does.

Compared before and after, per module (:func:`regfw.placement.untouched.fingerprint`): every
attribute (by identity), the items of its dict / list / set attributes (caches such as timm's
attention-bias cache, the hook tables, the child table) and its buffers' values.

* planning changes nothing (its eval and training passes and its ``torch.fx`` traces run on the
  model and are undone);
* applying changes only the anchors of the plan's rows: the inserted ``regfw_*`` children, the
  hooks that call them, and the rate of an existing dropout a ``set`` row names;
* Monte Carlo sampling (``batched`` and ``auto``, whose ``torch.fx`` trace runs the model's
  forward too) changes nothing.

The model's own use fills its caches first (one eval forward), as it would before a user plans
it. Besides the zoo, two timm families whose forward keeps an attention-bias cache (LeViT,
EfficientFormer), where a planning trace once left a traced object in the cache and the ``auto``
trace then failed on it (``KeyError: getitem_6``).
"""
from __future__ import annotations

import warnings

import pytest
import timm
import torch
from torch import nn

from regfw.placement.plan import apply_plan, make_plan
from regfw.placement.untouched import differences, fingerprint
from regfw.registry.regularizers import build_regularizers
from regfw.uncertainty import mc_predict

from .models import ZOO, build
from .test_zoo import VARIANTS, sampled

CACHING = ("levit_128s", "efficientformer_l1")
CASES = [pytest.param(name, entry.variants[0], id=f"{name}-{entry.variants[0]}") for name, entry in ZOO.items()]
CASES += [pytest.param(name, "drop_path", id=f"{name}-drop_path") for name, entry in ZOO.items()
          if "drop_path" in entry.variants and entry.variants[0] != "drop_path"]
CASES += [pytest.param(name, "dropout", id=f"{name}-dropout") for name in CACHING]
#: What applying a row may change on its anchor (``inplace``: a rate set on an in-place dropout makes it drop out
#: of place, :func:`regfw.placement.foreign.set_rate`).
APPLIED = ("_forward_hooks", "_forward_pre_hooks", "p", "drop_prob", "inplace")


def unexplained(changes: list[str], plan) -> list[str]:
    anchors = {r.anchor for r in plan.rows() if r.action != "note"}
    return [c for c in changes if c.split(":")[0] not in anchors or c.split(":")[1] not in APPLIED]


def build_any(name: str) -> tuple[nn.Module, torch.Tensor, nn.Module]:
    """The model, its example input and what MC samples (the model, or its one sampled output)."""
    if name in ZOO:
        model, x = build(ZOO[name])
        return model, x, sampled(ZOO[name], model)
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False, num_classes=10).eval()
    x = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(1))
    return model, x, model


@pytest.mark.parametrize(("name", "variant"), CASES)
def test_planning_applying_and_sampling_leave_the_model_untouched(name: str, variant: str) -> None:
    model, x, target = build_any(name)
    model.eval()
    with torch.no_grad():
        model(x)
    before = fingerprint(model)
    regs = build_regularizers(VARIANTS[variant])
    plan = make_plan(model, regs, n_examples=10_000, example_input=x)
    assert differences(before, fingerprint(model)) == [], "planning changed the model"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        apply_plan(model, regs, plan)
    applied = fingerprint(model, skip=("regfw_",))
    assert unexplained(differences(before, applied), plan) == [], "applying changed more than its rows"
    if name in CACHING:
        caches = [m.attention_bias_cache for m in model.modules() if hasattr(m, "attention_bias_cache")]
        assert caches and all(type(v) is torch.Tensor for c in caches for v in c.values())
    transform = ZOO[name].output_transform if name in ZOO else None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # auto's notice when it uses batched
        for strategy in ("batched", "auto"):
            mc_predict(target, x, samples=16, strategy=strategy, seed=0, output_transform=transform,
                       **({"choose": False} if strategy == "auto" else {}))  # the split itself
            assert differences(applied, fingerprint(model, skip=("regfw_",))) == [], f"sampling ({strategy})"
