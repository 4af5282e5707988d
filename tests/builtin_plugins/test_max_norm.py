"""The ``max_norm`` plugin: a bound on the norm of each hidden unit's incoming weights, kept after every step."""
from __future__ import annotations

import pytest
import pytorch_lightning as pl
import torch
from regfw_plugins.max_norm import MaxNorm, MaxNormConfig, incoming_norms, max_norm_
from torch import nn

from regfw.build.datasets import DigitsDataModule
from regfw.errors import ConfigError
from regfw.placement.plan import apply_plan, make_plan
from regfw.registry.regularizers import build_regularizers
from regfw.train.module import RegularizedModule

# -- max_norm: the constraint itself ----------------------------------------------------------------


def test_max_norm_rescales_rows_above_c_and_leaves_the_others_bit_for_bit():
    layer = nn.Linear(4, 3)
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([[0.5, 0.5, 0.5, 0.5],  # norm 1
                                         [3.0, 4.0, 0.0, 0.0],  # norm 5
                                         [-6.0, 0.0, 8.0, 0.0]]))  # norm 10
    before = layer.weight.detach().clone()
    bias = layer.bias.detach().clone()
    assert max_norm_(layer, 3.0) == 2
    norms = incoming_norms(layer)
    assert torch.allclose(norms, torch.tensor([1.0, 3.0, 3.0]), rtol=1e-6, atol=0)
    assert torch.equal(layer.weight[0], before[0])
    assert torch.allclose(layer.weight[1:], before[1:] * (3.0 / torch.tensor([[5.0], [10.0]])), rtol=1e-6)
    assert torch.equal(layer.bias, bias)
    again = layer.weight.detach().clone()
    max_norm_(layer, 3.0 * (1 + 1e-5))  # all within the bound now: nothing changes
    assert torch.equal(layer.weight, again)


@pytest.mark.parametrize("make", [
    lambda: nn.Conv2d(4, 6, 3, groups=2),
    lambda: nn.ConvTranspose2d(4, 6, 3, groups=2),
    lambda: nn.Conv1d(3, 5, 2),
])
def test_incoming_norms_are_per_output_unit_for_convolutions(make):
    torch.manual_seed(0)
    layer = make()
    with torch.no_grad():
        layer.weight.mul_(50.0)
    w = layer.weight.detach()
    if isinstance(layer, nn.ConvTranspose2d):  # weight [in, out/g, k, k]: unit j of group g
        g, out_g, in_g = layer.groups, w.shape[1], w.shape[0] // layer.groups
        expected = torch.stack([w[gi * in_g:(gi + 1) * in_g, j].norm() for gi in range(g) for j in range(out_g)])
    else:  # weight [out, in/g, *k]
        expected = torch.stack([w[j].norm() for j in range(w.shape[0])])
    assert torch.allclose(incoming_norms(layer), expected, rtol=1e-5)
    max_norm_(layer, 1.0)
    assert incoming_norms(layer).max() <= 1.0 + 1e-5
    assert incoming_norms(layer).min() > 0.99  # every unit was above 1, so every unit sits at c


def test_max_norm_config_is_checked():
    with pytest.raises(ConfigError, match=r"regularizers\.max_norm\.max_value: got 0"):
        build_regularizers({"max_norm": {"max_value": 0}})
    with pytest.raises(ConfigError, match=r"regularizers\.max_norm\.kinds\[0\]: got 'recurrent'"):
        build_regularizers({"max_norm": {"kinds": ["recurrent"]}})
    with pytest.raises(ConfigError, match=r"regularizers\.max_norm\.kinds: got an empty list"):
        build_regularizers({"max_norm": {"kinds": []}})
    assert MaxNormConfig().max_value == 3.0


# -- max_norm in training -------------------------------------------------------------------------------


def _fit(regularizers, steps=8):
    pl.seed_everything(0, verbose=False)
    dm = DigitsDataModule(train_fraction=0.2, batch_size=32, seed=0)
    module = RegularizedModule(model_config={"name": "mlp", "init_args": {"in_features": 64, "num_outputs": 10,
                                                                          "hidden": [32, 32]}},
                               regularizers=regularizers, optimizer={"name": "sgd", "lr": 0.5},
                               example_input=dm.example_input())
    trainer = pl.Trainer(max_steps=steps, limit_val_batches=0, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, accelerator="cpu", devices=1)
    trainer.fit(module, datamodule=dm)
    return module, trainer


def test_max_norm_bounds_hidden_units_after_every_step_and_skips_the_output_layer():
    c = 0.4
    plain, _ = _fit({})
    module, trainer = _fit({"max_norm": {"max_value": c}})
    hidden = ["body.0", "body.2"]
    assert [row.path for row in module.plan.rows()] == hidden
    for path in hidden:
        assert incoming_norms(module.model.get_submodule(path)).max() <= c * (1 + 1e-6)
    # the bound is binding: without it the same training leaves norms above c
    assert max(float(incoming_norms(plain.model.get_submodule(p)).max()) for p in hidden) > 1.2 * c
    # the output layer's units are not hidden units: unconstrained by default
    assert incoming_norms(module.model.head).max() > c
    assert not trainer.optimizers[0]._optimizer_step_post_hooks  # removed when the fit ended


def test_max_norm_attach_runs_after_every_plain_torch_step():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 2))
    reg = MaxNorm(MaxNormConfig(max_value=0.3, output=True))
    apply_plan(model, [reg], make_plan(model, [reg]))
    assert [t for t in reg.targets] == [model[0], model[2]]
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    handle = reg.attach(opt)
    x, y = torch.randn(64, 8), torch.randint(0, 2, (64,))
    for _ in range(3):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        assert incoming_norms(model[0]).max() <= 0.3 * (1 + 1e-6)
        assert incoming_norms(model[2]).max() <= 0.3 * (1 + 1e-6)
    handle.remove()
