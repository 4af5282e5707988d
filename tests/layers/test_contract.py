"""The contract every stochastic layer keeps (see regfw/layers/dropout.py's module docstring)."""
from __future__ import annotations

import warnings

import pytest
import torch

from regfw.layers import (
    AlphaDropout,
    DropBlock2d,
    Dropout,
    DropPath,
    GaussianDropout,
    LockedDropout,
    SpatialDropout,
    SpatialDropout1d,
    SpatialDropout2d,
    SpatialDropout3d,
    StochasticModule,
    WeightDrop,
)

# (id, factory taking p, input shape)
LAYERS = [
    ("dropout", lambda p: Dropout(p), (4, 3, 8, 8)),
    ("dropout-classic", lambda p: Dropout(p, inverted=False), (4, 3, 8, 8)),
    ("spatial", lambda p: SpatialDropout(p), (4, 3, 8, 8)),
    ("spatial1d", lambda p: SpatialDropout1d(p), (4, 3, 8)),
    ("spatial2d", lambda p: SpatialDropout2d(p), (4, 3, 8, 8)),
    ("spatial3d", lambda p: SpatialDropout3d(p), (4, 3, 2, 8, 8)),
    ("gaussian", lambda p: GaussianDropout(p), (4, 3, 8, 8)),
    ("alpha", lambda p: AlphaDropout(p), (4, 3, 8, 8)),
    ("dropblock", lambda p: DropBlock2d(p, block_size=3), (4, 3, 8, 8)),
    ("dropblock-shared", lambda p: DropBlock2d(p, block_size=3, shared_channels=True), (4, 3, 8, 8)),
    ("droppath", lambda p: DropPath(p), (4, 3, 8, 8)),
    ("locked-bf", lambda p: LockedDropout(p, batch_first=True), (4, 6, 5)),
    ("locked-tf", lambda p: LockedDropout(p, batch_first=False), (6, 4, 5)),
    ("weightdrop", lambda p: WeightDrop(p), (12, 5)),
]
IDS = [name for name, _, _ in LAYERS]
EVAL_IS_IDENTITY = [layer for layer in LAYERS if layer[0] != "dropout-classic"]


@pytest.mark.parametrize("name,factory,shape", LAYERS, ids=IDS)
def test_is_stochastic_module_with_settable_rate(name, factory, shape):
    m = factory(0.3)
    assert isinstance(m, StochasticModule)
    assert m.p == 0.3
    m.p = 0.1
    assert m.p == 0.1
    assert "p=0.1" in repr(m)


@pytest.mark.parametrize("name,factory,shape", LAYERS, ids=IDS)
@pytest.mark.parametrize("bad", [-0.1, 1.5, float("nan")])
def test_rate_outside_unit_interval_is_value_error_naming_it(name, factory, shape, bad):
    with pytest.raises(ValueError, match=str(bad)):
        factory(bad)
    m = factory(0.2)
    with pytest.raises(ValueError, match=str(bad)):
        m.p = bad
    assert m.p == 0.2


@pytest.mark.parametrize("name,factory,shape", EVAL_IS_IDENTITY, ids=[layer[0] for layer in EVAL_IS_IDENTITY])
def test_eval_returns_the_input_itself(name, factory, shape):
    m = factory(0.5).eval()
    x = torch.randn(shape)
    assert m(x) is x


@pytest.mark.parametrize("name,factory,shape", LAYERS, ids=IDS)
def test_rate_zero_returns_the_input_itself(name, factory, shape):
    x = torch.randn(shape)
    assert factory(0.0).train()(x) is x
    assert factory(0.0).eval()(x) is x


@pytest.mark.parametrize("name,factory,shape", LAYERS, ids=IDS)
def test_rate_one_gives_zeros_without_nan_and_a_zero_gradient(name, factory, shape):
    m = factory(1.0).train()
    x = torch.randn(shape, requires_grad=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = m(x)
    assert out.shape == x.shape
    assert torch.equal(out, torch.zeros(shape))
    out.sum().backward()
    assert torch.equal(x.grad, torch.zeros(shape))


@pytest.mark.parametrize("name,factory,shape", LAYERS, ids=IDS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_output_keeps_dtype_and_device(name, factory, shape, dtype):
    x = torch.randn(shape, dtype=dtype)
    out = factory(0.4).train()(x)
    assert out.dtype == dtype
    assert out.device == x.device
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("name,factory,shape", LAYERS, ids=IDS)
def test_reproducible_under_manual_seed_and_random_otherwise(name, factory, shape):
    m = factory(0.5).train()
    x = torch.randn(shape) + 3.0  # away from 0 so every drop shows
    torch.manual_seed(123)
    a = m(x)
    torch.manual_seed(123)
    b = m(x)
    assert torch.equal(a, b)
    c = m(x)
    assert not torch.equal(a, c)
    assert not torch.equal(a, x)


@pytest.mark.parametrize("name,factory,shape", LAYERS, ids=IDS)
def test_training_output_is_differentiable_and_no_warnings(name, factory, shape):
    m = factory(0.3).train()
    x = torch.randn(shape, requires_grad=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        m(x).sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()


@pytest.mark.parametrize("name,factory,shape", LAYERS, ids=IDS)
def test_rate_changed_at_run_time_is_used_by_the_next_forward(name, factory, shape):
    m = factory(0.5).train()
    x = torch.randn(shape)
    m.p = 0.0
    assert m(x) is x
    m.p = 1.0
    assert torch.equal(m(x), torch.zeros(shape))
