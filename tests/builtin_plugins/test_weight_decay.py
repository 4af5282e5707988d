"""The weight_decay regularizer: timm's parameter groups, decoupled and L2 modes, config rules."""
from __future__ import annotations

import pytest
import pytorch_lightning as pl
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from regfw_plugins.weight_decay import (
    DECOUPLED_KEY,
    GROUP_KEY,
    WeightDecay,
    WeightDecayConfig,
)
from torch import nn

from regfw.build.datasets import DigitsDataModule
from regfw.config.schema import validate
from regfw.errors import ConfigError
from regfw.registry.regularizers import build_regularizers
from regfw.train.module import RegularizedModule
from regfw.train.params import split_parameters


class Net(nn.Module):
    """Every rule in one model: embedding tied to the head, norms, PReLU, 1-D and frozen params."""

    def __init__(self) -> None:
        super().__init__()
        self.pos = nn.Parameter(torch.randn(4, 8))  # 2-D, but named by no_weight_decay()
        self.scale = nn.Parameter(torch.ones(8))  # 1-D
        self.embed = nn.Embedding(10, 8)
        self.block = nn.Sequential(nn.Linear(8, 8), nn.LayerNorm(8), nn.PReLU(), nn.Linear(8, 8, bias=False),
                                   nn.BatchNorm1d(8))
        self.frozen = nn.Linear(8, 8)
        self.frozen.requires_grad_(False)
        self.head = nn.Linear(8, 10)
        self.head.weight = self.embed.weight  # tied, as in GPT

    def no_weight_decay(self) -> set[str]:
        return {"pos"}

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        h = self.block(self.embed(idx) * self.scale + self.pos.mean())
        return self.head(self.frozen(h))


def _names(entries):
    return [name for name, _, _ in entries]


def test_groups_follow_timm_rules_and_list_each_parameter_once():
    split = split_parameters(Net())
    assert _names(split.decay) == ["embed.weight", "block.0.weight", "block.3.weight"]
    reasons = {name: reason for name, _, reason in split.no_decay}
    assert reasons == {
        "pos": "model.no_weight_decay()",
        "scale": "1-D",
        "block.0.bias": "bias",
        "block.1.weight": "norm",
        "block.1.bias": "bias",
        "block.2.weight": "1-D",  # PReLU slope
        "block.4.weight": "norm",
        "block.4.bias": "bias",
        "head.bias": "bias",
    }
    assert split.frozen == ["frozen.weight", "frozen.bias"]
    # the tied embedding/head weight is one parameter, listed once
    model = Net()
    groups = WeightDecay().param_groups(model)
    ids = [id(p) for g in groups for p in g["params"]]
    assert len(ids) == len(set(ids))
    assert set(ids) == {id(p) for p in model.parameters() if p.requires_grad}
    assert [(g[GROUP_KEY], g["weight_decay"]) for g in groups] == [("decay", 0.01), ("no_decay", 0.0)]
    torch.optim.AdamW(groups)  # torch itself rejects a parameter in two groups


def test_embeddings_can_be_left_out_and_exclude_takes_names_globs_and_module_paths():
    model = nn.ModuleDict({"embed": nn.Embedding(5, 4), "body": nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4)),
                           "head": nn.Linear(4, 2)})
    no_emb = split_parameters(model, embeddings=False)
    assert ("embed.weight", "embedding") in [(n, r) for n, _, r in no_emb.no_decay]
    assert _names(split_parameters(model).decay) == ["embed.weight", "body.0.weight", "body.1.weight", "head.weight"]

    split = split_parameters(model, exclude=["head.*", "body.1"])
    assert _names(split.decay) == ["embed.weight", "body.0.weight"]
    reasons = {n: r for n, _, r in split.no_decay}
    assert reasons["head.weight"] == "excluded by 'head.*'"
    assert reasons["body.1.weight"] == "excluded by 'body.1'"
    assert _names(split_parameters(model, exclude=["body.0.weight"]).decay) == [
        "embed.weight", "body.1.weight", "head.weight"]

    with pytest.raises(ConfigError, match=r"regularizers\.weight_decay\.exclude\[1\]: pattern 'haed' matches no "
                                          r"parameter of ModuleDict"):
        split_parameters(model, exclude=["head", "haed"])


