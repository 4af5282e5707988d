"""Dropout, weight decay, input noise and max-norm in one config on the ``cnn`` demo: each one acts."""
from __future__ import annotations

import pytest
import pytorch_lightning as pl
import torch
from regfw_plugins.max_norm import incoming_norms
from regfw_plugins.noise import GaussianNoise

from regfw.build.datasets import DigitsDataModule
from regfw.train.module import RegularizedModule

C = 0.5  # below the typical initial incoming norm of the cnn (about 0.58), so max-norm binds from step 1
STEPS = 12




@pytest.fixture(scope="module")
def digits():
    return DigitsDataModule(train_fraction=0.3, batch_size=64, seed=0)


def _regularizers(decay: bool) -> dict:
    regs = {
        "dropout": {"input": 0, "conv": 0, "hidden": 0.5},
        "weight_decay": {"strength": 1.0},
        "noise": {"input_std": 0.2},
        "max_norm": {"max_value": C},
    }
    if not decay:
        regs["weight_decay"] = False
    return regs


def _fit(digits, decay: bool):
    pl.seed_everything(0, verbose=False)
    module = RegularizedModule(model_config={"name": "cnn", "init_args": {"in_features": 64, "num_outputs": 10}},
                               regularizers=_regularizers(decay), optimizer={"name": "adam", "lr": 0.01},
                               n_examples=digits.n_train, example_input=digits.example_input())
    initial = {p: incoming_norms(module.model.get_submodule(p)).max().item()
               for p in ("features.0", "features.3", "classifier.1")}
    trainer = pl.Trainer(max_steps=STEPS, limit_val_batches=0, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, accelerator="cpu", devices=1)
    trainer.fit(module, datamodule=digits)
    return module, initial


@pytest.fixture(scope="module")
def trained(digits):
    return _fit(digits, decay=True), _fit(digits, decay=False)


def _capture(module, cls_or_name):
    """(input, output) of the first injected module matching, from one forward pass in training mode."""
    seen = {}
    target = next(m for n, m in module.model.named_modules()
                  if (isinstance(cls_or_name, type) and isinstance(m, cls_or_name)) or n.endswith(str(cls_or_name)))
    handle = target.register_forward_hook(lambda m, args, out: seen.update(x=args[0].detach(), y=out.detach()))
    return seen, handle, target


def test_every_regularizer_is_planned(trained):
    (module, _), _ = trained
    names = {row.regularizer for row in module.plan.rows()}
    assert names == {"dropout", "noise", "max_norm"}
    assert "weight_decay" in module.plan.notes  # its groups are described, it inserts nothing


def test_dropout_drops_half_of_the_hidden_units_in_training(trained, digits):
    (module, _), _ = trained
    seen, handle, layer = _capture(module, "classifier.2.regfw_dropout")
    module.train()
    torch.manual_seed(0)
    module(digits.x_val)
    handle.remove()
    active = seen["x"] != 0
    dropped = (seen["y"][active] == 0).float().mean().item()
    assert abs(dropped - 0.5) < 0.03  # ~10^4 active units: the std of the fraction is ~0.005
    kept = seen["y"][active & (seen["y"] != 0)] / seen["x"][active & (seen["y"] != 0)]
    assert torch.allclose(kept, torch.full_like(kept, 2.0))  # inverted dropout scales by 1/(1-p)
    module.eval()
    assert torch.equal(module(digits.x_val), module(digits.x_val))


def test_input_noise_perturbs_the_input_with_the_configured_std(trained, digits):
    (module, _), _ = trained
    seen, handle, layer = _capture(module, GaussianNoise)
    assert layer.std == 0.2
    module.train()
    module(digits.x_val)
    handle.remove()
    diff = seen["y"] - seen["x"]
    assert seen["x"].shape[1:] == (1, 8, 8)  # on the image the first conv consumes
    assert abs(diff.std().item() - 0.2) < 0.01  # 450 x 64 values
    assert abs(diff.mean().item()) < 0.005


def test_weight_decay_shrinks_the_decay_group_against_the_same_run_without_it(trained):
    (decayed, _), (plain, _) = trained
    # the output layer is not max-norm constrained, so only decay can shrink it; Adam's step is
    # the same size in both runs, the decay removes lr * 1.0 = 1% of the weight per step
    head = lambda m: m.model.classifier[3].weight.detach().pow(2).sum().item()  # noqa: E731
    assert head(decayed) < 0.9 * head(plain)
    # biases and BatchNorm parameters are in the no-decay group
    groups = decayed.configure_optimizers().param_groups
    no_decay = next(g for g in groups if g["regfw_group"] == "no_decay")
    assert any(p is decayed.model.features[1].weight for p in no_decay["params"])


def test_max_norm_bounds_hidden_units_that_started_above_c(trained):
    (module, initial), _ = trained
    for path, start in initial.items():
        assert start > C  # units started above the bound ...
        norms = incoming_norms(module.model.get_submodule(path))
        assert norms.max().item() <= C * (1 + 1e-6)  # ... and ends within it
