"""Surgery rules: where modules go, what stays unchanged, and what is never done twice.

Models: the built-in ``mlp``, ``cnn`` and ``lstm`` plus the zoo in ``tests/models_zoo.py``
(a torchvision-style ResNet with BatchNorm, an ``nn.TransformerEncoder``, hand-written
pre-norm Transformer blocks, and a few special cases).
"""
from __future__ import annotations

import copy
import pickle
import warnings

import pytest
import torch
import torch.nn.functional as F
from models_zoo import DropoutBeforeBN, MLPWithDropout, PreNormTransformer, SmallResNet, SmallTransformer, Untraceable
from torch import nn

import regfw
from regfw.build.models import BUILTIN_MODELS
from regfw.errors import ConfigError
from regfw.placement.plan import apply_plan, batchnorm_warnings, make_plan
from regfw.placement.plan_items import PlanItem
from regfw.placement.surgery import analyse, attach, is_batchnorm
from regfw.registry.regularizers import build_regularizers
from regfw.train.module import RegularizedModule

X_FLAT = torch.randn(8, 64)
X_IMG = torch.randn(4, 3, 16, 16)
X_SEQ = torch.randn(4, 5, 8)


def plan_for(model, x, regs, n=1000):
    rs = build_regularizers(regs)
    return rs, make_plan(model, rs, n, x)


def regularize(model, x, regs, n=1000):
    rs, plan = plan_for(model, x, regs, n)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        apply_plan(model, rs, plan)
    return plan


def builtin(name):
    return BUILTIN_MODELS[name](in_features=64, num_outputs=10)


def where(plan, **match):
    return [(r.kind, r.action, r.anchor) for r in plan.rows()
            if all(getattr(r, k) == v for k, v in match.items())]


# -- placement ------------------------------------------------------------------------------------


def test_mlp_dropout_goes_on_the_input_and_after_each_hidden_activation_not_after_the_head():
    _, plan = plan_for(builtin("mlp"), X_FLAT, {"dropout": {}})
    assert where(plan) == [("input", "before", "body.0"), ("hidden", "after", "body.1"),
                           ("hidden", "after", "body.3")]


def test_cnn_dropout_goes_past_batchnorm_and_relu():
    _, plan = plan_for(builtin("cnn"), X_FLAT, {"dropout": {"input": 0}})
    assert where(plan) == [("conv", "after", "features.2"), ("conv", "after", "features.5"),
                           ("hidden", "after", "classifier.2")]
    assert "after features.1, features.2" in plan.rows()[0].reason


def test_lstm_gets_dropout_on_its_output_and_input():
    _, plan = plan_for(builtin("lstm"), X_FLAT, {"dropout": {}})
    assert where(plan) == [("input", "before", "rnn"), ("recurrent", "after", "rnn")]


def test_resnet_block_dropout_stops_before_a_shared_relu_and_never_precedes_batchnorm():
    model = SmallResNet()
    _, plan = plan_for(model, X_IMG, {"dropout": {"input": 0}})
    anchors = {r.path: r.anchor for r in plan.rows()}
    # torchvision's block calls one nn.ReLU twice: a hook there would also drop after the add.
    assert anchors["layer1.0.conv1"] == "layer1.0.bn1"
    assert anchors["layer1.0.conv2"] == "layer1.0.bn2"
    # the downsampling shortcut is the residual stream: dropping it and not the branch is never wanted
    assert "layer2.0.downsample.0" not in anchors
    assert anchors["stem.0"] == "stem.2"
    assert not any(a.endswith(".relu") for a in anchors.values())
    assert "fc" not in anchors  # the output layer


@pytest.mark.parametrize("make, x", [(lambda: builtin("cnn"), X_FLAT), (SmallResNet, X_IMG),
                                     (lambda: builtin("mlp"), X_FLAT)])
