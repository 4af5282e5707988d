"""The placement rules of docs/placement.md, each on a small model that shows its graph pattern.

Every model is written the way a library writes it (timm, torchvision, transformers): the rules
must hold because of what the traced forward does, never because of a class or attribute name,
so the classes here have names regfw has never seen.
"""
from __future__ import annotations

from collections import namedtuple

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from regfw.layers import DropPath
from regfw.placement.plan import apply_plan, make_plan
from regfw.placement.surgery import analyse, is_dropout, is_injected
from regfw.registry.regularizers import build_regularizers


def plan_dropout(model: nn.Module, x, **options):
    regs = build_regularizers({"dropout": dict(options)})
    return regs, make_plan(model, regs, n_examples=1000, example_input=x)


def places(plan) -> dict[str, str]:
    """``path -> anchor`` of the rows that insert a module after a layer (input dropout is not listed)."""
    return {r.path: r.anchor for r in plan.rows() if r.action == "after"}


def set_rows(plan) -> dict[str, str]:
    """``path -> anchor`` of the rows that set the rate of an existing dropout."""
    return {r.path: r.anchor for r in plan.rows() if r.action == "set"}


def inserted(model: nn.Module) -> list[str]:
    return [p for p, _ in model.named_modules() if p and p.rsplit(".", 1)[-1].startswith("regfw_")]


# --------------------------------------------------------------------------- normalisation


class LinearNorm(nn.Module):
    """A linear layer and a BatchNorm1d over the tokens, applied after a flatten (LeViT's layout)."""

    def __init__(self, a: int, b: int) -> None:
        super().__init__()
        self.linear = nn.Linear(a, b)
        self.bn = nn.BatchNorm1d(b)

    def forward(self, x):
        x = self.linear(x)
        return self.bn(x.flatten(0, 1)).reshape_as(x)


class TokenMlp(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.ln1 = LinearNorm(8, 16)
        self.act = nn.Hardswish()
        self.head = nn.Linear(16, 3)

    def forward(self, x):
        return self.head(self.act(self.ln1(x)).mean(1))


@pytest.mark.parametrize("example", [True, False], ids=["traced", "fx"])
def test_norm_after_a_reshape_still_follows_its_layer(example):
    """Linear -> flatten -> BatchNorm1d -> reshape: the dropout goes after the norm and activation, read from
    the traced pass or, without an example input, from the torch.fx graph."""
    regs, plan = plan_dropout(TokenMlp().eval(), torch.randn(2, 5, 8) if example else None)
    assert plan.context.model_map.flow.source == ("trace" if example else "fx")
    assert places(plan)["ln1.linear"] == "act"


class NormAct(nn.BatchNorm2d):
    """A BatchNorm with its activation fused in (timm's BatchNormAct2d pattern): a norm with a child."""

    def __init__(self, c: int) -> None:
        super().__init__(c)
        self.act = nn.ReLU()

    def forward(self, x):
        x = F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, self.training, 0.1, self.eps)
        return self.act(x)


class Permute(nn.Module):
    """A parameterless module that only rearranges its input (torchvision's Permute pattern)."""

    def __init__(self, dims: list[int]) -> None:
        super().__init__()
        self.dims = dims

    def forward(self, x):
        return torch.permute(x, self.dims)


class ConvNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3), Permute([0, 2, 3, 1]), nn.LayerNorm(8), Permute([0, 3, 1, 2]))
        self.conv = nn.Conv2d(8, 8, 3)
        self.bn = NormAct(8)
        self.conv2 = nn.Conv2d(8, 8, 3)
        self.fc = nn.Linear(8, 3)

    def forward(self, x):
        x = self.bn(self.conv(self.stem(x)))
        return self.fc(self.conv2(x).mean((2, 3)))


def test_norm_with_fused_activation_and_norm_after_permute():
    """conv -> (norm with a fused activation): after the whole norm; conv -> Permute -> LayerNorm: after the
    LayerNorm, never between the conv and its norm."""
    regs, plan = plan_dropout(ConvNet().eval(), torch.randn(2, 3, 12, 12))
    got = places(plan)
    assert got["conv"] == "bn"
    assert got["stem.0"] == "stem.2"


class RMSNorm(nn.Module):
    """An RMSNorm written out (transformers' LlamaRMSNorm pattern): no torch norm class, no norm function."""

    def __init__(self, d: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(d))

    def forward(self, x):
        return self.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6))


