"""The dropout-family plugins end to end: selected by name, injected into a model, acting at the
planned rate.

Every statistical test measures the injected layer *inside the model*: the model is put in eval
mode with only regfw's inserted modules in training mode (as Monte Carlo dropout does), a forward
hook registered after regfw's hook reads what the next layer receives, and the same input in full
eval mode gives the reference. Seeds are fixed; each tolerance is stated next to its assertion
(binomial standard error sigma = sqrt(p (1 - p) / n), allowed 5 sigma unless said otherwise).
"""
from __future__ import annotations

import math
import warnings

import pytest
import torch
from models_zoo import SmallResNet, SmallTransformer

from regfw.build.models import BUILTIN_MODELS
from regfw.errors import ConfigError
from regfw.placement.plan import apply_plan, make_plan
from regfw.registry.regularizers import build_regularizers, get_registry

FAMILY = {"dropout", "gaussian_dropout", "alpha_dropout", "spatial_dropout", "dropblock", "drop_path",
          "locked_dropout", "dropconnect", "attention_dropout"}


def regularize(model, x, regs, n=1000):
    rs = build_regularizers(regs)
    plan = make_plan(model, rs, n, x)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        apply_plan(model, rs, plan)
    return plan


def builtin(name):
    torch.manual_seed(0)
    return BUILTIN_MODELS[name](in_features=64, num_outputs=10)


def only_injected_in_training(model):
    model.eval()
    for name, module in model.named_modules():
        if name.split(".")[-1].startswith("regfw_"):
            module.train()


def seen_after(model, path, x, seed=0, reference=False):
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


def row(plan, **match):
    rows = [r for r in plan.rows() if all(getattr(r, k) == v for k, v in match.items())]
    assert len(rows) == 1, rows
    return rows[0]


def sigma(p, n):
    return math.sqrt(p * (1 - p) / n)


def test_every_variant_is_a_plugin_selectable_by_name():
    from regfw.registry.discovery import plugin_infos

    registry = get_registry()
    assert FAMILY <= set(registry.names())
    builtin_plugins = {i.name for i in plugin_infos() if i.builtin}
    assert {"dropout", "conv_dropout", "drop_path", "recurrent_dropout", "attention_dropout"} <= builtin_plugins
    for name in FAMILY:
        spec = registry.get(name)
        assert spec.cls.family in ("dropout", "dropconnect") and spec.cls.description


def test_dropout_drops_the_planned_fraction_and_keeps_the_mean():
    model = builtin("mlp")
    x = torch.randn(4000, 64)
    plan = regularize(model, x, {"dropout": {"input": 0, "policy": "default"}})
    p = row(plan, path="body.0").rate
    assert p == 0.5
    ref, out = seen_after(model, "body.1", x, reference=True), seen_after(model, "body.1", x)
    alive = ref != 0
    n = int(alive.sum())  # ~ 512,000 units
    assert abs((out[alive] == 0).float().mean().item() - p) < 5 * sigma(p, n)
    kept = out[alive] != 0
    assert torch.allclose(out[alive][kept], ref[alive][kept] / (1 - p))  # inverted: kept units scaled up


def test_input_dropout_acts_on_the_first_layers_input_at_its_rate():
    model = builtin("mlp")
    x = torch.rand(4000, 64) + 0.1  # no zeros of its own
    plan = regularize(model, x, {"dropout": {"input": 0.15, "hidden": 0}})
    assert row(plan, kind="input").rate == 0.15
    got = []
    model.body[0].register_forward_pre_hook(lambda m, args: got.append(args[0]))
    only_injected_in_training(model)
    torch.manual_seed(1)
    model(x)
    assert abs((got[0] == 0).float().mean().item() - 0.15) < 5 * sigma(0.15, x.numel())  # n = 256,000


def test_classic_dropout_scales_at_inference_not_in_training():
    model = builtin("mlp")
    x = torch.randn(4000, 64)
    regularize(model, x, {"dropout": {"input": 0, "hidden": 0.3, "inverted": False}})
    layer = model.body[1].regfw_dropout
    assert layer.inverted is False and layer.p == 0.3
    relu = torch.relu(model.body[0](x)).detach()
    out = seen_after(model, "body.1", x)
    alive = relu != 0
    assert abs((out[alive] == 0).float().mean().item() - 0.3) < 5 * sigma(0.3, int(alive.sum()))
    kept = out != 0
    assert torch.equal(out[kept], relu[kept])  # training: no scaling
    assert torch.allclose(seen_after(model, "body.1", x, reference=True), relu * 0.7)  # inference: times 1 - p


