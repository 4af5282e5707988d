"""The cached index of a model's stochastic modules (regfw.uncertainty.modes.model_index): reused
while nothing changes, rebuilt on every change that matters, never keeping a model alive."""
from __future__ import annotations

import gc
import weakref

import torch
import torch.nn.functional as F
from torch import nn

from regfw.uncertainty import eval_mode, mc_mode, mc_predict, stochastic_modules
from regfw.uncertainty.modes import checked_index, model_index, structure_signature


def mlp() -> nn.Sequential:
    return nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Dropout(0.5), nn.Linear(8, 3))


def test_the_index_is_reused_until_the_structure_or_a_rate_changes():
    model = mlp()
    first = model_index(model)
    assert model_index(model) is first
    assert [p for p, _ in stochastic_modules(model)] == ["3"]
    model[3].p = 0.0  # a rate switched to 0: no longer stochastic
    second = model_index(model)
    assert second is not first and stochastic_modules(model) == []
    model[3].p = 0.2
    assert [p for p, _ in stochastic_modules(model)] == ["3"]
    model[4] = nn.Sequential(nn.Dropout(0.1), nn.Linear(8, 3))  # a child replaced
    assert [p for p, _ in stochastic_modules(model)] == ["3", "4.0"]
    inner = model[4]
    del model[4]
    model.add_module("head", inner)  # renamed: same modules, other paths
    assert [p for p, _ in stochastic_modules(model)] == ["3", "head.0"]
    model.head[1].__class__ = nn.Identity  # retyped in place
    before = model_index(model)
    model.head._modules["1"] = nn.Dropout(0.3)  # changed behind __setattr__'s back
    assert model_index(model) is not before
    assert [p for p, _ in stochastic_modules(model)] == ["3", "head.0", "head.1"]


def test_a_checked_index_is_returned_as_it_is_inside_its_block_only():
    model, other = mlp(), mlp()
    index = model_index(model)
    with checked_index(model, index):
        model[3].p = 0.0  # not looked at again inside the block (one MC call changes no module)
        assert model_index(model) is index
        assert model_index(other) is not index  # another model is checked as always
    assert model_index(model) is not index and stochastic_modules(model) == []  # checked again after it


def test_structure_signature_tells_trees_with_the_same_modules_apart():
    a, b, c = nn.Linear(1, 1), nn.ReLU(), nn.Tanh()
    left = nn.Sequential(nn.Sequential(a, b), c)
    right = nn.Sequential(nn.Sequential(a), nn.Sequential(b, c))
    assert structure_signature(left) != structure_signature(right)
    assert structure_signature(left) == structure_signature(left)


def test_a_functional_dropout_host_found_later_is_switched_on():
    class Host(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(4, 4)
            self.p = 0.5

        def forward(self, x):
            return F.dropout(self.fc(x), self.p, self.training)

    model = nn.Sequential(Host(), nn.Linear(4, 2), nn.Dropout(0.1))
    model_index(model)  # cached before any forward has been watched
    result = mc_predict(model, torch.randn(6, 4), samples=8, seed=0)
    assert [p for p, _ in stochastic_modules(model)] == ["0", "2"]
    with mc_mode(model):
        assert model[0].training and not model[0].fc.training and not model[1].training
    assert result.outputs.std(0).mean() > 0


def test_a_transformer_layer_whose_rate_becomes_positive_takes_its_stochastic_path():
    """The fused fast path skips dropout in eval; once a rate is raised from 0 the cached index is
    rebuilt, the layer is put in training mode, and the samples differ."""
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(16, 2, dim_feedforward=32, dropout=0.0, batch_first=True)
    model = nn.Sequential(layer, nn.Flatten(), nn.Linear(5 * 16, 3), nn.Dropout(0.0)).eval()
    x = torch.randn(4, 5, 16)
    assert stochastic_modules(model) == []
    for m in layer.modules():
        if isinstance(m, nn.Dropout):
            m.p = 0.1
    with mc_mode(model):
        assert layer.training and not layer.norm1.training and layer.dropout1.training
    outputs = mc_predict(model, x, samples=6, seed=1).outputs
    assert outputs.std(0).mean() > 1e-4


def test_flags_are_written_only_where_needed_and_restored_exactly():
    model = mlp().train()
    model[0].training = False  # a mixed state
    before = [m.training for m in model.modules()]
    with mc_mode(model) as on:
        assert on == [model[3]]
        assert [m.training for m in model] == [False, False, False, True, False] and not model.training
    assert [m.training for m in model.modules()] == before
    with eval_mode(model):
        assert not any(m.training for m in model.modules())
    assert [m.training for m in model.modules()] == before
    outside = nn.Dropout(0.5).eval()  # a module passed in that is not the model's
    with mc_mode(model, [outside]):
        assert outside.training and not model[3].training
    assert not outside.training


def test_the_index_keeps_no_model_alive_even_when_the_model_is_a_dropout():
    for make in (mlp, lambda: nn.Dropout(0.5), lambda: nn.TransformerEncoderLayer(8, 2, 16, batch_first=True)):
        model = make()
        model_index(model)
        with mc_mode(model):
            pass
        ref = weakref.ref(model)
        del model
        gc.collect()
        assert ref() is None
