"""The ``weight_decay`` plugin: timm's parameter groups, decoupled and L2 modes, config rules, and
the MC dropout prior of Gal & Ghahramani (2016) (``weight_decay.prior``)."""
from __future__ import annotations

import warnings

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
    prior_reg,
)
from torch import nn

from regfw.build.datasets import DigitsDataModule
from regfw.cli.main import main
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
    config = tmp_path / "c.yaml"
    config.write_text("model: {name: cnn}\nregularizers:\n  weight_decay: {strength: 0.05}\n")
    assert main(["plan", str(config)]) == 0
    out = capsys.readouterr().out
    assert "weight_decay: mode decoupled, strength 0.05" in out
    assert ("weight_decay: decay group: 4 tensor(s), 13,584 values: features.0.weight, features.3.weight, "
            "classifier.1.weight, classifier.3.weight") in out
    assert ("weight_decay: no-decay group: 8 tensor(s), 218 values: features.0.bias (bias), "
            "features.1.weight (norm)") in out


# -- prior -----------------------------------------------------------------------------------------
# ``weight_decay.prior``: the MC dropout prior of Gal & Ghahramani (2016) stated as the paper states it.
#
# The paper's code gives every Dense layer Keras's ``l2(reg)``, which adds ``reg * sum(w^2)`` (no 1/2)
# to the mean squared error, with ``reg = l^2 (1 - p) / (2 N tau)``; regfw's ``l2`` mode adds
# ``strength / 2 * sum(w^2)``, so the prior sets ``strength = 2 * reg``. The factor 2 is the signal
# these tests check: the two candidate penalties differ by 100%, against a float32 rounding of ~1e-7.

PRIOR = {"length_scale": 1e-2, "tau": 0.5}
NOTE = "regularizers.weight_decay: mode decoupled shrinks the weights each step and adds no loss term"


def _net() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 50), nn.ReLU(), nn.Linear(50, 1))


def _module(dropout: dict, prior: dict = PRIOR, n_examples: int | None = 300) -> RegularizedModule:
    return RegularizedModule(_net(), loss="mse", task="regression", n_examples=n_examples,
                             example_input=torch.zeros(2, 6),
                             regularizers={"dropout": dropout, "weight_decay": {"prior": prior}})


def test_prior_adds_the_papers_keras_l2_term_with_p_from_the_models_dropout():
    module = _module({"input": 0.05, "hidden": 0.05})
    (wd,) = [r for r in module.regularizers if isinstance(r, WeightDecay)]
    reg = 1e-4 * (1 - 0.05) / (2 * 300 * 0.5)
    assert prior_reg(1e-2, 0.05, 300, 0.5) == pytest.approx(reg, rel=1e-15)
    net = module.model
    w0, w2 = net[0].weight, net[2].weight
    squares = float(w0.detach().double().pow(2).sum() + w2.detach().double().pow(2).sum())
    penalty = wd.penalty(net)
    assert float(penalty) == pytest.approx(reg * squares, rel=1e-6)  # Keras l2(reg): reg * sum(w^2), biases out
    assert wd.strength(net) == pytest.approx(2 * reg, rel=1e-15)  # regfw's strength / 2 * sum(w^2)
    penalty.backward()
    assert torch.allclose(w0.grad, 2 * reg * w0.detach(), rtol=1e-6, atol=0)  # d/dw of reg * w^2
    assert net[0].bias.grad is None and net[2].bias.grad is None


def test_one_training_step_applies_the_prior_and_logs_its_term():
    module = _module({"input": 0.1, "hidden": 0.1})
    x, y = torch.randn(32, 6), torch.randn(32, 1)
    trainer = pl.Trainer(max_steps=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, accelerator="cpu", devices=1)
    weights = [module.model[0].weight.detach().clone(), module.model[2].weight.detach().clone()]
    trainer.fit(module, torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=32))
    reg = 1e-4 * 0.9 / (2 * 300 * 0.5)
    expected = reg * sum(float(w.double().pow(2).sum()) for w in weights)
    assert float(trainer.callback_metrics["train_penalty/weight_decay"]) == pytest.approx(expected, rel=1e-5)