def test_no_insertion_sits_between_a_layer_and_its_batchnorm(make, x):
    model = make()
    _, plan = plan_for(model, x, {"dropout": {}})
    flow = analyse(model, x).flow
    for row in plan.rows():
        if row.action == "after":
            nxt = flow.next(row.anchor)
            assert nxt is None or not is_batchnorm(model.get_submodule(nxt)), row
    assert not plan.warnings


def test_transformer_encoder_layers_are_units_and_the_residual_stream_is_not_split():
    model = SmallTransformer()
    _, plan = plan_for(model, X_SEQ, {"dropout": {}})
    # the encoder layers' own dropouts (after self-attention, in and after the feed-forward block) are reused
    assert where(plan) == [("input", "before", "proj"), ("hidden", "after", "proj")] + [
        ("hidden", "set", f"encoder.layers.{i}.{d}") for i in (0, 1) for d in ("dropout1", "dropout", "dropout2")]
    # Pre-norm blocks: proj's output feeds blocks.0.ln1 *and* the residual add. After ln1 a dropout would
    # drop only the attention branch; on proj it would feed ln1 (never dropout before a norm): none.
    _, plan = plan_for(PreNormTransformer(), X_SEQ, {"dropout": {"input": 0}})
    anchors = {r.path: r.anchor for r in plan.rows() if r.action != "note"}
    assert "proj" not in anchors
    assert [r.reason for r in plan.rows() if r.path == "proj"] == [
        "not inserted: the output of proj feeds blocks.0.ln1, a normalisation, through shape ops only (never dropout "
        "before a norm: it would normalise the mask away and shift its statistics at inference)"]
    assert anchors["blocks.0.mlp.0"] == "blocks.0.mlp.1"  # past the GELU


def test_without_an_example_input_torch_fx_gives_the_same_placement():
    traced = plan_for(SmallResNet(), X_IMG, {"dropout": {"input": 0}})[1]
    static = plan_for(SmallResNet(), None, {"dropout": {"input": 0}})[1]
    assert analyse(SmallResNet()).flow.source == "fx"
    assert where(static) == where(traced)
    assert not static.warnings


def test_untraceable_model_without_example_input_falls_back_to_sequential_order_and_says_so():
    mm = analyse(Untraceable())
    assert mm.flow.source == "sequential"
    _, plan = plan_for(Untraceable(), None, {"dropout": {}})
    assert any("torch.fx cannot trace Untraceable" in w and "Pass example_input" in w for w in plan.warnings)


# -- existing dropout, applying twice ----------------------------------------------------------------


def test_existing_dropout_is_overridden_or_kept_never_duplicated():
    model = MLPWithDropout()
    plan = regularize(model, torch.randn(4, 16), {"dropout": {"hidden": 0.4, "input": 0}})
    assert where(plan) == [("hidden", "set", "drop1"), ("hidden", "set", "drop2")]
    assert model.drop1.p == model.drop2.p == 0.4
    assert not [n for n, _ in model.named_modules() if "regfw_" in n]

    kept = MLPWithDropout()
    plan = regularize(kept, torch.randn(4, 16), {"dropout": {"hidden": 0.4, "input": 0, "existing": "keep"}})
    assert plan.rows() == [] and kept.drop1.p == kept.drop2.p == 0.25


def test_existing_input_dropout_is_reused():
    model = nn.Sequential(nn.Dropout(0.05), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 2))
    plan = regularize(model, torch.randn(4, 16), {"dropout": {"input": 0.15, "hidden": 0.3}})
    assert where(plan) == [("input", "set", "0"), ("hidden", "after", "2")]
    assert model[0].p == 0.15