class MyGELU(nn.Module):
    def forward(self, x):
        return F.gelu(x)


class RMSMlp(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.norm, self.act, self.fc2 = nn.Linear(8, 16), RMSNorm(16), MyGELU(), nn.Linear(16, 3)

    def forward(self, x):
        return self.fc2(self.act(self.norm(self.fc1(x))))


def test_written_out_rmsnorm_is_a_norm():
    regs, plan = plan_dropout(RMSMlp().eval(), torch.randn(4, 8))
    mm = plan.context.model_map
    assert mm.kind("norm") == "norm" and mm.kind("act") == "activation"
    assert places(plan)["fc1"] == "act"


# --------------------------------------------------------------------------- gates


class SpatialGate(nn.Module):
    """gMLP's spatial gating unit: half the channels, normalised and mixed over tokens, multiply the other half."""

    def __init__(self, d: int, tokens: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(d // 2)
        self.proj = nn.Linear(tokens, tokens)

    def forward(self, x):
        u, v = x.chunk(2, dim=-1)
        v = self.proj(self.norm(v).transpose(-1, -2))
        return u * v.transpose(-1, -2)


class GatedMlp(nn.Module):
    def __init__(self, d: int = 8, tokens: int = 5) -> None:
        super().__init__()
        self.fc1, self.act, self.gate = nn.Linear(d, 2 * d), nn.GELU(), SpatialGate(2 * d, tokens)
        self.fc2 = nn.Linear(d, d)
        self.head = nn.Linear(d, 3)

    def forward(self, x):
        return self.head(self.fc2(self.gate(self.act(self.fc1(x)))).mean(1))


class Excite(nn.Module):
    """Squeeze-excitation with a functional sigmoid: ``x * sigmoid(fc2(relu(fc1(mean(x)))))``."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.fc1, self.relu, self.fc2 = nn.Conv2d(c, 4, 1), nn.ReLU(), nn.Conv2d(4, c, 1)
        self.conv, self.head = nn.Conv2d(3, c, 3), nn.Linear(c, 3)

    def forward(self, x):
        x = self.conv(x)
        s = torch.sigmoid(self.fc2(self.relu(self.fc1(x.mean((2, 3), keepdim=True)))))
        return self.head((x * s).mean((2, 3)))


def test_nothing_inside_a_gate():
    """The gating branch, reached through a transpose or a functional sigmoid, takes no dropout."""
    regs, plan = plan_dropout(GatedMlp().eval(), torch.randn(2, 5, 8))
    assert not {"gate.proj", "gate.norm"} & set(places(plan)), places(plan)
    assert {"gate.proj", "gate.norm"} <= plan.context.model_map.gates
    regs, plan = plan_dropout(Excite(8).eval(), torch.randn(2, 3, 10, 10))
    assert not {"fc1", "fc2"} & set(places(plan)), places(plan)


def test_a_swish_written_out_is_not_a_gate():
    """``h * sigmoid(h)``: both operands come from one layer, so that layer is no gate."""

    class Swish(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc, self.head = nn.Linear(8, 8), nn.Linear(8, 3)

        def forward(self, x):
            h = self.fc(x)
            return self.head(h * torch.sigmoid(h))

    mm = analyse(Swish().eval(), torch.randn(4, 8))
    assert "fc" not in mm.gates


# --------------------------------------------------------------------------- outputs


Outputs = namedtuple("Outputs", ["logits", "aux_logits"])


class AuxNet(nn.Module):
    """A classifier with an auxiliary head that runs in training only and has its own Dropout(0.7)
    (torchvision's GoogLeNet / Inception pattern)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.fc = nn.Conv2d(3, 8, 3), nn.Linear(8, 3)
        self.aux_fc1, self.aux_drop, self.aux_fc2 = nn.Linear(8, 16), nn.Dropout(0.7), nn.Linear(16, 3)

    def forward(self, x):
        h = F.relu(self.conv(x)).mean((2, 3))
        out = self.fc(h)
        if self.training:
            aux = self.aux_fc2(self.aux_drop(F.relu(self.aux_fc1(h), inplace=True)))
            return Outputs(out, aux)
        return out


def test_training_only_head_output_and_existing_dropout():
    """The aux logits are an output (nothing after them); the aux head's own Dropout is reused, with no
    second dropout inserted in series before it; the model is back in eval mode with its dropout rate."""
    model = AuxNet().eval()
    regs, plan = plan_dropout(model, torch.randn(2, 3, 8, 8))
    mm = plan.context.model_map
    assert {i.path for i in mm.layers if i.is_output} == {"fc", "aux_fc2"}
    assert "aux_fc1" not in places(plan) and "aux_fc2" not in places(plan)
    assert set_rows(plan)["aux_fc1"] == "aux_drop"
    assert not model.training and model.aux_drop.p == 0.7


class FunctionalRelu(nn.Module):
    """``self.drop(F.relu(self.fc(x)))``: the model's own dropout after a functional activation."""

    def __init__(self) -> None:
        super().__init__()
        self.fc, self.drop, self.head = nn.Linear(8, 8), nn.Dropout(0.3), nn.Linear(8, 3)

    def forward(self, x):
        return self.head(self.drop(F.relu(self.fc(x))))


@pytest.mark.parametrize("example", [True, False], ids=["traced", "fx"])
def test_no_dropout_in_series_before_the_models_own_after_a_functional_activation(example):
    regs, plan = plan_dropout(FunctionalRelu().eval(), torch.randn(4, 8) if example else None)
    assert "fc" not in places(plan) and set_rows(plan)["fc"] == "drop"


class GlobalMean(nn.Module):
    """A global pool written as a library writes it (timm's ``SelectAdaptivePool2d`` pattern)."""

    def forward(self, x):
        return x.mean((2, 3))


class PooledHead(nn.Module):
    """``conv -> BN -> ReLU -> pool -> [Dropout] -> Linear``: the pool a module (``MaxPool2d`` then a global
    mean of its own class) or a function (``F.adaptive_avg_pool2d(x, 1).flatten(1)``, torchvision's
    MobileNetV2)."""

    def __init__(self, functional: bool, head_dropout: bool = True) -> None:
        super().__init__()
        self.functional = functional
        self.conv0, self.bn0, self.act0 = nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU()
        self.conv, self.bn, self.act = nn.Conv2d(8, 8, 3), nn.BatchNorm2d(8), nn.ReLU()
        self.maxpool, self.pool = nn.MaxPool2d(2), GlobalMean()
        self.drop = nn.Dropout(0.2) if head_dropout else nn.Identity()
        self.fc = nn.Linear(8, 3)

    def forward(self, x):
        x = self.act(self.bn(self.conv(self.act0(self.bn0(self.conv0(x))))))
        x = F.adaptive_avg_pool2d(x, 1).flatten(1) if self.functional else self.pool(self.maxpool(x))
        return self.fc(self.drop(x))


POOL_X = torch.randn(4, 3, 12, 12)


@pytest.mark.parametrize("functional", [True, False], ids=["pool-function", "pool-modules"])
def test_no_dropout_in_series_through_a_pool_before_the_models_own(functional):
    model = PooledHead(functional).eval()
    regs, plan = plan_dropout(model, POOL_X)
    rows = {r.path: r for r in plan.rows()}
    assert "conv" not in places(plan) and places(plan)["conv0"] == "act0"
    assert rows["conv"].action == "note" and "pooled into drop" in rows["conv"].reason
    assert set_rows(plan)["fc"] == "drop" and rows["fc"].kind == "hidden"  # the head's slot keeps the hidden rate
    apply_plan(model, regs, plan)
    assert not [p for p in inserted(model) if p.startswith(("conv.", "bn.", "act.", "maxpool.", "pool."))]
    assert model.drop.p == rows["fc"].rate

    model = PooledHead(functional).eval()
    regs = build_regularizers({"spatial_dropout": {}})
    plan = make_plan(model, regs, n_examples=1000, example_input=POOL_X)
    assert "conv" not in places(plan) and set_rows(plan)["conv"] == "drop"

    regs = build_regularizers({"spatial_dropout": {"existing": "keep"}})
    plan = make_plan(model, regs, n_examples=1000, example_input=POOL_X)
    assert "conv" not in places(plan) and "conv" not in set_rows(plan)


@pytest.mark.parametrize("functional", [True, False], ids=["pool-function", "pool-modules"])
def test_a_pool_without_dropout_after_it_keeps_the_insertion_before_it(functional):
    regs, plan = plan_dropout(PooledHead(functional, head_dropout=False).eval(), POOL_X)
    assert places(plan)["conv"] == "act" and not set_rows(plan)


class BranchSum(nn.Module):
    """A re-parameterisable block (timm's MobileOne): ``out = 0; out += branch(x); out += 0`` with Python
    zeros where a branch is absent, then an activation and the model's own dropout."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn, self.act = nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU()
        self.drop, self.fc = nn.Dropout2d(0.2), nn.Linear(8, 3)

    def forward(self, x):
        identity_out, scale_out = 0, 0
        out = scale_out
        out += self.bn(self.conv(x))
        out += identity_out
        x = self.drop(self.act(out * 1.0))
        return self.fc(x.mean((2, 3)))


@pytest.mark.parametrize("example", [True, False], ids=["traced", "fx"])
def test_arithmetic_with_constants_keeps_a_layer_in_series_with_the_models_dropout(example):
    """``0 + bn(x)``, ``out += 0``, ``out * 1.0``: nothing else flows in, so the dropout after the activation is
    still this layer's dropout (set, never doubled by an insertion after the BatchNorm)."""
    regs, plan = plan_dropout(BranchSum().eval(), POOL_X if example else None)
    assert "conv" not in places(plan) and set_rows(plan)["conv"] == "drop"


class CapturedBlock(nn.Module):
    """A pre-norm residual block whose branch ends in the model's own stochastic depth, in a forward that
    ``torch.fx`` cannot trace (``int`` of a traced shape): ``torch.export`` captures it in eval mode, where the
    stochastic depth returns its input and leaves no node."""

    def __init__(self) -> None:
        super().__init__()
        self.norm, self.fc, self.act, self.proj = nn.LayerNorm(8), nn.Linear(8, 16), nn.GELU(), nn.Linear(16, 8)
        self.drop_path = DropPath(0.1)
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        width = int(x.shape[-1])
        x = x + self.drop_path(self.proj(self.act(self.fc(self.norm(x)))))
        return self.head(x[..., :width])


@pytest.mark.parametrize("existing", ["override", "keep"])
def test_the_models_own_stochastic_depth_is_reused_where_only_export_captures_the_block(existing):
    model = CapturedBlock().eval()
    regs = build_regularizers({"drop_path": {"rate": 0.3, "depth": "uniform", "existing": existing}})
    plan = make_plan(model, regs, n_examples=1000, example_input=torch.randn(4, 8))
    assert "torch.export" in plan.rows()[0].reason
    assert places(plan) == {}
    assert set_rows(plan) == ({"": "drop_path"} if existing == "override" else {})
    apply_plan(model, regs, plan)
    assert inserted(model) == [] and model.drop_path.p == (0.3 if existing == "override" else 0.1)


# --------------------------------------------------------------------------- dead modules


class FunctionalProj(nn.Module):
    """Weights held by a module the forward never calls: ``F.linear(x, self.proj.weight)`` (torchvision's
    Swin attention pattern)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc, self.act, self.proj, self.head = nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 8), nn.Linear(8, 3)

    def forward(self, x):
        h = self.act(self.fc(x))
        return self.head(F.linear(h, self.proj.weight, self.proj.bias))


def test_no_insertion_on_a_module_the_forward_never_calls():
    model = FunctionalProj().eval()
    regs, plan = plan_dropout(model, torch.randn(4, 8))
    assert "proj" not in places(plan) and "fc" in places(plan)
    apply_plan(model, regs, plan)
    fired: list[str] = []
    for path, module in model.named_modules():
        if is_injected(path) and path.rsplit(".", 1)[-1].startswith("regfw_"):
            module.register_forward_hook(lambda m, a, o, p=path: fired.append(p))
    model.train()
    model(torch.randn(4, 8))
    assert sorted(fired) == sorted(inserted(model)) and fired


# --------------------------------------------------------------------------- reuse, never double


class SharedDrop(nn.Module):
    """One dropout module called at two places (Hugging Face ViT's layer pattern)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2, self.head = nn.Linear(8, 8), nn.Linear(8, 8), nn.Linear(8, 3)
        self.drop = nn.Dropout(0.1)

    def forward(self, x):
        x = self.drop(self.fc1(x))
        return self.head(self.drop(self.fc2(x)))


def test_a_dropout_called_at_several_places_is_reused_at_each():
    model = SharedDrop().eval()
    regs, plan = plan_dropout(model, torch.randn(4, 8))
    assert not {"fc1", "fc2"} & set(places(plan)), places(plan)
    assert set_rows(plan).get("fc2") == "drop" and set_rows(plan).get("fc1") == "drop"
    apply_plan(model, regs, plan)
    assert not [p for p in inserted(model) if p.startswith(("fc1.", "fc2.")) and "input" not in p]


class GeluNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.act1, self.fc2, self.act2, self.head = (nn.Linear(8, 16), MyGELU(), nn.Linear(16, 16),
                                                               MyGELU(), nn.Linear(16, 3))

    def forward(self, x):
        return self.head(self.act2(self.fc2(self.act1(self.fc1(x)))))


@pytest.mark.parametrize("existing", ["override", "keep"])
def test_applying_twice_inserts_once_for_any_activation_class(existing):
    model = GeluNet().eval()
    x = torch.randn(4, 8)
    regs, plan = plan_dropout(model, x, existing=existing)
    apply_plan(model, regs, plan)
    first = inserted(model)
    assert first and all(p.startswith(("act1.", "act2.")) for p in first if "input" not in p), first
    regs, again = plan_dropout(model, x, existing=existing)
    assert not places(again), places(again)
    apply_plan(model, regs, again)
    assert inserted(model) == first
    assert sum(is_dropout(m) for _, m in model.named_modules()) == len(first)


# --------------------------------------------------------------------------- the model is untouched


class CachedBias(nn.Module):
    """An attention-bias cache filled by an eval-mode forward (timm's LeViT / EfficientFormer pattern)."""

    def __init__(self, d: int = 8) -> None:
        super().__init__()
        self.fc, self.act, self.head = nn.Linear(d, d), nn.ReLU(), nn.Linear(d, 3)
        self.bn = nn.BatchNorm1d(d)
        self.bias = nn.Parameter(torch.randn(d))
        self.cache: dict[str, torch.Tensor] = {}

    def biases(self, device: torch.device) -> torch.Tensor:
        if self.training:
            return self.bias * 2
        key = str(device)
        if key not in self.cache:
            self.cache[key] = self.bias * 2
        return self.cache[key]

    def forward(self, x):
        return self.head(self.act(self.bn(self.fc(x))) + self.biases(x.device))


class TrainOnly(CachedBias):
    """Also a head that runs in training only, so planning makes a training-mode pass (BatchNorm statistics
    would move in it)."""

    def __init__(self) -> None:
        super().__init__()
        self.aux = nn.Linear(8, 3)

    def forward(self, x):
        out = super().forward(x)
        return (out, self.aux(x)) if self.training else out


@pytest.mark.parametrize("cls", [CachedBias, TrainOnly])
@pytest.mark.parametrize("example", [True, False])
def test_planning_applying_and_sampling_leave_the_model_untouched(cls, example):
    """Attributes, caches, hooks and buffers: unchanged by planning; changed by applying only where the plan
    says (its inserted modules, their hooks on the anchors, the rates it sets); unchanged by sampling with
    every strategy. The model's own cache never holds a traced object."""
    from regfw.placement.untouched import differences, fingerprint
    from regfw.uncertainty import mc_predict

    torch.manual_seed(0)
    model = cls().eval()
    x = torch.randn(4, 8)
    with torch.no_grad():
        model(x)  # the model's own use fills its cache
    before = fingerprint(model)
    regs = build_regularizers({"dropout": {}})
    plan = make_plan(model, regs, n_examples=1000, example_input=x if example else None)
    assert differences(before, fingerprint(model)) == []
    apply_plan(model, regs, plan)
    applied = fingerprint(model, skip=("regfw_",))
    anchors = {r.anchor for r in plan.rows() if r.action != "note"}
    unexplained = [d for d in differences(before, applied)
                   if d.split(":")[0] not in anchors or d.split(":")[1] not in ("_forward_hooks", "_forward_pre_hooks",
                                                                                "p")]
    assert unexplained == [] and anchors
    for strategy in ("loop", "batched", "auto"):
        mc_predict(model, x, samples=4, strategy=strategy, seed=0)
        assert differences(applied, fingerprint(model, skip=("regfw_",))) == [], strategy
    assert all(type(v) is torch.Tensor for v in model.cache.values())
