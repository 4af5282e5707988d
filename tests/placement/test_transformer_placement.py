"""Placement on Transformers written with torch alone (the zoo checks timm's and torch's real ones).

* ``dropout`` reuses an ``nn.TransformerEncoderLayer``'s own dropouts (``dropout1`` after
  self-attention, ``dropout`` in the feed-forward block, ``dropout2`` after it) at the Transformer
  range, or keeps them; it never warns that it found no layer there;
* with ``attention_dropout`` too, each sets its own places whatever the order: the plan is what
  is done;
* a Transformer's input dropout is its own token dropout (after the position embedding), and
  its stem (a patch embedding) gets none;
* when nothing at all applies, the warning names what was looked at.
"""
from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

from regfw.placement.kinds import TRANSFORMER_RANGE
from regfw.placement.plan import apply_plan, make_plan
from regfw.registry.regularizers import build_regularizers

VOCAB = 30
TOKENS = torch.randint(0, VOCAB, (4, 7), generator=torch.Generator().manual_seed(0))
SLOTS = ("dropout1", "dropout", "dropout2")


class TextClassifier(nn.Module):
    """Embedding -> nn.TransformerEncoder (2 layers, dropout 0.1) -> mean -> Linear: its only Linear
    outside the encoder is the output layer."""

    def __init__(self, dropout: float = 0.1) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, 16)
        layer = nn.TransformerEncoderLayer(16, 2, dim_feedforward=32, dropout=dropout, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, num_layers=2, enable_nested_tensor=False)
        self.head = nn.Linear(16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(self.embed(x)).mean(dim=1))


