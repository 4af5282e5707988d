"""The rate table and the rate policy of ``regfw.kinds``: the seed's numbers, monotonicity, bounds."""
from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from regfw import kinds as K

#: Every (kind, variant) pair with a range: the table rows and the variants' own rows.
RANGES = [(kind, None) for kind in K.RATE_TABLE] + [
    (kind, variant) for variant, rows in K.VARIANT_RANGES.items() for kind in rows
]
sizes = st.one_of(st.none(), st.integers(min_value=0, max_value=10**12))
kinds = st.sampled_from(RANGES)


def test_table_holds_the_seeds_numbers():
    seed = {"input": (0.1, 0.2), "hidden": (0.3, 0.5), "conv": (0.1, 0.3), "recurrent": (0.2, 0.3),
            "attention": (0.1, 0.1)}
    for kind, (low, high) in seed.items():
        row = K.RATE_TABLE[kind]
        assert (row.low, row.high) == (low, high)
        assert low <= row.default <= high
    assert K.rate_range("hidden", "alpha_dropout") == K.VARIANT_RANGES["alpha_dropout"]["hidden"]
    assert K.rate_range("conv", "alpha_dropout") == K.RATE_TABLE["conv"]  # no own row: the table's


@settings(max_examples=300, deadline=None)
@given(kinds, st.integers(0, 10**12), st.integers(0, 10**12), sizes)
def test_policy_is_non_increasing_in_dataset_size(kind_variant, n1, n2, p):
    kind, variant = kind_variant
    small, large = sorted((n1, n2))
    assert K.policy_rate(kind, small, p, variant) >= K.policy_rate(kind, large, p, variant)


@settings(max_examples=300, deadline=None)
@given(kinds, sizes, st.integers(0, 10**12), st.integers(0, 10**12))
def test_policy_is_non_increasing_in_parameter_count(kind_variant, n, p1, p2):
    kind, variant = kind_variant
    small, large = sorted((p1, p2))
    assert K.policy_rate(kind, n, small, variant) >= K.policy_rate(kind, n, large, variant)


@settings(max_examples=300, deadline=None)
@given(kinds, sizes, sizes)
def test_policy_never_leaves_the_range(kind_variant, n, p):
    kind, variant = kind_variant
    row = K.rate_range(kind, variant)
    assert row.low <= K.policy_rate(kind, n, p, variant) <= row.high


@pytest.mark.parametrize("kind", ["input", "hidden", "conv", "recurrent"])
def test_policy_reaches_both_ends_of_the_range(kind):
    row = K.RATE_TABLE[kind]
    assert K.policy_rate(kind, 100, 1_000) == row.high  # tiny data, tiny model
    assert K.policy_rate(kind, 10**7, 10**9) == row.low  # huge data, huge model
    # Strictly between the scale ends the rate moves: a smaller dataset gets a higher rate.
    assert K.policy_rate(kind, 2_000, 10**5) > K.policy_rate(kind, 200_000, 10**5)
    assert K.policy_rate(kind, 10**4, 10**5) > K.policy_rate(kind, 10**4, 10**7)


@settings(max_examples=100, deadline=None)
@given(kinds, st.floats(0.0, 0.99), sizes, sizes, st.sampled_from(["auto", "default"]))
def test_explicit_rate_always_wins(kind_variant, explicit, n, p, policy):
    kind, variant = kind_variant
    assert K.choose_rate(kind, explicit, policy, n, p, variant) == (explicit, "explicit")


def test_choose_rate_reasons_name_the_source():
    assert K.choose_rate("hidden", policy="default") == (0.5, "default (rate table)")
    rate, why = K.choose_rate("hidden", None, "auto", 674, 85002)
    assert rate == K.policy_rate("hidden", 674, 85002) and why == "policy (N=674, P=85002; range 0.3-0.5)"
    assert K.choose_rate("attention", None, "auto", 10, 10) == (0.1, "table (attention: 0.1)")
    assert K.choose_rate("hidden", None, "auto")[1] == "policy (N unknown, P unknown; range 0.3-0.5)"


def test_unknown_kind_is_a_key_error_naming_the_known_ones():
    with pytest.raises(KeyError, match="kind 'dense' has no rate; kinds with rates: input, hidden"):
        K.rate_range("dense")


class LinearLookalike(nn.Module):
    """Named like a Linear layer but not one: classification is by type, never by name."""


@pytest.mark.parametrize("module, kind", [
    (nn.Linear(2, 2), "hidden"), (nn.LazyLinear(2), "hidden"), (nn.Conv1d(1, 1, 1), "conv"),
    (nn.ConvTranspose2d(1, 1, 1), "conv"), (nn.GRU(2, 2), "recurrent"), (nn.LSTM(2, 2), "recurrent"),
    (nn.MultiheadAttention(4, 2), "attention"), (nn.TransformerEncoderLayer(4, 2), "attention"),
    (nn.BatchNorm2d(2), "norm"), (nn.LayerNorm(2), "norm"), (nn.GELU(), "activation"),
    (nn.Dropout(), None), (nn.Flatten(), None), (LinearLookalike(), None),
])
def test_builtin_kinds_are_by_type(module, kind):
    assert K.builtin_kind(module) == kind
