"""The step regularizers (R-Drop, mixup, CutMix, label smoothing, confidence penalty) around a model
compiled with ``torch.compile(fullgraph=True)``: the regularized step of :func:`regfw.train.steps.regularized_step`
runs, its loss terms are those of the compiled model's outputs, and no step recompiles the model.
The backend is ``aot_eager`` (Dynamo's capture and AOTAutograd, see ``test_compile.py``)."""
from __future__ import annotations

import pytest
import torch
import torch._dynamo.testing
import torch.nn.functional as F
from torch import nn

from regfw.placement.plan import apply_plan, make_plan
from regfw.registry.regularizers import build_regularizers
from regfw.train.steps import regularized_step

SECTIONS = {
    "rdrop": {"rdrop": {"alpha": 1.0}},
    "rdrop in two calls": {"rdrop": {"alpha": 1.0, "batched": False}},
    "mixup": {"mixup": {"alpha": 0.4}},
    "cutmix": {"mixup": {"alpha": 1.0, "cutmix": True}},
    "label_smoothing": {"label_smoothing": {"epsilon": 0.1}},
    "confidence_penalty": {"confidence_penalty": {"strength": 0.1}},
}


def model_with_dropout() -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 6 * 6, 32),
                          nn.ReLU(), nn.Linear(32, 5))
    x = torch.randn(2, 3, 6, 6)
    regs = build_regularizers({"dropout": {}})
    apply_plan(model, regs, make_plan(model, regs, 1000, x))
    return model


@pytest.mark.parametrize("name", list(SECTIONS))
def test_step_regularizers_train_a_compiled_model_without_recompiling(name):
    model = model_with_dropout().train()
    regs = build_regularizers(SECTIONS[name])
    counter = torch._dynamo.testing.CompileCounterWithBackend("aot_eager")
    torch._dynamo.reset()
    compiled = torch.compile(model, backend=counter, fullgraph=True)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    gen = torch.Generator().manual_seed(5)
    frames = []
    for _ in range(4):
        x, y = torch.randn(8, 3, 6, 6, generator=gen), torch.randint(0, 5, (8,), generator=gen)
        result = regularized_step(regs, compiled, x, y, F.cross_entropy, task="classification")
        opt.zero_grad()
        result.total.backward()
        opt.step()
        assert torch.isfinite(result.total), result
        frames.append(counter.frame_count)
        terms = {k: float(v) for k, v in result.terms.items()}
        if name == "rdrop":  # two copies of the batch with independent masks in one compiled call: KL > 0
            assert terms["rdrop"] > 1e-4, terms
        if name == "rdrop in two calls":  # (NLL2 - NLL1) / 2 + KL: 0 only for two identical passes
            assert abs(terms["rdrop"]) > 1e-4, terms
        if name == "confidence_penalty":
            assert terms["confidence_penalty"] < 0, terms
    assert frames[1] == frames[-1] <= 2, frames  # no graph per step
    assert all(torch.isfinite(p).all() for p in model.parameters())
