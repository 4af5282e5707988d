"""``mc_predict`` on a model compiled with ``torch.compile``: every strategy, the statistics of eager ``loop``.

The model mixes regfw's dropout, ``nn.Dropout`` and a functional ``F.dropout`` call in a forward
(found by regfw's watch of an eval pass). The compiled module is what a user passes
(``torch.compile(model)``, an ``OptimizedModule``); ``loop`` and ``batched`` sample it, ``auto``
splits and replays the module it wraps. The backend is ``aot_eager`` (see ``test_compile.py``).
"""
from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from noise_floor import batch_noise_floor, far_above_floor
from torch import nn

from regfw.layers import Dropout
from regfw.uncertainty import mc_predict
from regfw.uncertainty.sampling import uncompiled

T = 1000


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2, self.fc3 = nn.Linear(16, 64), nn.Linear(64, 64), nn.Linear(64, 5)
        self.drop_torch, self.drop_regfw = nn.Dropout(0.2), Dropout(0.25)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.drop_torch(F.relu(self.fc1(x)))
        x = F.dropout(F.relu(self.fc2(x)), 0.3, self.training)
        return self.fc3(self.drop_regfw(x))


X = torch.randn(4, 16, generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def nets() -> tuple[nn.Module, nn.Module]:
    torch.manual_seed(0)
    model = Net().eval()
    torch._dynamo.reset()
    return model, torch.compile(model, backend="aot_eager", fullgraph=True)


def test_uncompiled_is_the_wrapped_module(nets):
    model, compiled = nets
    assert compiled is not model and uncompiled(compiled) is model and uncompiled(model) is model


#: ``auto`` through its split itself (by default it may predict that ``batched`` is faster and run that)
SPLIT = {"auto": {"choose": False}}


@pytest.mark.parametrize("strategy", ["loop", "batched", "auto"])
def test_every_strategy_on_the_compiled_model_has_eager_loops_statistics(nets, strategy):
    model, compiled = nets
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # auto must split, not fall back to batched
        got = mc_predict(compiled, X, samples=T, strategy=strategy, seed=1, **SPLIT.get(strategy, {}))
    ref = mc_predict(model, X, samples=T, strategy="loop", seed=2)
    assert got.strategy == strategy
    a, b = got.outputs.double(), ref.outputs.double()
    # means: within 5 standard errors (20 outputs), each standard error first asserted 100x above
    # the floating-point noise between 4 rows and T x 4 rows
    se = (a.var(0) / T + b.var(0) / T).sqrt()
    far_above_floor(se, batch_noise_floor(model, X, rows=T * 4), "the standard error of the MC means")
    z = (a.mean(0) - b.mean(0)).abs() / se
    assert z.max() < 5, z
    # spreads: variance ratio within 25% (standard error of a variance ratio at T = 1000: about 4.5%)
    ratio = a.var(0) / b.var(0)
    assert ratio.min() > 0.8 and ratio.max() < 1.25, ratio
    # the deterministic comparison is the eval output, compiled or not
    torch.testing.assert_close(got.deterministic, model(X), rtol=1e-6, atol=1e-6)
    # one seed, one result: the compiled module's masks come from the seeded generator too
    again = mc_predict(compiled, X, samples=T, strategy=strategy, seed=1, **SPLIT.get(strategy, {}))
    assert torch.equal(got.outputs, again.outputs)


def test_auto_on_the_compiled_model_replays_the_wrapped_module(nets):
    model, compiled = nets
    torch.testing.assert_close(mc_predict(compiled, X, samples=50, strategy="auto", seed=3, choose=False).outputs,
                               mc_predict(model, X, samples=50, strategy="auto", seed=3, choose=False).outputs,
                               rtol=0, atol=0)


def test_a_model_compiled_in_place_samples_with_every_strategy():
    """``model.compile()`` compiles the module's own call (no wrapper): every strategy runs on it,
    ``auto`` splits it (no fallback warning) and draws the samples of ``auto`` on an uncompiled copy."""
    torch.manual_seed(0)
    model, twin = Net().eval(), Net().eval()
    twin.load_state_dict(model.state_dict())
    torch._dynamo.reset()
    model.compile(backend="aot_eager")
    for strategy in ("loop", "batched", "auto"):
        with warnings.catch_warnings():
            warnings.simplefilter("error", RuntimeWarning)
            got = mc_predict(model, X, samples=50, strategy=strategy, seed=4)
        assert got.strategy == strategy and float(got.outputs.std(0).min()) > 0
    torch.testing.assert_close(got.outputs, mc_predict(twin, X, samples=50, strategy="auto", seed=4).outputs,
                               rtol=0, atol=0)
