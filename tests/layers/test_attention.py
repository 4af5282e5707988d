"""set_attention_dropout on torch's attention and Transformer layers."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from regfw.layers import DEFAULT_ATTENTION_DROPOUT, set_attention_dropout


def test_multihead_attention_rate_is_set_and_used():
    mha = nn.MultiheadAttention(8, 2, dropout=0.0, batch_first=True)
    assert set_attention_dropout(mha, 1.0) == 1
    assert mha.dropout == 1.0
    x = torch.randn(2, 5, 8)
    _, weights = mha.train()(x, x, x)
    assert torch.equal(weights, torch.zeros_like(weights))  # every attention weight dropped


def test_default_is_the_transformer_convention():
    assert DEFAULT_ATTENTION_DROPOUT == 0.1
    layer = nn.TransformerEncoderLayer(8, 2, dropout=0.0)
    set_attention_dropout(layer)
    assert layer.self_attn.dropout == 0.1


def test_encoder_and_decoder_layers_like_their_dropout_argument():
    enc = nn.TransformerEncoderLayer(8, 2, dim_feedforward=16, dropout=0.0)
    dec = nn.TransformerDecoderLayer(8, 2, dim_feedforward=16, dropout=0.0)
    assert set_attention_dropout(enc, 0.2) == 4  # self_attn + dropout, dropout1, dropout2
    assert set_attention_dropout(dec, 0.2) == 6  # self_attn, multihead_attn + 4 dropouts
    reference = nn.TransformerDecoderLayer(8, 2, dim_feedforward=16, dropout=0.2)
    for built, ref in ((dec, reference), (enc, nn.TransformerEncoderLayer(8, 2, dim_feedforward=16, dropout=0.2))):
        got = {n: (m.dropout if isinstance(m, nn.MultiheadAttention) else m.p) for n, m in built.named_modules()
               if isinstance(m, (nn.MultiheadAttention, nn.Dropout))}
        want = {n: (m.dropout if isinstance(m, nn.MultiheadAttention) else m.p) for n, m in ref.named_modules()
                if isinstance(m, (nn.MultiheadAttention, nn.Dropout))}
        assert got == want


def test_attention_only_and_other_dropouts_left_alone():
    model = nn.Sequential(nn.Dropout(0.5), nn.TransformerEncoder(nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0),
                                                                 num_layers=2, enable_nested_tensor=False))
    assert set_attention_dropout(model, 0.3, attention_only=True) == 2
    assert model[0].p == 0.5
    layer = model[1].layers[0]
    assert layer.self_attn.dropout == 0.3 and layer.dropout1.p == 0.0
    assert set_attention_dropout(model, 0.3) == 8
    assert model[0].p == 0.5 and layer.dropout1.p == 0.3


def test_no_attention_layer_returns_zero_and_bad_rate_raises():
    assert set_attention_dropout(nn.Linear(3, 3), 0.1) == 0
    with pytest.raises(ValueError, match="1.5"):
        set_attention_dropout(nn.MultiheadAttention(8, 2), 1.5)