def test_applying_twice_never_inserts_twice_and_updates_the_rate():
    model = builtin("cnn")
    x = X_FLAT
    first = RegularizedModule(model, regularizers={"dropout": {"conv": 0.1}}, example_input=x)
    names = [n for n, _ in model.named_modules()]
    hooks = sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())
    second = RegularizedModule(model, regularizers={"dropout": {"conv": 0.25}}, example_input=x)
    assert [n for n, _ in model.named_modules()] == names
    assert sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules()) == hooks
    assert [r.action for r in second.plan.rows()] == ["set"] * len(first.plan.rows())
    assert model.features[2].regfw_dropout.p == 0.25
    assert attach(model, "features.2", "regfw_dropout", nn.Dropout(), "after") is False


# -- what must not change ---------------------------------------------------------------------------


class GroupedConvNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(4, 8, 3, stride=2, padding=1, groups=2, bias=False)
        self.bn = nn.BatchNorm2d(8)
        self.act = nn.ReLU()
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1, groups=4, bias=True)
        self.act2 = nn.ReLU()
        self.fc = nn.Linear(8, 3)

    def forward(self, x):
        x = self.act(self.bn(self.conv(x)))
        x = self.act2(self.conv2(x))
        return self.fc(x.mean(dim=(2, 3)))


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_weights_dtype_device_stride_groups_and_bias_are_unchanged(dtype):
    torch.manual_seed(0)
    model = GroupedConvNet().to(dtype)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randn(2, 4, 8, 8, dtype=dtype)
    regularize(model, x, {"dropout": {"conv": 0, "input": 0.1}, "dropblock": {"block_size": 3}})
    after = model.state_dict()
    assert list(after) == list(before)
    assert all(torch.equal(before[k], after[k]) and after[k].dtype == before[k].dtype for k in before)
    assert (model.conv.stride, model.conv.groups, model.conv.bias) == ((2, 2), 2, None)
    assert (model.conv2.stride, model.conv2.groups, model.conv2.bias is not None) == ((1, 1), 4, True)
    injected = [m for n, m in model.named_modules() if n.split(".")[-1].startswith("regfw_")]
    assert len(injected) == 3  # input dropout + DropBlock after each conv block
    assert all(not list(m.parameters()) and not list(m.buffers()) for m in injected)
    model.train()
    out = model(x)
    assert out.dtype == dtype and out.device.type == "cpu"
    out.float().sum().backward()
    assert all(p.grad is not None and p.grad.dtype == dtype for p in model.parameters())


def test_a_regularized_model_deep_copies_pickles_and_loads_a_plain_state_dict():
    model = builtin("mlp")
    regularize(model, X_FLAT, {"dropout": {"hidden": 0.5}})
    clone = pickle.loads(pickle.dumps(copy.deepcopy(model)))
    clone.body[1].regfw_dropout.p = 1.0  # the copy's hook must use the copy's module
    clone.train()
    model.train()
    assert torch.count_nonzero(clone.body[1](clone.body[0](X_FLAT))) == 0
    assert torch.count_nonzero(model.body[1](model.body[0](X_FLAT))) > 0
    plain = builtin("mlp")
    plain.load_state_dict(model.state_dict())
    model.load_state_dict(plain.state_dict())


# -- warnings and errors --------------------------------------------------------------------------


def test_dropout_feeding_batchnorm_is_a_warning_naming_both_in_the_plan_and_on_apply():
    model = DropoutBeforeBN()
    rs, plan = plan_for(model, torch.randn(4, 16), {"dropout": {}})
    message = [w for w in plan.warnings if "'net.1'" in w and "BatchNorm 'net.2'" in w]
    assert message and "variance shift" in message[0]
    assert message[0] in plan.format()
    with pytest.warns(UserWarning, match=r"dropout 'net.1' \(Dropout\) feeds BatchNorm 'net.2'"):
        apply_plan(model, rs, plan)


