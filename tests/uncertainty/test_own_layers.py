"""Which of a model's own stochastic layers MC dropout samples (regfw/uncertainty/own_layers.py), and
the lines saying so."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from regfw.layers.drop_path import DropPath
from regfw.placement.plan import apply_plan, make_plan
from regfw.registry.regularizers import build_regularizers
from regfw.uncertainty import mc_predict
from regfw.uncertainty.callback import MCDropoutUncertainty
from regfw.uncertainty.fast import split_model
from regfw.uncertainty.modes import excluding
from regfw.uncertainty.own_layers import excluded, listing, own_layers


class Block(nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        self.fc = nn.Linear(c, c)
        self.drop_path = DropPath(0.3)  # the model's own stochastic depth

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.drop_path(F.relu(self.fc(x)))


class Net(nn.Module):
    """Two residual blocks with their own stochastic depth, a head with its own dropout."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Linear(8, 16)
        self.blocks = nn.Sequential(Block(16), Block(16))
        self.hidden = nn.Linear(16, 16)
        self.drop = nn.Dropout(0.2)
        self.head = nn.Linear(16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.drop(F.relu(self.hidden(self.blocks(F.relu(self.stem(x)))))))


def planned(regs: dict, keep_plan: bool = False) -> nn.Module:
    """``Net`` with ``regs`` planned and applied; ``keep_plan``: the plan kept on the model, as the
    Regularize callback keeps it (``regfw_plan``)."""
    torch.manual_seed(0)
    model = Net().eval()
    regularizers = build_regularizers(regs)
    plan = make_plan(model, regularizers, example_input=torch.randn(4, 8))
    apply_plan(model, regularizers, plan)
    if keep_plan:
        model.regfw_plan = plan
    return model.eval()


def training_flags(model: nn.Module, x: torch.Tensor, **kw) -> dict[str, bool]:
    """Whether each own stochastic layer ran in training mode (sampled) during one mc_predict call."""
    seen: dict[str, bool] = {}
    handles = [m.register_forward_hook(lambda m, i, o, p=p: seen.__setitem__(p, m.training))
               for p, m in model.named_modules() if p in ("blocks.0.drop_path", "blocks.1.drop_path", "drop")]
    try:
        mc_predict(model, x, 4, seed=0, **kw)
    finally:
        for h in handles:
            h.remove()
    return seen


def test_auto_samples_the_own_layers_of_the_selected_kinds_only():
    model = planned({"dropout": {}})
    assert any(p.endswith("regfw_dropout") for p, _ in model.named_modules())
    layers = {o.path: o for o in own_layers(model)}
    assert {p: (o.kind, o.sampled) for p, o in layers.items()} == {
        "blocks.0.drop_path": ("drop_path", False), "blocks.1.drop_path": ("drop_path", False),
        "drop": ("dropout", True)}
    x = torch.randn(6, 8, generator=torch.Generator().manual_seed(1))
    for strategy in ("loop", "batched", "auto"):
        assert training_flags(model, x, strategy=strategy) == {
            "blocks.0.drop_path": False, "blocks.1.drop_path": False, "drop": True}, strategy
    assert training_flags(model, x, sample_model_stochastic="all") == dict.fromkeys(
        ("blocks.0.drop_path", "blocks.1.drop_path", "drop"), True)
    assert training_flags(model, x, sample_model_stochastic="none") == dict.fromkeys(
        ("blocks.0.drop_path", "blocks.1.drop_path", "drop"), False)
    assert training_flags(model, x, selected=["drop_path"]) == {
        "blocks.0.drop_path": True, "blocks.1.drop_path": True, "drop": False}


def test_unsampled_stochastic_depth_is_deterministic_in_the_auto_split():
    """The split ``auto`` uses under ``sample_model_stochastic: auto``: the model's own stochastic depth
    is no random source (it is computed like any deterministic layer), its own dropout is; and the
    stochastic depth never runs in training mode."""
    model = planned({"dropout": {}})
    x = torch.randn(6, 8)
    with excluding(excluded(model)):
        sources = split_model(model, x).source_targets
    assert "m.drop" in sources and not any("drop_path" in s for s in sources), sources
    assert any("drop_path" in s for s in split_model(model, x).source_targets)  # without the setting: sampled
    assert training_flags(model, x, strategy="auto", choose=False) == {
        "blocks.0.drop_path": False, "blocks.1.drop_path": False, "drop": True}


def test_a_model_regfw_did_not_touch_is_sampled_whole_by_default():
    torch.manual_seed(0)
    model = Net().eval()
    assert all(o.sampled for o in own_layers(model))
    assert training_flags(model, torch.randn(4, 8)) == dict.fromkeys(
        ("blocks.0.drop_path", "blocks.1.drop_path", "drop"), True)


def test_nothing_left_to_sample_is_one_clear_error():
    torch.manual_seed(0)
    with pytest.raises(ValueError, match=r"nothing to sample: sample_model_stochastic='none' leaves all 3 of the "
                                         r"model's own stochastic layers in eval mode.*sample_model_stochastic='all'"):
        mc_predict(Net().eval(), torch.randn(4, 8), 4, sample_model_stochastic="none")
    with pytest.raises(ValueError, match=r"sample_model_stochastic must be one of \['auto', 'all', 'none'\], "
                                         r"got 'some'"):
        mc_predict(Net().eval(), torch.randn(4, 8), 4, sample_model_stochastic="some")


def test_the_listing_says_what_is_sampled_and_what_is_not():
    model = planned({"dropout": {}})
    lines = listing(own_layers(model), "auto")
    assert lines[0] == "MC dropout samples the model's own stochastic layers: 1 dropout (drop)"
    assert lines[1] == ("MC dropout does not sample the model's own stochastic layers: 2 drop_path "
                        "(blocks.0.drop_path, blocks.1.drop_path)")
    assert lines[2].startswith("(uncertainty.sample_model_stochastic: auto;")


def test_the_callback_lists_them_from_the_plan_it_finds(capsys):
    model = planned({"drop_path": {}}, keep_plan=True)
    callback = MCDropoutUncertainty(samples=4)
    lines = callback.say_what_is_sampled(model)
    # the plan sets the stochastic depth rates linearly from 0 (first block: 0, no longer stochastic)
    assert lines[0] == "MC dropout samples the model's own stochastic layers: 1 drop_path (blocks.1.drop_path)"
    assert lines[1] == "MC dropout does not sample the model's own stochastic layers: 1 dropout (drop)"
    assert capsys.readouterr().out.splitlines()[:2] == lines[:2]
