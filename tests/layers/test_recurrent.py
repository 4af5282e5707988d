"""LockedDropout and weight drop, including the AWD-LSTM / fastai failure modes."""
from __future__ import annotations

import copy
import io
import math
import warnings

import pytest
import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from regfw.layers import LockedDropout, WeightDrop, apply_weight_drop, locked_dropout, remove_weight_drop
from regfw.layers.recurrent import drop_connect


# ---------------------------------------------------------------- LockedDropout
@pytest.mark.parametrize("batch_first", [True, False])
def test_locked_mask_is_constant_over_time(batch_first):
    torch.manual_seed(0)
    p, batch, steps, feat = 0.4, 64, 20, 32
    shape = (batch, steps, feat) if batch_first else (steps, batch, feat)
    out = LockedDropout(p, batch_first=batch_first).train()(torch.ones(shape))
    time_dim = 1 if batch_first else 0
    first = out.select(time_dim, 0).unsqueeze(time_dim)
    assert torch.equal(out, first.expand_as(out))  # the same mask at every step
    mask = first.squeeze(time_dim)  # (batch, feat)
    kept = mask[mask != 0]
    assert torch.allclose(kept, torch.full_like(kept, 1 / (1 - p)))
    assert abs((mask == 0).float().mean().item() - p) < 5 * math.sqrt(p * (1 - p) / mask.numel())
    assert not torch.equal(mask[0], mask[1])  # each sequence draws its own mask


def test_locked_batch_first_flag_decides_which_dimension_is_time():
    torch.manual_seed(0)
    x = torch.ones(8, 8, 16)
    bf = locked_dropout(x, 0.5, batch_first=True)
    assert torch.equal(bf, bf[:, :1].expand_as(bf)) and not torch.equal(bf, bf[:1].expand_as(bf))
    tf = locked_dropout(x, 0.5, batch_first=False)
    assert torch.equal(tf, tf[:1].expand_as(tf)) and not torch.equal(tf, tf[:, :1].expand_as(tf))


def test_locked_unbatched_sequence():
    torch.manual_seed(0)
    out = locked_dropout(torch.ones(10, 32), 0.5)
    assert torch.equal(out, out[:1].expand_as(out))


def test_locked_packed_sequence_and_lstm_output_tuple():
    torch.manual_seed(0)
    lengths = [5, 2, 4]
    padded = torch.ones(3, 5, 16)
    packed = pack_padded_sequence(padded, lengths, batch_first=True, enforce_sorted=False)
    out = LockedDropout(0.5).train()(packed)
    assert type(out) is type(packed) and torch.equal(out.batch_sizes, packed.batch_sizes)
    unpacked, out_lengths = pad_packed_sequence(out, batch_first=True)
    assert out_lengths.tolist() == lengths
    for i, n in enumerate(lengths):
        seq = unpacked[i, :n]
        assert torch.equal(seq, seq[:1].expand_as(seq))
    # nn.Sequential(LSTM, LockedDropout): the (output, (h, c)) tuple keeps its hidden state
    lstm = nn.LSTM(4, 6, batch_first=True)
    result = lstm(torch.randn(2, 7, 4))
    dropped = LockedDropout(0.5).train()(result)
    assert dropped[1] is result[1]
    ratio = dropped[0] / result[0]
    assert torch.allclose(ratio, ratio[:, :1].expand_as(ratio))


def test_locked_rejects_bad_shapes():
    with pytest.raises(ValueError, match="shape"):
        locked_dropout(torch.ones(5), 0.5)
    with pytest.raises(TypeError):
        locked_dropout([1.0, 2.0], 0.5)


def test_locked_eval_returns_packed_input_itself():
    packed = pack_padded_sequence(torch.ones(2, 3, 4), [3, 1], batch_first=True)
    assert LockedDropout(0.5).eval()(packed) is packed


# ---------------------------------------------------------------- weight drop
RNNS = [
    pytest.param(lambda: nn.LSTM(4, 8, num_layers=2, batch_first=True), id="lstm"),
    pytest.param(lambda: nn.GRU(4, 8, batch_first=True, bidirectional=True), id="gru-bidirectional"),
    pytest.param(lambda: nn.RNN(4, 8, num_layers=2, batch_first=True), id="rnn"),
]