def test_plan_prints_the_computed_coefficient_with_p_and_n_from_the_config_and_data(tmp_path, capsys):
    config = tmp_path / "c.yaml"
    config.write_text("data: {name: diabetes}\nmodel: {name: mlp, init_args: {hidden: [50]}}\n"
                      "regularizers:\n  dropout: {input: 0.05, hidden: 0.05}\n"
                      "  weight_decay: {prior: {length_scale: 1e-2, tau: 0.5}}\n")
    assert main(["plan", str(config)]) == 0
    out = capsys.readouterr().out
    n = int(out.split("plan: N=")[1].split()[0])
    reg = 1e-4 * 0.95 / (2 * n * 0.5)
    assert (f"weight_decay: mode l2 from the prior: reg = l^2 (1 - p) / (2 N tau) = 0.01^2 * (1 - 0.05) / "
            f"(2 * {n} * 0.5) = {reg:.6g}; loss += reg * sum(w^2) over the decay group (strength {2 * reg:.6g}") in out


def test_an_explicit_prior_dropout_and_n_take_precedence():
    (wd,) = build_regularizers({"weight_decay": {"prior": {"tau": 2.0, "dropout": 0.2, "n_examples": 1000}}})
    net = _net()
    wd.plan(net, type("Ctx", (), {"n_examples": 50})())
    assert wd.strength(net) == pytest.approx(2 * 1e-4 * 0.8 / (2 * 1000 * 2.0), rel=1e-15)


def test_prior_config_errors_name_the_key():
    with pytest.raises(ConfigError, match=r"regularizers\.weight_decay\.prior\.tau: missing; the prior needs the "
                                          r"noise precision tau"):
        build_regularizers({"weight_decay": {"prior": {"length_scale": 1e-2}}})
    with pytest.raises(ConfigError, match=r"regularizers\.weight_decay\.strength: got 0\.1 together with prior"):
        build_regularizers({"weight_decay": {"strength": 0.1, "prior": PRIOR}})
    with pytest.raises(ConfigError, match=r"regularizers\.weight_decay\.mode: got 'decoupled' together with prior"):
        build_regularizers({"weight_decay": {"mode": "decoupled", "prior": PRIOR}})
    with pytest.raises(ConfigError, match=r"regularizers\.weight_decay\.prior\.length_scale: got -1"):
        build_regularizers({"weight_decay": {"prior": {"length_scale": -1, "tau": 1}}})
    assert WeightDecayConfig(prior=None).resolved_mode == "decoupled"


def test_no_single_rate_or_no_n_is_an_error_saying_what_to_set():
    raw = {"data": {"name": "diabetes"}, "model": {"name": "mlp"},
           "regularizers": {"dropout": {"input": 0.1, "hidden": 0.2}, "weight_decay": {"prior": PRIOR}}}
    with pytest.raises(ConfigError, match=r"prior\.dropout: null, and regularizers\.dropout has input 0\.1 and "
                                          r"hidden 0\.2, so the prior has no single rate p\. Set prior\.dropout"):
        validate(raw)
    module = _module({"input": 0.1, "hidden": 0.2})  # Python API: checked on the model at the first penalty
    (wd,) = [r for r in module.regularizers if isinstance(r, WeightDecay)]
    with pytest.raises(ConfigError, match=r"prior\.dropout: null and the model has dropout layers of rates 0\.1, "
                                          r"0\.2"):
        wd.penalty(module.model)
    with pytest.raises(ConfigError, match=r"prior\.n_examples: null and the data did not say its number of training "
                                          r"examples N"):
        _module({"input": 0.1, "hidden": 0.1}, n_examples=None)


def test_decoupled_mode_in_mc_regression_is_noted_once_and_only_there(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    base = ("model: {init_args: {hidden: [8]}}\nuncertainty: {samples: 3, plots: false}\n"
            "trainer: {max_epochs: 1, enable_progress_bar: false, enable_model_summary: false}\n")
    cases = {"regression": ("data: {name: diabetes, batch_size: 64}\n"
                            "regularizers: {dropout: {hidden: 0.1}, weight_decay: {}}\n", 1),
             "prior": ("data: {name: diabetes, batch_size: 64}\n"
                       "regularizers: {dropout: {hidden: 0.1}, weight_decay: {prior: {tau: 1.0}}}\n", 0),
             "classification": ("data: {name: digits, train_fraction: 0.1, batch_size: 64}\n"
                                "regularizers: {dropout: {hidden: 0.1}, weight_decay: {}}\n", 0)}
    for name, (text, count) in cases.items():
        (tmp_path / f"{name}.yaml").write_text(base + text)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            assert main(["fit", f"{name}.yaml", "--run-dir", f"run_{name}"]) == 0
        notes = [str(w.message) for w in caught if NOTE in str(w.message)]
        assert len(notes) == count, (name, notes)
        if count:
            assert "regularizers.weight_decay.prior: {length_scale: 1e-2, tau: TAU}" in notes[0]
            assert "\n" not in notes[0]
