"""The noise regularizer: Gaussian noise on inputs, activations and weights, training only."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from noise_floor import batch_noise_floor, far_above_floor
from regfw_plugins.noise import (
    WEIGHT_NOISE_NAME,
    GaussianNoise,
    WeightNoise,
    add_weight_noise,
    gaussian_noise,
    remove_weight_noise,
)
from torch import nn

from regfw.errors import ConfigError
from regfw.registry.regularizers import build_regularizers
from regfw.train.module import RegularizedModule
from regfw.uncertainty import mc_mode, mc_predict, stochastic_modules

# -- activation / input noise -----------------------------------------------------------------------


def test_gaussian_noise_has_the_stated_std_in_training_and_is_identity_in_eval():
    torch.manual_seed(0)
    x = torch.rand(200, 500)
    layer = GaussianNoise(0.3)
    diff = layer(x) - x
    assert abs(float(diff.mean())) < 0.003  # 1e5 samples: the mean's std is 0.3/316 ~ 0.001
    assert abs(float(diff.std()) - 0.3) < 0.3 * 0.01
    layer.eval()
    assert layer(x) is x
    assert GaussianNoise(0.0)(x) is x
    assert gaussian_noise(x, 0.3, training=False) is x


@pytest.mark.parametrize("bad", [-0.1, float("nan"), float("inf"), "0.1x"])
def test_bad_stds_are_rejected_with_the_value(bad):
    with pytest.raises(ValueError, match=r"std must be a finite number >= 0, got"):
        GaussianNoise(bad)
    layer = GaussianNoise(0.1)
    with pytest.raises(ValueError, match=r"std must be a finite number >= 0"):
        layer.std = bad
    with pytest.raises(ValueError, match=r"std must be a finite number >= 0"):
        add_weight_noise(nn.Linear(2, 2), bad)


def test_noise_on_integer_input_is_a_clear_error():
    with pytest.raises(TypeError, match="floating-point tensor, got dtype torch.int64"):
        gaussian_noise(torch.arange(4), 0.1)


def test_config_values_are_checked_with_their_keys():
    with pytest.raises(ConfigError, match=r"regularizers\.noise\.input_std: got -0\.1, expected a value in >= 0"):
        build_regularizers({"noise": {"input_std": -0.1}})
    with pytest.raises(ConfigError, match=r"regularizers\.noise\.weight_std: got inf, expected a finite number"):
        build_regularizers({"noise": {"weight_std": float("inf")}})
    with pytest.raises(ConfigError, match=r"regularizers\.noise\.weight_kinds\[0\]: got 'recurrent'"):
        build_regularizers({"noise": {"weight_kinds": ["recurrent"]}})
    with pytest.raises(ConfigError, match=r"regularizers\.noise\.hiden_std: unknown key.*Did you mean 'hidden_std'"):
        build_regularizers({"noise": {"hiden_std": 0.1}})


def _mlp() -> nn.Sequential:
    return nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Dropout(0.25), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 3))


def test_plan_places_noise_like_dropout_and_leaves_existing_dropout_alone():
    torch.manual_seed(0)
    model = _mlp()
    plain = copy.deepcopy(model)
    module = RegularizedModule(model=model, example_input=torch.zeros(2, 6),
                               regularizers={"noise": {"input_std": 0.2, "hidden_std": 0.1, "weight_std": 0.05}})
    rows = [(r.path, r.kind, r.variant, r.rate, r.action, r.anchor) for r in module.plan.rows()]
    assert rows == [
        ("0", "input", "gaussian_noise", 0.2, "before", "0"),
        ("0", "hidden", "gaussian_noise", 0.1, "after", "1"),  # after the ReLU, before the existing dropout
        ("0", "hidden", "weight_noise", 0.05, "wrap", "0"),
        ("3", "hidden", "gaussian_noise", 0.1, "after", "4"),
        ("3", "hidden", "weight_noise", 0.05, "wrap", "3"),
        ("5", "hidden", "weight_noise", 0.05, "wrap", "5"),  # weights of the output layer too
    ]
    assert model[2].p == 0.25  # the model's own dropout keeps its rate
    assert isinstance(model[0].regfw_input_noise, GaussianNoise) and isinstance(model[1].regfw_noise, GaussianNoise)
    assert isinstance(getattr(model[5], WEIGHT_NOISE_NAME), WeightNoise)
    assert [n for n, _ in model.named_parameters()] == [n for n, _ in plain.named_parameters()]
    x = torch.randn(32, 6)
    module.eval()
    plain.eval()
    assert torch.equal(module(x), plain(x))  # everything off in eval mode
    module.train()
    model[2].p = 0.0  # leave the noise as the only randomness
    assert not torch.allclose(module(x), module(x))
    # activation noise is stochastic for Monte Carlo dropout; weight noise is not (see the plugin)
    found = {name for name, _ in stochastic_modules(model)}
    assert {"0.regfw_input_noise", "1.regfw_noise", "4.regfw_noise"} <= found
    assert not any(WEIGHT_NOISE_NAME in name for name in found)


def test_monte_carlo_dropout_samples_activation_noise_with_clean_weights():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 3))
    RegularizedModule(model=model, example_input=torch.zeros(2, 6),
                      regularizers={"noise": {"input_std": 0, "hidden_std": 0.5, "weight_std": 0.3}})
    with mc_mode(model) as on:
        assert {type(m) for m in on} == {GaussianNoise}
        assert not getattr(model[2], WEIGHT_NOISE_NAME).training
    x = torch.randn(16, 6)
    fast = mc_predict(model, x, samples=300, strategy="auto", seed=0, choose=False)  # the split itself
    loop = mc_predict(model, x, samples=300, strategy="loop", seed=1)
    assert fast.strategy == "auto"
    assert float(fast.probs.std(0).mean()) > 0.02  # the samples differ
    # the fast path (deterministic prefix computed once) agrees with full passes: 300 samples of
    # per-sample std ~0.08 give a standard error of ~0.005 per mean probability, 100x above the
    # floating-point noise between loop's 16 rows and auto's 4800 (asserted first)
    se = ((fast.probs.var(0) + loop.probs.var(0)) / 300).sqrt()
    floor = batch_noise_floor(model, x, rows=300 * 16, quantity=lambda out: torch.softmax(out, -1))
    far_above_floor(se, floor, "the standard error of the MC mean probabilities")
    assert torch.allclose(fast.probs.mean(0), loop.probs.mean(0), atol=0.04)


def test_planning_an_already_noised_model_updates_instead_of_inserting_twice():
    model = _mlp()
    RegularizedModule(model=model, regularizers={"noise": {"input_std": 0.2, "hidden_std": 0.1}})
    again = RegularizedModule(model=model, regularizers={"noise": {"input_std": 0.4, "hidden_std": 0.3}})
    assert {r.action for r in again.plan.rows()} == {"set"}
    noises = [m for m in model.modules() if isinstance(m, GaussianNoise)]
    assert sorted(m.std for m in noises) == [0.3, 0.3, 0.4]


# -- weight noise -------------------------------------------------------------------------------------


def _train(model, steps, seed=0, lr=0.05, optimizer="adam"):
    torch.manual_seed(seed)
    x, y = torch.randn(64, 6), torch.randint(0, 3, (64,))
    opt = (torch.optim.Adam if optimizer == "adam" else torch.optim.SGD)(model.parameters(), lr=lr)
    model.train()
    for _ in range(steps):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    return model


def test_weight_noise_with_std_0_trains_bit_identically_to_no_noise():
    torch.manual_seed(1)
    reference = _mlp()
    noisy = copy.deepcopy(reference)
    for i in (0, 3, 5):
        add_weight_noise(noisy[i], 0.0)
    _train(reference, 25)
    _train(noisy, 25)  # the dropout masks match too: std 0 draws no random numbers
    for (name, a), (_, b) in zip(reference.named_parameters(), noisy.named_parameters(), strict=True):
        assert torch.equal(a, b), name


def test_weight_noise_restores_the_exact_parameter_so_nothing_drifts():
    torch.manual_seed(2)
    model = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 3))
    originals = [model[0].weight, model[2].weight]
    start = [p.detach().clone() for p in model.parameters()]
    for i in (0, 2):
        add_weight_noise(model[i], 1.0)  # noise far larger than the weights: subtracting it back would round
    _train(model, 50, lr=0.0, optimizer="sgd")  # 50 perturbed forward/backward passes, zero-size steps
    assert model[0].weight is originals[0] and model[2].weight is originals[1]
    assert all(isinstance(p, nn.Parameter) for p in model.parameters())
    for p, q in zip(model.parameters(), start, strict=True):
        assert torch.equal(p, q)


def test_the_gradient_is_taken_at_the_perturbed_weights():
    torch.manual_seed(3)
    layer = nn.Linear(5, 4)
    x = torch.randn(8, 5)
    add_weight_noise(layer, 0.5)
    torch.manual_seed(10)
    out = layer(x)
    out.pow(2).sum().backward()
    grad = layer.weight.grad.clone()

    w = layer.weight.detach().clone().requires_grad_(True)
    torch.manual_seed(10)
    noisy = w + torch.randn_like(w) * 0.5
    expected = F.linear(x, noisy, layer.bias.detach())
    assert torch.equal(out, expected)
    expected.pow(2).sum().backward()
    assert torch.equal(grad, w.grad)
    layer.eval()
    assert torch.equal(layer(x), F.linear(x, layer.weight, layer.bias))  # no noise in eval mode


def test_weight_noise_restores_when_forward_raises_and_survives_copies():
    layer = nn.Linear(3, 2)
    weight = layer.weight
    add_weight_noise(layer, 0.1)
    with pytest.raises(RuntimeError):
        layer(torch.zeros(4, 7))  # wrong width
    assert layer.weight is weight and isinstance(layer._parameters["weight"], nn.Parameter)
    assert list(layer.state_dict()) == ["weight", "bias"]  # the state dict of the plain layer
    clone = copy.deepcopy(layer)
    out = clone(torch.ones(1, 3))
    assert out.shape == (1, 2) and isinstance(clone._parameters["weight"], nn.Parameter)
    assert add_weight_noise(layer, 0.2) is getattr(layer, WEIGHT_NOISE_NAME)  # updated, not added twice
    assert len(layer._forward_pre_hooks) == 1
    assert remove_weight_noise(layer) and not layer._forward_pre_hooks and not layer._forward_hooks
    layer.train()
    assert torch.equal(layer(torch.ones(1, 3)), layer(torch.ones(1, 3)))
    with pytest.raises(ValueError, match="ReLU has no parameter 'weight'"):
        add_weight_noise(nn.ReLU(), 0.1)