def _run(rnn: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return rnn(x)[0]


@pytest.mark.parametrize("make", RNNS)
def test_state_dict_keys_and_parameter_count_are_unchanged(make):
    torch.manual_seed(0)
    plain = make()
    keys, count = list(plain.state_dict()), sum(p.numel() for p in plain.parameters())
    names = [n for n, _ in plain.named_parameters()]
    dropped = apply_weight_drop(plain, 0.5)
    assert dropped is plain
    assert list(dropped.state_dict()) == keys
    assert [n for n, _ in dropped.named_parameters()] == names
    assert sum(p.numel() for p in dropped.parameters()) == count
    assert isinstance(dropped.weight_drop, WeightDrop)
    assert set(dropped.weight_drop.weights) == {n for n in names if n.startswith("weight_hh")}


@pytest.mark.parametrize("make", RNNS)
def test_training_drops_weights_eval_matches_the_plain_rnn(make):
    torch.manual_seed(0)
    plain = make()
    dropped = apply_weight_drop(copy.deepcopy(plain), 0.5)
    x = torch.randn(3, 6, 4)
    dropped.eval()
    assert torch.equal(_run(dropped, x), _run(plain.eval(), x))
    dropped.train()
    a, b = _run(dropped, x), _run(dropped, x)
    assert not torch.equal(a, b)
    assert not torch.equal(a, _run(plain.train(), x))


def test_dropped_weight_is_used_exactly():
    # With the parameter's mask known (same seed), the forward equals a plain LSTM run on the dropped matrix.
    torch.manual_seed(0)
    lstm = nn.LSTM(3, 5, batch_first=True)
    ref = copy.deepcopy(lstm)
    apply_weight_drop(lstm, 0.5)
    raw = lstm.weight_hh_l0.detach().clone()
    x = torch.randn(2, 4, 3)
    torch.manual_seed(7)
    out = _run(lstm.train(), x)
    torch.manual_seed(7)
    with torch.no_grad():
        ref.weight_hh_l0.copy_(drop_connect(ref.weight_hh_l0, 0.5))  # the mask the hook draws
    assert torch.allclose(out, _run(ref, x))
    # and the registered parameter itself was not modified
    assert torch.equal(lstm.weight_hh_l0, raw)


@pytest.mark.parametrize("make", RNNS)
def test_gradient_reaches_the_raw_weight_through_the_mask(make):
    torch.manual_seed(0)
    rnn = apply_weight_drop(make(), 0.5).train()
    _run(rnn, torch.randn(3, 6, 4)).pow(2).sum().backward()
    grad = rnn.weight_hh_l0.grad
    assert grad is not None and grad.abs().sum() > 0
    zero_fraction = (grad == 0).float().mean().item()
    # dropped entries get no gradient: the zero fraction is p = 0.5 within 5 binomial standard errors
    assert abs(zero_fraction - 0.5) < 5 * (0.25 / grad.numel()) ** 0.5


def test_to_float64_leaves_no_stale_tensor():
    torch.manual_seed(0)
    lstm = apply_weight_drop(nn.LSTM(4, 8, batch_first=True), 0.5).train()
    x = torch.randn(2, 5, 4)
    _run(lstm, x)
    lstm.to(torch.float64)
    assert all(w.dtype == torch.float64 for w in lstm._flat_weights)
    out = _run(lstm, x.double())
    assert out.dtype == torch.float64
    out.sum().backward()
    assert lstm.weight_hh_l0.grad.dtype == torch.float64
    plain = copy.deepcopy(lstm)
    remove_weight_drop(plain)
    lstm.eval()
    assert torch.equal(_run(lstm, x.double()), _run(plain.eval(), x.double()))


def test_state_dict_round_trip_into_a_fresh_wrapped_module():
    torch.manual_seed(0)
    trained = apply_weight_drop(nn.LSTM(4, 8, num_layers=2, batch_first=True), 0.5).train()
    opt = torch.optim.SGD(trained.parameters(), lr=0.5)
    for _ in range(3):
        opt.zero_grad()
        _run(trained, torch.randn(3, 6, 4)).sum().backward()
        opt.step()
    state = trained.state_dict()
    fresh = apply_weight_drop(nn.LSTM(4, 8, num_layers=2, batch_first=True), 0.5)
    fresh.load_state_dict(state)  # strict
    plain = nn.LSTM(4, 8, num_layers=2, batch_first=True)
    plain.load_state_dict(state)  # the keys are the plain LSTM's
    x = torch.randn(3, 6, 4)
    expected = _run(trained.eval(), x)
    assert torch.equal(_run(fresh.eval(), x), expected)
    assert torch.equal(_run(plain.eval(), x), expected)


def test_no_warnings_and_flatten_parameters_works():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        lstm = apply_weight_drop(nn.LSTM(4, 8, batch_first=True), 0.3).train()
        lstm.flatten_parameters()
        _run(lstm, torch.randn(2, 5, 4)).sum().backward()
        lstm.flatten_parameters()
        lstm.eval()
        _run(lstm, torch.randn(2, 5, 4))


def test_flat_weights_are_restored_after_forward_even_on_error():
    lstm = apply_weight_drop(nn.LSTM(4, 8, batch_first=True), 0.5).train()
    _run(lstm, torch.randn(2, 5, 4))
    assert all(w is getattr(lstm, n) for w, n in zip(lstm._flat_weights, lstm._flat_weights_names, strict=True))
    with pytest.raises(RuntimeError):
        lstm(torch.randn(2, 5, 3))  # wrong feature size
    assert all(w is getattr(lstm, n) for w, n in zip(lstm._flat_weights, lstm._flat_weights_names, strict=True))


def test_applying_twice_updates_the_rate_without_duplicate_hooks_and_remove_undoes():
    lstm = nn.LSTM(4, 8)
    apply_weight_drop(lstm, 0.2)
    apply_weight_drop(lstm, 0.4)
    assert lstm.weight_drop.p == 0.4
    assert len(lstm._forward_pre_hooks) == 1 and len(lstm._forward_hooks) == 1
    remove_weight_drop(lstm)
    assert not hasattr(lstm, "weight_drop")
    assert len(lstm._forward_pre_hooks) == 0 and len(lstm._forward_hooks) == 0
    x = torch.randn(5, 2, 4)
    lstm.train()
    assert torch.equal(lstm(x)[0], lstm(x)[0])


def test_rate_lives_in_the_stochastic_child_and_mc_dropout_can_switch_it_on():
    torch.manual_seed(0)
    lstm = apply_weight_drop(nn.LSTM(4, 8, batch_first=True), 0.5).eval()
    x = torch.randn(2, 5, 4)
    assert torch.equal(_run(lstm, x), _run(lstm, x))
    lstm.weight_drop.train()  # what MC dropout does to StochasticModule instances
    assert not torch.equal(_run(lstm, x), _run(lstm, x))
    lstm.weight_drop.p = 0.0
    assert torch.equal(_run(lstm, x), _run(lstm, x))
    assert "WeightDrop(p=0.0, weights=['weight_hh_l0'])" in repr(lstm)


def test_selected_weights_only_and_validation():
    lstm = nn.LSTM(4, 8, num_layers=2)
    apply_weight_drop(lstm, 0.5, weights="weight_hh_l1")
    assert lstm.weight_drop.weights == ("weight_hh_l1",)
    with pytest.raises(ValueError, match="weight_hh_l5"):
        apply_weight_drop(nn.LSTM(4, 8), 0.5, weights=["weight_hh_l5"])
    with pytest.raises(TypeError, match="Linear"):
        apply_weight_drop(nn.Linear(3, 3), 0.5)
    with pytest.raises(ValueError, match="1.5"):
        apply_weight_drop(nn.LSTM(4, 8), 1.5)


def test_deepcopy_and_torch_save_keep_weight_drop():
    torch.manual_seed(0)
    lstm = apply_weight_drop(nn.LSTM(4, 8, batch_first=True), 0.5)
    buffer = io.BytesIO()
    torch.save(lstm, buffer)
    buffer.seek(0)
    for clone in (copy.deepcopy(lstm), torch.load(buffer, weights_only=False)):
        clone.train()
        x = torch.randn(2, 5, 4)
        assert not torch.equal(_run(clone, x), _run(clone, x))
        clone.eval()
        assert torch.equal(_run(clone, x), _run(lstm.eval(), x))
        assert clone.weight_hh_l0 is not lstm.weight_hh_l0


def test_functional_call_swapped_weights_are_still_dropped():
    # functional_call swaps entries of _parameters behind the RNN's back; the RNN then rebuilds its
    # weight list at the start of forward, which must not discard the dropped weights.
    torch.manual_seed(0)
    lstm = apply_weight_drop(nn.LSTM(4, 8, batch_first=True), 0.5)
    params = {k: v.detach().clone() + 0.1 for k, v in lstm.named_parameters()}
    x = torch.randn(2, 5, 4)
    deterministic = torch.func.functional_call(lstm.eval(), params, (x,))[0]
    assert not torch.equal(deterministic, _run(lstm, x))  # the swapped weights were used
    lstm.train()
    for _ in range(3):
        assert not torch.equal(torch.func.functional_call(lstm, params, (x,))[0], deterministic)