def test_gaussian_dropout_has_the_moments_of_dropout_at_the_planned_rate():
    model = builtin("mlp")
    x = torch.randn(4000, 64)
    plan = regularize(model, x, {"gaussian_dropout": {"input": 0, "hidden": 0.3}})
    assert row(plan, path="body.0").rate == 0.3
    ref, out = seen_after(model, "body.1", x, reference=True), seen_after(model, "body.1", x)
    alive = ref > 1e-3
    ratio = out[alive] / ref[alive]
    n = ratio.numel()  # ~ 500,000 noise draws with variance v = p / (1 - p) = 0.4286
    v = 0.3 / 0.7
    assert abs(ratio.mean().item() - 1) < 5 * math.sqrt(v / n)
    # The sample variance has standard error ~ v * sqrt(2 / n) ~ 0.0009; allow 0.01.
    assert abs(ratio.var().item() - v) < 0.01


def test_alpha_dropout_uses_its_own_range_and_drops_that_fraction():
    model = builtin("mlp")
    x = torch.randn(4000, 64)
    plan = regularize(model, x, {"alpha_dropout": {"input": 0}}, n=1000)
    p = row(plan, path="body.0").rate
    assert 0.05 <= p <= 0.1 and "range 0.05-0.1" in row(plan, path="body.0").reason
    ref, out = seen_after(model, "body.1", x, reference=True), seen_after(model, "body.1", x)
    alive = ref > 0
    # Klambauer et al. 2017: a dropped unit becomes -alpha' * a * (1 - p), with alpha' = 1.7581 (SELU's
    # negative saturation) and a = ((alpha'^2 p + 1)(1 - p))^(-1/2); kept units become a x + alpha' a p.
    alpha = 1.7580993408473766
    a = ((alpha ** 2 * p + 1) * (1 - p)) ** -0.5
    dropped = torch.isclose(out[alive], torch.tensor(-alpha * a * (1 - p)), atol=1e-6)
    kept = torch.isclose(out[alive], a * ref[alive] + alpha * a * p, atol=1e-5)
    assert bool((dropped | kept).all())
    assert abs(dropped.float().mean().item() - p) < 5 * sigma(p, int(alive.sum()))  # n ~ 512,000


def test_spatial_dropout_drops_the_planned_share_of_whole_channels():
    model = builtin("cnn")
    x = torch.randn(2000, 64)
    plan = regularize(model, x, {"spatial_dropout": {"conv": 0.2}, "dropout": {"conv": 0, "input": 0, "hidden": 0}})
    assert row(plan, path="features.0").anchor == "features.2"
    ref, out = seen_after(model, "features.2", x, reference=True), seen_after(model, "features.2", x)
    live = ref.flatten(2).abs().sum(-1) > 0  # (N, C) maps with any activation
    dead = out.flatten(2).abs().sum(-1) == 0
    partly = ((out == 0) & (ref != 0)).flatten(2).any(-1) & ~dead
    assert not partly.any()  # whole channels or nothing
    n = int(live.sum())  # ~ 32,000 channels
    assert abs(dead[live].float().mean().item() - 0.2) < 5 * sigma(0.2, n)


@pytest.mark.parametrize("block", [3, 5])
def test_dropblock_drops_the_planned_fraction_on_small_maps(block):
    model = builtin("cnn")  # 8x8 maps
    x = torch.randn(1000, 64)
    plan = regularize(model, x, {"dropblock": {"block_size": block}, "dropout": {"conv": 0, "input": 0, "hidden": 0}})
    p = row(plan, path="features.0").rate  # policy: 0.2988 for N=1000, P=13,802
    ref, out = seen_after(model, "features.2", x, reference=True), seen_after(model, "features.2", x)
    alive = ref != 0
    # The claim: the target fraction within 1.5 percentage points (here 16,000 maps).
    assert abs((out[alive] == 0).float().mean().item() - p) < 0.015


def test_locked_dropout_shares_one_mask_over_time_at_the_planned_rate():
    model = builtin("lstm")  # batch_first=True
    x = torch.randn(3000, 64)
    plan = regularize(model, x, {"locked_dropout": {}, "dropout": {"recurrent": 0, "input": 0}})
    p = row(plan, path="rnn").rate
    assert 0.2 <= p <= 0.3 and row(plan, path="rnn").options == {"batch_first": True}
    out = seen_after(model, "rnn", x)[0]  # (N, T, H)
    zero = out == 0
    per_unit = zero.all(dim=1)  # one decision per (sample, unit), for every time step
    assert torch.equal(zero.any(dim=1), per_unit)
    assert abs(per_unit.float().mean().item() - p) < 5 * sigma(p, per_unit.numel())  # n = 192,000