_LAYERS = {
    "linear": lambda: nn.Linear(3, 3),
    "nobias": lambda: nn.Linear(3, 3, bias=False),
    "layernorm": lambda: nn.LayerNorm(3),
    "batchnorm": lambda: nn.BatchNorm1d(3),
    "prelu": lambda: nn.PReLU(3),
    "embedding": lambda: nn.Embedding(3, 3),
    "conv": lambda: nn.Conv1d(3, 3, 1),
}


@settings(max_examples=40, deadline=None)
@given(
    layers=st.lists(st.tuples(st.sampled_from(sorted(_LAYERS)), st.booleans()), min_size=1, max_size=8),
    tie=st.booleans(),
    embeddings=st.booleans(),
    mode=st.sampled_from(["decoupled", "l2"]),
)
def test_no_parameter_is_in_two_groups(layers, tie, embeddings, mode):
    model = nn.Sequential()
    for i, (kind, frozen) in enumerate(layers):
        layer = _LAYERS[kind]()
        layer.requires_grad_(not frozen)
        model.add_module(str(i), layer)
    linears = [m for m in model if isinstance(m, nn.Linear)]
    if tie and len(linears) >= 2:
        linears[1].weight = linears[0].weight
    reg = WeightDecay(WeightDecayConfig(embeddings=embeddings, mode=mode))
    groups = reg.param_groups(model)
    ids = [id(p) for g in groups for p in g["params"]]
    assert len(ids) == len(set(ids))
    assert set(ids) == {id(p) for p in model.parameters() if p.requires_grad}
    assert all(p.ndim >= 2 for g in groups if g[GROUP_KEY] == "decay" for p in g["params"])
    if mode == "l2":
        assert all(g["weight_decay"] == 0.0 for g in groups)


def test_l2_mode_penalty_gradient_is_exactly_strength_times_w():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5), nn.BatchNorm1d(5), nn.Linear(5, 2))
    reg = WeightDecay(WeightDecayConfig(strength=0.37, mode="l2"))
    penalty = reg.penalty(model)
    w0, w2 = model[0].weight, model[2].weight
    expected = 0.5 * 0.37 * (w0.detach().pow(2).sum() + w2.detach().pow(2).sum())
    assert torch.allclose(penalty, expected, rtol=1e-6, atol=0)
    penalty.backward()
    assert torch.equal(w0.grad, 0.37 * w0.detach())
    assert torch.equal(w2.grad, 0.37 * w2.detach())
    for p in (model[0].bias, model[1].weight, model[1].bias, model[2].bias):
        assert p.grad is None  # biases and norms are not penalised
    assert WeightDecay().penalty(model) is None  # decoupled mode adds nothing to the loss
    assert WeightDecayConfig(mode="l2").value == 5e-4 and WeightDecayConfig().value == 1e-2


def test_selecting_it_with_optimizer_weight_decay_is_an_error_naming_both():
    raw = {"model": {"name": "mlp"}, "optimizer": {"name": "adamw", "weight_decay": 0.05},
           "regularizers": {"weight_decay": {}}}
    with pytest.raises(ConfigError) as info:
        validate(raw)
    message = str(info.value)
    assert "optimizer.weight_decay=0.05" in message and "regularizers.weight_decay" in message
    validate({**raw, "optimizer": {"name": "adamw"}})  # decay in one place only: fine

    # the Python API: the same rule when the optimizer is built
    module = RegularizedModule(model=nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2)),
                               regularizers={"weight_decay": {}}, optimizer={"name": "adamw", "weight_decay": 0.1})
    with pytest.raises(ConfigError, match=r"optimizer\.weight_decay=0\.1 and regularizers\.weight_decay"):
        module.configure_optimizers()


