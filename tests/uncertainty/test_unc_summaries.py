"""Summaries of MC samples against hand-computed values (natural logs, nats)."""
from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from regfw.uncertainty import (
    class_variance,
    classification_summary,
    entropy,
    expected_entropy,
    mutual_information,
    predictive_entropy,
    regression_summary,
    variation_ratio,
)
from regfw.uncertainty.metrics import gaussian_nll


def h(*ps: float) -> float:
    return -sum(p * math.log(p) for p in ps if p > 0)


def test_entropy_hand_values():
    assert float(entropy(torch.tensor([0.5, 0.5]))) == pytest.approx(math.log(2), abs=1e-7)
    assert float(entropy(torch.tensor([0.25] * 4))) == pytest.approx(math.log(4), abs=1e-7)
    # one-hot certain: exactly 0, never NaN
    assert float(entropy(torch.tensor([1.0, 0.0, 0.0]))) == 0.0


def test_three_samples_by_hand():
    probs = torch.tensor([[[0.9, 0.1]], [[0.9, 0.1]], [[0.2, 0.8]]], dtype=torch.float64)  # [T=3, B=1, C=2]
    mean = (0.9 + 0.9 + 0.2) / 3
    pe = h(mean, 1 - mean)
    ee = (2 * h(0.9, 0.1) + h(0.2, 0.8)) / 3
    assert float(predictive_entropy(probs)[0]) == pytest.approx(pe, abs=1e-12)
    assert float(expected_entropy(probs)[0]) == pytest.approx(ee, abs=1e-12)
    assert float(mutual_information(probs)[0]) == pytest.approx(pe - ee, abs=1e-12)
    # votes: class 0 twice, class 1 once -> 1 - 2/3
    assert float(variation_ratio(probs)[0]) == pytest.approx(1 / 3, abs=1e-12)
    var0 = sum((v - mean) ** 2 for v in (0.9, 0.9, 0.2)) / 3  # population variance
    assert class_variance(probs)[0].tolist() == pytest.approx([var0, var0], abs=1e-12)
    s = classification_summary(probs)
    assert s.prediction.tolist() == [0]
    assert float(s.variance[0]) == pytest.approx(2 * var0, abs=1e-12)
    assert float(s.score("mutual_information")[0]) == pytest.approx(pe - ee, abs=1e-12)


def test_full_disagreement_is_ln2_mutual_information():
    probs = torch.tensor([[[1.0, 0.0]], [[0.0, 1.0]]])
    assert float(mutual_information(probs)[0]) == pytest.approx(math.log(2), abs=1e-6)
    assert float(expected_entropy(probs)[0]) == 0.0
    assert float(variation_ratio(probs)[0]) == pytest.approx(0.5)


def test_identical_samples_have_zero_mutual_information():
    p = torch.softmax(torch.randn(1, 4, 5, generator=torch.Generator().manual_seed(0)), -1)
    probs = p.expand(7, 4, 5)
    assert torch.all(mutual_information(probs) == 0)  # clamped, never slightly negative
    assert torch.all(variation_ratio(probs) == 0)
    assert torch.all(class_variance(probs) == 0)


def test_certain_one_hot_has_zero_entropy_and_no_nan():
    probs = torch.nn.functional.one_hot(torch.tensor([[2, 0]] * 4), 3).float()  # [T=4, B=2, C=3]
    s = classification_summary(probs)
    for t in (s.predictive_entropy, s.expected_entropy, s.mutual_information, s.variation_ratio):
        assert torch.all(t == 0) and not torch.any(torch.isnan(t))


def test_shape_and_score_errors():
    with pytest.raises(ValueError, match=r"\[T, B, C\]"):
        predictive_entropy(torch.rand(3, 4))
    s = classification_summary(torch.full((2, 1, 2), 0.5))
    with pytest.raises(ValueError, match="'nope'"):
        s.score("nope")


@settings(max_examples=40, deadline=None)
@given(
    t=st.integers(2, 6), b=st.integers(1, 3), c=st.integers(2, 5), seed=st.integers(0, 10_000),
    scale=st.floats(0.1, 20.0),
)
def test_information_inequalities(t, b, c, seed, scale):
    logits = torch.randn(t, b, c, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * scale
    probs = torch.softmax(logits, -1)
    s = classification_summary(probs)
    assert torch.all(s.mutual_information >= 0)
    assert torch.all(s.mutual_information <= s.predictive_entropy + 1e-12)
    assert torch.all(s.predictive_entropy <= math.log(c) + 1e-9)
    assert torch.all((s.variation_ratio >= 0) & (s.variation_ratio <= 1 - 1 / c + 1e-12))


def test_regression_mixture_variance_by_hand():
    means = torch.tensor([[[1.0]], [[3.0]]])  # T=2, B=1, D=1
    variances = torch.tensor([[[0.5]], [[1.5]]])
    s = regression_summary(means, variances)
    assert float(s.mean) == pytest.approx(2.0)
    assert float(s.aleatoric) == pytest.approx(1.0)  # mean of predicted variances
    assert float(s.epistemic) == pytest.approx(1.0)  # population variance of {1, 3}
    assert float(s.variance) == pytest.approx(2.0)  # aleatoric + epistemic, nothing dropped
    # fixed noise precision tau: aleatoric = 1 / tau
    s2 = regression_summary(means, tau=4.0)
    assert float(s2.variance) == pytest.approx(0.25 + 1.0)
    # no aleatoric model: purely epistemic, still non-zero
    assert float(regression_summary(means).variance) == pytest.approx(1.0)
    # Gaussian NLL of the predictive distribution N(2, 2) at y = 0
    nll = gaussian_nll(s.mean, s.variance, torch.tensor([[0.0]]))
    assert nll == pytest.approx(0.5 * (math.log(2 * math.pi * 2.0) + 4.0 / 2.0), abs=1e-9)


def test_regression_argument_errors():
    m = torch.zeros(3, 2, 1)
    with pytest.raises(ValueError, match="not both"):
        regression_summary(m, torch.ones_like(m), tau=1.0)
    with pytest.raises(ValueError, match="tau"):
        regression_summary(m, tau=0.0)
    with pytest.raises(ValueError, match="shape"):
        regression_summary(m, torch.ones(3, 2, 2))


@pytest.mark.parametrize("shape", [(30, 218, 5), (4, 8, 200, 2), (30, 218, 32), (30, 218, 33), (3, 1), (2, 4096, 1)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_class_softmax_is_torch_softmax_to_round_off(shape, dtype):
    """The classes-leading path (few classes) and torch's kernel (many classes, tiny inputs) agree
    with torch.softmax to a few ulps; -inf logits get probability exactly 0, rows sum to 1."""
    from regfw.uncertainty.summaries import class_softmax

    gen = torch.Generator().manual_seed(sum(shape))
    logits = (6 * torch.randn(shape, generator=gen)).to(dtype)
    if shape[-1] > 1:
        logits[..., 0] = -math.inf
    out = class_softmax(logits)
    ref = torch.softmax(logits, dim=-1)
    assert out.shape == ref.shape and out.dtype == dtype and out.is_contiguous()
    tol = 1e-6 if dtype == torch.float32 else 1e-14
    assert torch.allclose(out, ref, rtol=tol, atol=tol)
    if shape[-1] > 1:
        assert torch.all(out[..., 0] == 0)
    assert torch.allclose(out.sum(-1), torch.ones((), dtype=dtype), atol=10 * tol)