class TinyViT(nn.Module):
    """Patch embedding conv -> tokens + position embedding -> token dropout -> encoder -> head."""

    def __init__(self) -> None:
        super().__init__()
        self.patch = nn.Conv2d(3, 16, 4, stride=4)
        self.pos = nn.Parameter(torch.zeros(1, 4, 16))
        self.pos_drop = nn.Dropout(0.0)
        layer = nn.TransformerEncoderLayer(16, 2, dim_feedforward=32, dropout=0.0, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, num_layers=1, enable_nested_tensor=False)
        self.head = nn.Linear(16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.patch(x).flatten(2).transpose(1, 2)
        return self.head(self.encoder(self.pos_drop(tokens + self.pos)).mean(dim=1))


def plan_quietly(model, x, section):
    regs = build_regularizers(section)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a "found no layer" warning fails the test
        plan = make_plan(model, regs, 10_000, x)
    assert not plan.warnings, plan.warnings
    return regs, plan


def test_dropout_reuses_the_encoder_layers_own_dropouts_at_the_transformer_range():
    torch.manual_seed(0)
    model = TextClassifier().eval()
    with torch.no_grad():
        reference = model(TOKENS)
    regs, plan = plan_quietly(model, TOKENS, {"dropout": {}})
    rows = plan.rows()
    assert [(r.kind, r.action, r.anchor) for r in rows] == [
        ("hidden", "set", f"encoder.layers.{i}.{d}") for i in (0, 1) for d in SLOTS]
    rate = rows[0].rate
    assert rate is not None and TRANSFORMER_RANGE.low <= rate <= TRANSFORMER_RANGE.high and rate != 0.1
    assert all(r.rate == rate and "Transformer range" in r.reason and "own dropout" in r.reason for r in rows)
    apply_plan(model, regs, plan)
    assert not [p for p, _ in model.named_modules() if "regfw_" in p], "a second dropout was inserted"
    for layer in model.encoder.layers:
        assert [getattr(layer, d).p for d in SLOTS] == [rate] * 3
        assert layer.self_attn.dropout == 0.1  # the attention weights are attention_dropout's
    with torch.no_grad():
        assert torch.equal(model.eval()(TOKENS), reference)


def test_existing_keep_leaves_the_encoder_layers_dropouts_and_does_not_warn():
    model = TextClassifier()
    regs, plan = plan_quietly(model, TOKENS, {"dropout": {"existing": "keep"}})
    assert plan.rows() == []
    apply_plan(model, regs, plan)
    assert all(getattr(layer, d).p == 0.1 for layer in model.encoder.layers for d in SLOTS)


@pytest.mark.parametrize("order", [("dropout", "attention_dropout"), ("attention_dropout", "dropout")])
def test_with_attention_dropout_each_sets_its_own_places_in_either_order(order):
    model = TextClassifier(dropout=0.0)
    regs, plan = plan_quietly(model, TOKENS, {name: {} for name in order})
    hidden = next(r.rate for r in plan.rows() if r.regularizer == "dropout")
    attention = [r for r in plan.rows() if r.regularizer == "attention_dropout"]
    assert all("sub-layer dropouts left to dropout" in r.reason for r in attention), attention
    apply_plan(model, regs, plan)
    for layer in model.encoder.layers:
        assert layer.self_attn.dropout == 0.1
        assert [getattr(layer, d).p for d in SLOTS] == [hidden] * 3


def test_attention_dropout_alone_sets_the_sub_layer_dropouts_too():
    model = TextClassifier(dropout=0.0)
    regs, plan = plan_quietly(model, TOKENS, {"attention_dropout": {}})
    apply_plan(model, regs, plan)
    assert all(getattr(layer, d).p == 0.1 for layer in model.encoder.layers for d in SLOTS)


def test_a_transformers_input_dropout_is_its_token_dropout_and_the_patch_embedding_gets_none():
    torch.manual_seed(0)
    model = TinyViT().eval()
    x = torch.randn(2, 3, 8, 8)
    regs, plan = plan_quietly(model, x, {"dropout": {}})
    rows = {(r.kind, r.path): r for r in plan.rows()}
    token = rows[("input", "patch")]
    assert (token.action, token.anchor) == ("set", "pos_drop")
    assert TRANSFORMER_RANGE.low < token.rate <= TRANSFORMER_RANGE.high
    assert "token dropout" in token.reason and "Transformer range" in token.reason and "stem patch" in token.reason
    assert ("conv", "patch") not in rows, "the patch embedding got dropout of its own"
    assert not any(r.anchor == "patch" for r in plan.rows())
    apply_plan(model, regs, plan)
    assert model.pos_drop.p == token.rate


def test_when_nothing_applies_the_warning_names_what_it_looked_at():
    model = nn.Sequential(nn.Embedding(VOCAB, 8), nn.Flatten(), nn.Linear(8 * 7, 3))
    regs = build_regularizers({"dropout": {}})
    plan = make_plan(model, regs, 10_000, TOKENS)
    assert plan.rows() == []
    assert plan.warnings == [
        "regularizer 'dropout' found no layer of kinds input, hidden, conv, recurrent in Sequential; nothing was "
        "inserted. It looked at: output layer(s) 2 (nothing goes after an output layer); the model input goes first "
        "to 0 (Embedding), not to a layer of kind hidden, conv, recurrent, so it takes no input dropout; layers of "
        "other kinds: 1 embedding (0)."]


def test_the_decoder_layers_slots_follow_its_three_sub_layers():
    from regfw.placement.structure import transformer_layer_slots

    assert transformer_layer_slots(nn.TransformerDecoderLayer(8, 2, 16)) == [
        ("self_attn", "dropout1"), ("multihead_attn", "dropout2"), ("linear1", "dropout"), ("linear2", "dropout3")]
    assert transformer_layer_slots(nn.Linear(2, 2)) == []


class HybridStem(nn.Module):
    """A conv stem with its own dropout and another conv after it, then the token dropout."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.act = nn.ReLU()
        self.stem_drop = nn.Dropout(0.1)
        self.vit = TinyViT()
        self.vit.patch = nn.Conv2d(8, 16, 4, stride=4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.vit(self.stem_drop(self.act(self.conv1(x))))


def test_a_dropout_in_a_conv_stem_with_layers_after_it_is_not_the_token_dropout():
    model = HybridStem().eval()
    _, plan = plan_quietly(model, torch.randn(2, 3, 8, 8), {"dropout": {}})
    rows = {(r.kind, r.path): r for r in plan.rows()}
    token = rows[("input", "conv1")]
    assert (token.action, token.anchor) == ("set", "vit.pos_drop")
    assert "stem vit.patch)" in token.reason  # the patch embedding since the stem's own dropout
    assert (rows[("conv", "conv1")].action, rows[("conv", "conv1")].anchor) == ("set", "stem_drop")
    assert ("conv", "vit.patch") not in rows
