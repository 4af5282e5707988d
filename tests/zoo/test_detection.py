"""The zoo's detection model: torchvision's Faster R-CNN (MobileNetV3 FPN backbone), random weights.

Its forward takes a list of images and returns, in eval mode, a list of per-image dicts (boxes,
labels, scores); in training mode it takes the targets too and returns its own losses. So:

* the list ``example_input`` is planned on, and every layer feeding any output is an output layer
  (the RPN's ``cls_logits`` and ``bbox_pred``, the box predictor's ``cls_score`` and ``bbox_pred``):
  none gets dropout; the plan matches its reviewed snapshot;
* eval output exactly unchanged by the surgery, BatchNorm statistics untouched;
* a training step as a user writes it, ``sum(model(images, targets).values())``, runs with the
  inserted dropout and changes the weights;
* Monte Carlo dropout refuses it with a message saying what it accepts: the per-image results
  vary in size from sample to sample and cannot be stacked (every strategy);
* ``RegularizedModule``, whose step is ``loss(model(inputs), targets)``, refuses it naming why and
  what to do instead.
"""
from __future__ import annotations

import copy
import warnings

import pytest
import torch

from regfw.errors import ConfigError
from regfw.placement import foreign
from regfw.placement.plan import apply_plan, make_plan
from regfw.registry.regularizers import build_regularizers
from regfw.train.module import RegularizedModule
from regfw.uncertainty import mc_predict
from regfw.uncertainty.sampling import stochastic_types

from .models import DETECTION, detection_targets, detector
from .test_zoo import OUTPUT_LAYERS, VARIANTS, bn_state, check_places, check_snapshot, injected


def test_detection_model() -> None:
    entry = DETECTION
    torch.manual_seed(0)
    model, images = entry.build().eval(), entry.example()
    with torch.no_grad():
        reference = copy.deepcopy(model(images))
    assert reference[0]["boxes"].shape[0] > 0, "the random-init detector should return boxes to compare"
    stats = bn_state(model)
    types = stochastic_types()
    before = {p: m for p, m in model.named_modules() if isinstance(m, types) or foreign.foreign_layer(m) is not None}

    regs = build_regularizers(VARIANTS["dropout"])
    plan = make_plan(model, regs, n_examples=10_000, example_input=images)
    check_snapshot(f"{entry.name}__dropout", plan.format() + "\n")
    assert {i.path for i in plan.layers if i.is_output} == OUTPUT_LAYERS[entry.name]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        apply_plan(model, regs, plan)
    check_places(entry, model, plan, before)
    assert "roi_heads.box_head.fc7.regfw_dropout" in injected(model)  # the box head's hidden layers do get it

    model.eval()
    with torch.no_grad():
        after = model(images)
    assert len(after) == len(reference)
    for ref, out in zip(reference, after, strict=True):
        assert ref.keys() == out.keys()
        for key in ref:
            assert torch.equal(ref[key], out[key]), f"eval output {key!r} changed"
    for key, value in bn_state(model).items():
        assert torch.equal(value, stats[key]), f"BatchNorm statistics {key} changed"

    # auto refuses the list of images, loop the per-image dicts of boxes the model returns
    for strategy, what in (("loop", r"got a list of 2 dicts with keys 'boxes', 'labels', 'scores'; expected one "
                                    r"tensor"),
                           ("auto", r"got a list of 2 \(Tensor\[3, \d+, \d+\], Tensor\[3, \d+, \d+\]\), "
                                    r"expected one input batch.*one tensor of logits \[B, C\]")):
        with pytest.raises(TypeError, match=what + r".*cannot be stacked"):
            mc_predict(model, images, samples=4, strategy=strategy, seed=0)
    with pytest.raises(TypeError, match=r"got a list of 2 dicts with keys 'boxes', 'labels', 'scores'.*cannot be "
                                        r"stacked"):
        mc_predict(model, torch.stack(images), samples=4, strategy="loop", seed=0)

    model.train()
    losses = model(images, detection_targets())
    assert set(losses) == {"loss_classifier", "loss_box_reg", "loss_objectness", "loss_rpn_box_reg"}
    loss = sum(losses.values())
    assert torch.isfinite(loss)
    head = model.roi_heads.box_head.fc6.weight
    first = head.detach().clone()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    opt.zero_grad()
    loss.backward()
    opt.step()
    assert not torch.equal(first, head.detach()), "the training step changed no weight of the box head"


def test_regularized_module_refuses_a_detection_model_saying_why() -> None:
    with pytest.raises(ConfigError, match=r"model: FasterRCNN.forward takes 'targets' and computes its own losses in "
                                          r"training .* loss = sum\(model\(images, targets\).values\(\)\)"):
        RegularizedModule(detector(), regularizers={"dropout": {}})