def test_bad_config_values_are_config_errors():
    with pytest.raises(ConfigError, match=r"regularizers\.weight_decay\.strength: got -0\.1"):
        build_regularizers({"weight_decay": {"strength": -0.1}})
    with pytest.raises(ConfigError, match=r"regularizers\.weight_decay\.mode: got 'adamw'"):
        build_regularizers({"weight_decay": {"mode": "adamw"}})
    with pytest.raises(ConfigError, match=r"regularizers\.weight_decay\.strength: got nan, expected a finite number"):
        build_regularizers({"weight_decay": {"strength": float("nan")}})


# -- training: the decoupled mode means the same thing whatever the optimizer ---------------------


@pytest.fixture(scope="module")
def digits():
    return DigitsDataModule(train_fraction=0.2, batch_size=64, seed=0)


def _fit(digits, optimizer, regularizers, steps=6):
    pl.seed_everything(0, verbose=False)
    module = RegularizedModule(model_config={"name": "mlp", "init_args": {"in_features": 64, "num_outputs": 10,
                                                                          "hidden": [32]}},
                               regularizers=regularizers, optimizer=optimizer)
    trainer = pl.Trainer(max_steps=steps, limit_val_batches=0, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, accelerator="cpu", devices=1)
    trainer.fit(module, datamodule=digits)
    return module, trainer


def _weights(module):
    return [p.detach().clone() for p in module.model.parameters()]


def _close(a, b, atol=1e-6):
    return all(torch.allclose(x, y, rtol=0, atol=atol) for x, y in zip(a, b, strict=True))


def test_decoupled_decay_with_adam_matches_adamw_and_acts(digits):
    decay = {"weight_decay": {"strength": 0.5}}
    adamw, _ = _fit(digits, {"name": "adamw", "lr": 0.01}, decay)
    adam, trainer = _fit(digits, {"name": "adam", "lr": 0.01}, decay)
    plain, _ = _fit(digits, {"name": "adam", "lr": 0.01}, {})
    assert _close(_weights(adam), _weights(adamw))
    assert not _close(_weights(adam), _weights(plain), atol=1e-4)
    # the decay group shrank against the run without decay (6 steps of 0.5 * lr = 0.5%)
    def norm(m):
        return sum(float(m.model.get_parameter(n).detach().pow(2).sum()) for n in ("body.0.weight", "head.weight"))

    assert norm(adam) < 0.99 * norm(plain)
    group = next(g for g in trainer.optimizers[0].param_groups if g[GROUP_KEY] == "decay")
    assert group["weight_decay"] == 0.0 and group[DECOUPLED_KEY] == 0.5  # moved: Adam's own decay is coupled


def test_decoupled_decay_with_plain_sgd_equals_the_l2_penalty(digits):
    sgd = {"name": "sgd", "lr": 0.1}
    decoupled, _ = _fit(digits, sgd, {"weight_decay": {"strength": 0.3}})
    l2, _ = _fit(digits, sgd, {"weight_decay": {"strength": 0.3, "mode": "l2"}})
    plain, _ = _fit(digits, sgd, {})
    assert _close(_weights(decoupled), _weights(l2), atol=1e-6)
    assert not _close(_weights(decoupled), _weights(plain), atol=1e-4)


def test_plan_prints_the_groups(tmp_path, capsys):
    from regfw.cli.main import main

    config = tmp_path / "c.yaml"
    config.write_text("model: {name: cnn}\nregularizers:\n  weight_decay: {strength: 0.05}\n")
    assert main(["plan", str(config)]) == 0
    out = capsys.readouterr().out
    assert "weight_decay: mode decoupled, strength 0.05" in out
    assert ("weight_decay: decay group: 4 tensor(s), 13,584 values: features.0.weight, features.3.weight, "
            "classifier.1.weight, classifier.3.weight") in out
    assert ("weight_decay: no-decay group: 8 tensor(s), 218 values: features.0.bias (bias), "
            "features.1.weight (norm)") in out