def test_planning_an_insertion_directly_before_a_batchnorm_warns():
    class SharedBN(nn.Module):  # the BatchNorm runs twice, so dropout cannot move past it
        def __init__(self):
            super().__init__()
            self.fc1, self.fc2 = nn.Linear(8, 8), nn.Linear(8, 8)
            self.bn, self.head = nn.BatchNorm1d(8), nn.Linear(8, 2)

        def forward(self, x):
            return self.head(self.bn(self.fc2(self.bn(self.fc1(x)))))

    _, plan = plan_for(SharedBN(), torch.randn(4, 8), {"dropout": {"input": 0}})
    # the built-in planner puts nothing there (never dropout before a norm) ...
    assert not plan.warnings
    assert [r.action for r in plan.rows() if r.path == "fc1"] == ["note"]
    # ... and a row another planner puts there anyway is warned about
    row = PlanItem("dropout", "fc1", "hidden", "dropout", 0.3, "a plugin's own row", action="after", anchor="fc1")
    assert any("puts dropout on the output of 'fc1', which feeds BatchNorm 'bn'" in w
               for w in batchnorm_warnings(plan.context.model_map, [row]))


def test_two_variants_for_one_kind_is_a_config_error_naming_both():
    with pytest.raises(ConfigError, match=r"'dropout' and 'spatial_dropout' are both dropout regularizers for "
                                          r"'conv' layers.*regularizers\.dropout\.conv: 0"):
        plan_for(builtin("cnn"), X_FLAT, {"dropout": {}, "spatial_dropout": {}})
    with pytest.raises(ConfigError, match="'dropout' and 'locked_dropout'.*'recurrent'"):
        plan_for(builtin("lstm"), X_FLAT, {"dropout": {}, "locked_dropout": {}})
    # Switched off in one of them, or a different family: fine.
    plan_for(builtin("cnn"), X_FLAT, {"dropout": {"conv": 0}, "spatial_dropout": {}})
    plan_for(builtin("lstm"), X_FLAT, {"dropout": {"recurrent": 0}, "locked_dropout": {}, "dropconnect": {}})


def test_nothing_to_do_is_a_warning():
    _, plan = plan_for(builtin("mlp"), X_FLAT, {"spatial_dropout": {}})
    assert plan.rows() == []
    assert plan.warnings == ["regularizer 'spatial_dropout' found no layer of kinds conv in MLP; nothing was inserted. "
                             "It looked at: layers of other kinds: 3 hidden (body.0, body.2, head)."]


# -- classification -----------------------------------------------------------------------------------


class GatedLinear(nn.Module):
    """A custom layer the built-in table does not know."""

    def __init__(self, n):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(2 * n, n) * 0.1)

    def forward(self, x):
        return F.glu(F.linear(x, self.weight))


class GatedBlock(nn.Module):
    """A custom container: its child Linear is a layer of its own unless a plugin says otherwise."""

    def __init__(self, n):
        super().__init__()
        self.lin = nn.Linear(n, 2 * n)

    def forward(self, x):
        return F.glu(self.lin(x))


class ClassifyGated:
    @regfw.hookimpl
    def regfw_classify_module(self, module, path):
        if isinstance(module, (GatedLinear, GatedBlock)):
            return "hidden"


class ClassifyWrong:
    @regfw.hookimpl
    def regfw_classify_module(self, module, path):
        if isinstance(module, GatedLinear):
            return "dense"


def net_with_gated():
    return nn.Sequential(nn.Linear(8, 8), nn.ReLU(), GatedLinear(8), nn.Linear(8, 2))


