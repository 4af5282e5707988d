"""The floating-point noise floor between batch sizes (tests/noise_floor.py), and the strategy
comparisons rerun under another CPU kernel set than the machine's own."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from noise_floor import FACTOR, batch_noise_floor, far_above_floor
from torch import nn

from regfw.uncertainty import mc_predict

ROOT = Path(__file__).resolve().parents[2]


class BatchSizeLeak(nn.Module):
    """Adds 1e-3 x the batch size: the output of a row depends on how many rows share its batch."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + 1e-3 * x.shape[0]


def test_the_floor_is_the_largest_difference_between_batch_sizes():
    x = torch.ones(4, 3)
    assert batch_noise_floor(BatchSizeLeak(), x, rows=12) == pytest.approx(8e-3, rel=1e-4)
    assert batch_noise_floor(BatchSizeLeak(), x, rows=(6, 24, 2)) == pytest.approx(20e-3, rel=1e-4)
    # the quantity compared, here the values doubled
    doubled = batch_noise_floor(BatchSizeLeak(), x, rows=12, quantity=lambda out: 2 * out)
    assert doubled == pytest.approx(16e-3, rel=1e-4)


def test_the_floor_is_at_least_one_unit_in_the_last_place_and_modes_are_restored():
    model = nn.Sequential(nn.Linear(3, 3), nn.Dropout(0.5))
    model.train()
    model[0].weight.data.fill_(0.0)
    model[0].bias.data.fill_(8.0)  # bitwise the same output at every batch size
    floor = batch_noise_floor(model, torch.randn(4, 3), rows=40)
    assert floor == torch.finfo(torch.float32).eps * 8.0
    assert all(m.training for m in model.modules())


def test_a_model_random_in_eval_mode_is_refused():
    class Noisy(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x + torch.rand_like(x)

    with pytest.raises(AssertionError, match="gives another output on a second eval-mode pass"):
        batch_noise_floor(Noisy(), torch.zeros(4, 3), rows=8)


class ScaledResidual(nn.Module):
    """``x + scale * drop(relu(fc(x)))`` and a head: a residual branch under a layer scale."""

    def __init__(self, scale: float) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.fc, self.head = nn.Linear(16, 16), nn.Linear(16, 5)
        self.drop = nn.Dropout(0.5)
        self.scale = nn.Parameter(torch.full((16,), scale))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(x + self.scale * self.drop(torch.relu(self.fc(x))))


@pytest.mark.parametrize(("scale", "far_above"), [(1e-6, False), (0.5, True)])
def test_a_spread_under_a_tiny_layer_scale_is_refused_before_any_comparison(scale, far_above):
    """At ConvNeXt's initial layer scale the MC spread of the probabilities is under 100x the noise floor
    between batch sizes and the check says so; at a trained net's scale it is far above."""
    model = ScaledResidual(scale).eval()
    x = torch.randn(4, 16, generator=torch.Generator().manual_seed(1))
    t = 30
    probs = mc_predict(model, x, samples=t, strategy="loop", seed=0).probs.double()
    se = (2 * probs.var(0) / t).sqrt()
    floor = batch_noise_floor(model, x, rows=t * 4, quantity=lambda out: torch.softmax(out, -1))
    if far_above:
        assert bool(far_above_floor(se, floor, "the MC spread").all())
    else:
        with pytest.raises(AssertionError, match=rf"the MC spread is not far above the floating-point noise between "
                                                 rf"batch sizes: 0 of 20 entries are >= {FACTOR:g} x the floor"):
            far_above_floor(se, floor, "the MC spread")


#: The strategy comparisons rerun under ATEN_CPU_CAPABILITY=default (no vector kernels): other sums than
#: the machine's own kernels give, so a comparison that tests floating-point noise fails on any machine.
COMPARISONS = [
    "tests/uncertainty/test_fast.py::test_resnet_droppath_same_distribution_as_loop",
    "tests/uncertainty/test_fast.py::test_head_dropout_then_linear_matches_loop",
    "tests/uncertainty/test_fast.py::test_budget_chunks_replay_and_prefix_without_changing_values",
    "tests/uncertainty/test_fast.py::test_weight_masks_with_locked_dropout_are_drawn_per_sample_under_auto",
    "tests/uncertainty/test_unc_sampling.py::test_loop_and_batched_sample_the_same_distribution",
    "tests/uncertainty/test_noise_floor.py::test_a_spread_under_a_tiny_layer_scale_is_refused_before_any_comparison",
]


def test_strategy_comparisons_hold_under_the_default_cpu_kernels():
    code = ("import sys, pytest, torch; print('capability', torch.backends.cpu.get_cpu_capability()); "
            f"sys.exit(pytest.main(['-q', '-p', 'no:xdist', *{COMPARISONS!r}]))")
    env = {**os.environ, "ATEN_CPU_CAPABILITY": "default", "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert "capability DEFAULT" in out.stdout, out.stdout[-2000:] + out.stderr[-2000:]
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-2000:]
    assert f"{len(COMPARISONS) + 1} passed" in out.stdout, out.stdout[-2000:]
