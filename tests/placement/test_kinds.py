"""The rate table and the rate policy of ``regfw.placement.kinds``: the seed's numbers, monotonicity, bounds."""
from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from regfw.placement import kinds as K
from regfw.registry.regularizers import get_registry

#: The built-in regularizers that declare their own ranges (alpha_dropout, dropconnect).
OWN = {name: spec.cls.rate_ranges for name, spec in get_registry().specs.items() if spec.cls.rate_ranges}
#: Every (kind, own ranges) pair with a range: the table rows and the regularizers' own rows.
RANGES = [(kind, None) for kind in K.RATE_TABLE] + [
    (kind, ranges) for ranges in OWN.values() for kind in ranges
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
    alpha = OWN["alpha_dropout"]
    assert K.rate_range("hidden", alpha) == K.RateRange(0.05, 0.1, 0.1)  # Klambauer et al. 2017
    assert K.rate_range("conv", alpha) == K.RATE_TABLE["conv"]  # no own row: the table's
    assert K.rate_range("recurrent", OWN["dropconnect"]) == K.RateRange(0.2, 0.5, 0.5)  # Merity et al. 2018


def test_kinds_names_no_regularizer():
    """The rate table and the kinds know no plugin: every regularizer's range lives on its class."""
    import ast
    import inspect

    strings = {node.value for node in ast.walk(ast.parse(inspect.getsource(K)))
               if isinstance(node, ast.Constant) and isinstance(node.value, str)}
    words = {w.strip("`.,:;()") for text in strings for w in text.split() if "_" in w}
    names = set(get_registry().specs)
    assert {"alpha_dropout", "dropconnect"} <= names
    assert not names & (strings | words)
    assert not hasattr(K, "VARIANT_RANGES")


def test_own_ranges_may_be_tuples_and_are_checked():
    assert K.rate_range("hidden", {"hidden": (0.05, 0.15)}) == K.RateRange(0.05, 0.15, 0.1)
    assert K.rate_range("hidden", {"hidden": (0.05, 0.15, 0.05)}).default == 0.05
    with pytest.raises(ValueError, match=r"rate_ranges\['hidden'\]: got low=0.5, high=0.1, default=0.3; "
                                         r"expected 0 <= low <= default <= high < 1"):
        K.rate_range("hidden", {"hidden": (0.5, 0.1)})
    with pytest.raises(ValueError, match=r"rate_ranges\['conv'\]: got 'wide', expected \(low, high\)"):
        K.rate_range("conv", {"conv": "wide"})


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
