"""The ``attention_dropout`` plugin: the attention weights of a transformer dropped at its default rate.

Seeds are fixed; every statistical test measures the injected layer inside the model (see
``injected_layers``) and states its tolerance next to its assertion.
"""
from __future__ import annotations

import torch
from injected_layers import regularize, sigma
from models_zoo import SmallTransformer


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