def test_dropconnect_drops_the_planned_fraction_of_hidden_to_hidden_weights():
    model = builtin("lstm")
    x = torch.randn(16, 64)
    keys = list(model.state_dict())
    plan = regularize(model, x, {"dropconnect": {"recurrent": 0.4}})
    assert row(plan, path="rnn").action == "wrap" and "weight_hh_l0" in row(plan, path="rnn").reason
    assert list(model.state_dict()) == keys
    index = model.rnn._flat_weights_names.index("weight_hh_l0")
    seen = []
    model.rnn.register_forward_pre_hook(lambda m, args: seen.append(m._flat_weights[index].detach().clone()))
    only_injected_in_training(model)
    model.rnn.weight_drop.train()
    torch.manual_seed(0)
    for _ in range(10):
        model(x)
    dropped = torch.stack(seen) == 0
    assert abs(dropped.float().mean().item() - 0.4) < 5 * sigma(0.4, dropped.numel())  # n = 163,840
    assert torch.count_nonzero(model.rnn.weight_hh_l0) == model.rnn.weight_hh_l0.numel()  # parameter intact


def test_attention_dropout_sets_the_transformer_default_of_0_1():
    model = SmallTransformer()
    x = torch.randn(200, 20, 8)
    plan = regularize(model, x, {"attention_dropout": {}})
    assert [(r.path, r.rate) for r in plan.rows()] == [("encoder.layers.0", 0.1), ("encoder.layers.1", 0.1)]
    layer = model.encoder.layers[0]
    assert layer.self_attn.dropout == 0.1 and layer.dropout1.p == layer.dropout2.p == layer.dropout.p == 0.1
    layer.train()
    h = torch.randn(200, 20, 16)
    torch.manual_seed(0)
    _, weights = layer.self_attn(h, h, h, need_weights=True, average_attn_weights=False)
    # Softmax weights are positive, so zeros are drops; n = 160,000 weights.
    assert abs((weights == 0).float().mean().item() - 0.1) < 5 * sigma(0.1, weights.numel())


def test_drop_path_drops_whole_samples_of_a_branch_at_the_scheduled_rate():
    torch.manual_seed(0)
    model = SmallResNet()
    x = torch.randn(4000, 3, 8, 8)
    plan = regularize(model, x, {"drop_path": {"rate": 0.2}})
    rates = {r.anchor: r.rate for r in plan.rows() if r.action == "after"}
    assert rates == pytest.approx({"layer1.1.bn2": 0.2 / 3, "layer2.0.bn2": 0.4 / 3, "layer2.1.bn2": 0.2})
    for path in ("layer1.1.bn2", "layer2.0.bn2"):  # measure the last block alone
        model.get_submodule(path).regfw_drop_path.p = 0.0
    ref, out = seen_after(model, "layer2.1.bn2", x, reference=True), seen_after(model, "layer2.1.bn2", x)
    dropped = out.flatten(1).abs().sum(1) == 0
    assert abs(dropped.float().mean().item() - 0.2) < 5 * sigma(0.2, len(x))  # n = 4,000 samples
    assert torch.allclose(out[~dropped], ref[~dropped] / 0.8, atol=1e-6)


def test_config_errors_name_the_key_and_the_value():
    with pytest.raises(ConfigError,
                       match=r"regularizers\.spatial_dropout\.conv: got 1\.5, expected a value in \[0, 1\)"):
        build_regularizers({"spatial_dropout": {"conv": 1.5}})
    with pytest.raises(ConfigError, match=r"regularizers\.dropblock\.block_size: got \[3, 0\], expected a positive"):
        build_regularizers({"dropblock": {"block_size": [3, 0]}})
    with pytest.raises(ConfigError, match=r"regularizers\.dropout\.inverted: got 'no', expected true or false"):
        build_regularizers({"dropout": {"inverted": "no"}})
    with pytest.raises(ConfigError,
                       match=r"regularizers\.drop_path\.depth: got 'cosine', expected one of 'linear', 'uniform'"):
        build_regularizers({"drop_path": {"depth": "cosine"}})
    (dropblock,) = build_regularizers({"dropblock": {"block_size": [3, 5]}})
    assert dropblock.make_module("conv", 0.1, None).block_size == (3, 5)