def test_a_plugin_classifies_its_own_module_type(fresh_plugins):
    from regfw.registry.discovery import register_plugin, unregister_plugin

    x = torch.randn(4, 8)
    _, plan = plan_for(net_with_gated(), x, {"dropout": {"input": 0}})
    assert [r.path for r in plan.rows()] == ["0"]  # GatedLinear is unknown: nothing after it
    blocks = nn.Sequential(nn.Linear(8, 8), GatedBlock(8), nn.ReLU(), GatedBlock(8))
    _, plan = plan_for(blocks, x, {"dropout": {"input": 0}})
    assert [(r.path, r.anchor) for r in plan.rows()] == [("0", "0"), ("1.lin", "1.lin")]
    register_plugin(ClassifyGated(), "classify-gated")
    try:
        _, plan = plan_for(net_with_gated(), x, {"dropout": {"input": 0}})
        assert [(r.path, r.kind, r.anchor) for r in plan.rows()] == [("0", "hidden", "1"), ("2", "hidden", "2")]
        # A classified container is one layer: its Linear is not planned on its own, and as the
        # last layer called it is the output layer.
        _, plan = plan_for(blocks, x, {"dropout": {"input": 0}})
        assert [(r.path, r.anchor) for r in plan.rows()] == [("0", "0"), ("1", "2")]
    finally:
        unregister_plugin("classify-gated")
    register_plugin(ClassifyWrong(), "classify-wrong")
    try:
        with pytest.raises(ValueError,
                           match=r"classified module '2' \(GatedLinear\) as 'dense'; expected one of hidden"):
            plan_for(net_with_gated(), x, {"dropout": {}})
    finally:
        unregister_plugin("classify-wrong")


# -- DropPath placement ---------------------------------------------------------------------------------


def test_drop_path_goes_on_the_branch_of_each_residual_add_with_a_linear_depth_schedule():
    model = SmallResNet()
    plan = regularize(model, X_IMG, {"drop_path": {"rate": 0.3}})
    rows = [(r.path, r.action, r.anchor, r.rate) for r in plan.rows()]
    assert rows == [("layer1.0", "note", None, 0.0), ("layer1.1", "after", "layer1.1.bn2", pytest.approx(0.1)),
                    ("layer2.0", "after", "layer2.0.bn2", pytest.approx(0.2)),
                    ("layer2.1", "after", "layer2.1.bn2", pytest.approx(0.3))]
    assert model.layer2[1].bn2.regfw_drop_path.p == pytest.approx(0.3)
    # Both adds of a pre-norm block share its rate; the attention branch is output[0] of the MHA.
    _, plan = plan_for(PreNormTransformer(depth=2), X_SEQ, {"drop_path": {"rate": 0.2}})
    assert [(r.anchor, r.rate) for r in plan.rows() if r.action == "after"] == [("blocks.1.attn", 0.2),
                                                                               ("blocks.1.mlp.2", 0.2)]


def test_drop_path_says_why_when_it_cannot_be_placed(capfd):
    _, plan = plan_for(Untraceable(), torch.randn(4, 16), {"drop_path": {}})
    assert plan.rows() == []
    # the one-line reason below, not the partial graph torch.export prints to stderr as it fails
    assert "def forward" not in capfd.readouterr().err
    # torch.fx fails on the control flow, then torch.export of the example input on the data-dependent branch
    (warning,) = plan.warnings
    assert warning.startswith(
        "drop_path: torch.fx cannot trace Untraceable (TraceError: symbolically traced variables cannot be used "
        "as inputs to control flow; torch.export cannot capture it either (GuardOnDataDependentSymNode: ")
    assert warning.endswith(
        "so its residual adds are unknown and DropPath was not inserted. Make forward traceable (no Python control "
        "flow on tensor values) or put regfw.layers.DropPath on the residual branches by hand")
    _, plan = plan_for(SmallTransformer(), X_SEQ, {"drop_path": {}})
    assert "inside that torch module" in plan.warnings[0] and "TransformerEncoderLayer" in plan.warnings[0]

    class FunctionalBranch(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc, self.head = nn.Linear(8, 8), nn.Linear(8, 2)

        def forward(self, x):
            return self.head(x + F.relu(self.fc(x)))

    _, plan = plan_for(FunctionalBranch(), torch.randn(4, 8), {"drop_path": {}})
    assert [(r.action, r.reason) for r in plan.rows()] == [
        ("note", "not inserted at residual add 'add': the branch ends in 'call_function relu', not in a module, "
                 "so no hook can reach it; end the branch with a module (e.g. nn.Identity) to allow DropPath")]
