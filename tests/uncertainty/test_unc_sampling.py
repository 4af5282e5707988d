"""mc_predict, mc_mode, the strategies, error messages and RNG isolation."""
from __future__ import annotations

import importlib.util
import math

import pytest
import torch
from noise_floor import batch_noise_floor, far_above_floor
from torch import nn
from unc_helpers import make_mlp, train_plain

import regfw
from regfw.layers.base import StochasticModule
from regfw.registry.discovery import register_plugin, unregister_plugin
from regfw.uncertainty import (
    STRATEGIES,
    estimate_row_bytes,
    is_stochastic,
    mc_mode,
    mc_predict,
    register_strategy,
    resolve_strategy,
    sampling,
    split_mean_logvar,
    stochastic_modules,
)


class GaussianNoise(StochasticModule):
    """A custom stochastic layer: multiplicative Gaussian noise of std ``p`` in training."""

    def __init__(self, p: float) -> None:
        super().__init__()
        self.p = p

    def forward(self, x):
        return x * (1 + self.p * torch.randn_like(x)) if self.training else x


class PluginNoise(nn.Module):
    """Stochastic, but known only through the regfw_stochastic_types hook."""

    def forward(self, x):
        return x + torch.randn_like(x) if self.training else x


def small_net(p: float = 0.5) -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 32), nn.BatchNorm1d(32), nn.ReLU(), nn.Dropout(p), nn.Linear(32, 3))


def test_finds_every_dropout_family_module_and_skips_rate_zero():
    model = nn.Sequential(
        nn.Dropout(0.1), nn.Dropout1d(0.1), nn.Dropout2d(0.1), nn.Dropout3d(0.1),
        nn.AlphaDropout(0.1), nn.FeatureAlphaDropout(0.1), GaussianNoise(0.2),
        nn.Dropout(0.0), GaussianNoise(0.0), nn.Linear(2, 2), nn.BatchNorm1d(2),
    )
    found = [name for name, _ in stochastic_modules(model)]
    assert found == ["0", "1", "2", "3", "4", "5", "6"]
    assert not is_stochastic(model[7]) and not is_stochastic(model[8])


def test_finds_regularizer_layers_attached_as_children_and_called_from_hooks():
    fc1 = nn.Linear(4, 16)
    fc1.add_module("regfw_dropout", nn.Dropout(0.5))
    fc1.register_forward_hook(lambda mod, inp, out: mod.regfw_dropout(out))
    model = nn.Sequential(fc1, nn.ReLU(), nn.Linear(16, 2))
    assert [n for n, _ in stochastic_modules(model)] == ["0.regfw_dropout"]
    res = mc_predict(model, torch.randn(3, 4), samples=8, seed=0, strategy="loop")
    assert res.outputs.std(0).min() > 0  # the hooked dropout was on


def test_plugin_declared_types_via_hook():
    class Plugin:
        @regfw.hookimpl
        def regfw_stochastic_types(self):
            return [PluginNoise]

    model = nn.Sequential(nn.Linear(3, 3), PluginNoise())
    assert PluginNoise not in sampling.stochastic_types()
    register_plugin(Plugin(), "stochastic-types")  # into the process-wide plugin manager, as a plugin is
    try:
        assert [n for n, _ in stochastic_modules(model)] == ["1"]
        assert PluginNoise in sampling.stochastic_types()
    finally:
        unregister_plugin("stochastic-types")
    assert PluginNoise not in sampling.stochastic_types()


def test_mc_mode_keeps_batchnorm_in_eval_and_statistics_unchanged():
    model = small_net()
    model.train()
    model(torch.randn(16, 4))  # give BatchNorm non-trivial running statistics
    bn = model[1]
    before = {k: v.clone() for k, v in bn.state_dict().items()}
    with mc_mode(model) as on:
        assert on == [model[3]]
        assert model[3].training and not bn.training and not model.training
        model(torch.randn(16, 4))
    assert all(m.training for m in model.modules())  # restored
    res = mc_predict(model, torch.randn(10, 4), samples=5, seed=0)
    for k, v in bn.state_dict().items():
        assert torch.equal(v, before[k]), k  # running mean / var / num_batches_tracked
    assert res.outputs.shape == (5, 10, 3)


def test_mc_mode_restores_mixed_flags_after_an_exception():
    model = small_net()
    model.train()
    model[1].eval()
    model[3].eval()
    flags = [m.training for m in model.modules()]
    with pytest.raises(RuntimeError, match="boom"):
        with mc_mode(model):
            raise RuntimeError("boom")
    assert [m.training for m in model.modules()] == flags

    def failing(model, inputs, samples, *, budget_bytes, **kw):
        torch.rand(100)  # consume the forked RNG
        raise RuntimeError("strategy failed")

    register_strategy("failing", failing)
    try:
        x = torch.randn(2, 4)
        state = torch.get_rng_state()
        with pytest.raises(RuntimeError, match="strategy failed"):
            mc_predict(model, x, samples=3, strategy="failing", seed=1)
        assert torch.equal(state, torch.get_rng_state())
        assert [m.training for m in model.modules()] == flags
    finally:
        STRATEGIES.pop("failing")


def test_strategy_seam_runs_inside_mc_mode_and_the_rng_fork():
    seen = {}

    def probe(model, inputs, samples, *, budget_bytes, **kw):
        seen["flags"] = [m.training for m in model]
        seen["kw"] = kw
        seen["draw"] = torch.rand(1).item()
        return torch.stack([model(inputs) for _ in range(samples)])

    register_strategy("probe", probe)
    try:
        model = small_net()
        x = torch.randn(2, 4)
        state = torch.get_rng_state()
        mc_predict(model, x, samples=3, strategy="probe", seed=7, extra=1)
        assert torch.equal(state, torch.get_rng_state())
        assert seen["flags"] == [False, False, False, True, False]
        assert seen["kw"] == {"extra": 1}
        first = seen["draw"]
        mc_predict(model, x, samples=3, strategy="probe", seed=7)
        assert seen["draw"] == first  # the fork is seeded from `seed`
    finally:
        STRATEGIES.pop("probe")


def test_auto_resolves_to_batched_without_fast_module():
    name = resolve_strategy("auto")
    if importlib.util.find_spec("regfw.uncertainty.fast") is None:
        assert name == "batched"
    else:
        assert name == "auto"
    with pytest.raises(ValueError, match="strategy must be one of .*'nope'"):
        resolve_strategy("nope")


def test_loop_and_batched_sample_the_same_distribution():
    model = small_net().eval()
    x = torch.randn(4, 4, generator=torch.Generator().manual_seed(1))
    t = 1000
    a = mc_predict(model, x, samples=t, strategy="loop", seed=0, task="regression").outputs.double()
    b = mc_predict(model, x, samples=t, strategy="batched", seed=1, task="regression", chunk_rows=397).outputs.double()
    # means: difference within 5 standard errors (two-sample z-test per output, 12 outputs), each standard
    # error first asserted 100x above the floating-point noise between loop's 4 rows and batched's 397
    se = (a.var(0) / t + b.var(0) / t).sqrt()
    far_above_floor(se, batch_noise_floor(model, x, rows=397), "the standard error of the MC means")
    z = (a.mean(0) - b.mean(0)).abs() / se
    assert z.max() < 5, z
    # spreads: variance ratio within 25% (the standard error of a variance ratio at T=1000 is ~4.5%)
    ratio = a.var(0) / b.var(0)
    assert ratio.min() > 0.8 and ratio.max() < 1.25, ratio
    assert a.var(0).min() > 1e-4  # not degenerate: dropout was on


def test_batched_runs_cache_sized_chunks_on_a_cpu_as_the_split_does():
    from regfw.uncertainty.sampling import CPU_MIN_ROWS, chunk_rows_for

    model = small_net().eval()
    x = torch.randn(100, 4)
    sizes = []
    handle = model.register_forward_pre_hook(lambda m, inp: sizes.append(inp[0].shape[0]))
    try:
        mc_predict(model, x, samples=30, strategy="batched", seed=0, deterministic=False)
    finally:
        handle.remove()
    # the budget allows all 3000 rows at once; a CPU runs them in chunks of 1024 (tiny rows: 1 MiB is more)
    assert sizes[-3:] == [CPU_MIN_ROWS, CPU_MIN_ROWS, 3000 - 2 * CPU_MIN_ROWS]
    assert chunk_rows_for(3000, 4096, torch.device("cpu")) == CPU_MIN_ROWS  # big rows: never under 1024
    assert chunk_rows_for(50, 16, torch.device("cpu")) == 50  # never over what the budget allows
    assert chunk_rows_for(3000, 16, torch.device("meta")) == 3000  # the rule is the CPU's


def test_batched_respects_a_tiny_budget_by_chunking():
    model = small_net().eval()
    x = torch.randn(4, 4)
    row = estimate_row_bytes(model, x[:1])
    sizes = []
    handle = model.register_forward_pre_hook(lambda m, inp: sizes.append(inp[0].shape[0]))
    try:
        res = mc_predict(model, x, samples=5, strategy="batched", budget_bytes=3 * row + 1, seed=0, deterministic=False)
    finally:
        handle.remove()
    # one eval row (looking for F.dropout calls in a forward), one probe row, then 20 rows in chunks of at most 3
    assert sizes == [1, 1, 3, 3, 3, 3, 3, 3, 2]
    assert res.outputs.shape == (5, 4, 3)
    # a budget below one row still works, one row per pass
    sizes.clear()
    handle = model.register_forward_pre_hook(lambda m, inp: sizes.append(inp[0].shape[0]))
    try:
        mc_predict(model, x, samples=2, strategy="batched", budget_bytes=1, seed=0, deterministic=False)
    finally:
        handle.remove()
    assert sizes == [1] * 9


def test_batched_rows_are_sample_major():
    class Tag(nn.Module):
        """Returns its input plus a small dropout-dependent offset: row identity survives."""

        def __init__(self):
            super().__init__()
            self.drop = nn.Dropout(0.5)

        def forward(self, x):
            return x + 0.01 * self.drop(torch.ones_like(x))

    x = torch.arange(15.0).view(5, 3)
    res = mc_predict(Tag(), x, samples=4, strategy="batched", seed=0, chunk_rows=7, task="regression")
    assert res.outputs.shape == (4, 5, 3)
    assert (res.outputs - x).abs().max() <= 0.02 + 1e-6  # sample t of input b came from row b
    assert res.outputs.std(0).max() > 0


def test_seeds_reproduce_and_differ_and_no_grad():
    model = small_net().eval()
    x = torch.randn(6, 4)
    a = mc_predict(model, x, samples=4, seed=3)
    b = mc_predict(model, x, samples=4, seed=3)
    c = mc_predict(model, x, samples=4, seed=4)
    assert torch.equal(a.outputs, b.outputs) and not torch.equal(a.outputs, c.outputs)
    assert a.seed == 3 and not a.outputs.requires_grad
    state = torch.get_rng_state()
    d = mc_predict(model, x, samples=4)  # no seed: fresh masks, global RNG untouched
    assert torch.equal(state, torch.get_rng_state()) and isinstance(d.seed, int)
    g = torch.Generator().manual_seed(5)
    e1 = mc_predict(model, x, samples=4, generator=g).seed
    e2 = mc_predict(model, x, samples=4, generator=g).seed
    assert e1 != e2 and torch.equal(state, torch.get_rng_state())


def test_classification_result_fields():
    model = small_net().eval()
    res = mc_predict(model, torch.randn(5, 4), samples=6, seed=0)
    assert res.probs.shape == (6, 5, 3) and torch.allclose(res.probs.sum(-1), torch.ones(6, 5))
    assert torch.allclose(res.mean_probs, res.probs.mean(0))
    assert res.deterministic_probs.shape == (5, 3) and res.samples == 6
    for name in ("entropy", "mutual_information", "variation_ratio", "variance"):
        assert res.score(name).shape == (5,)


def test_heteroscedastic_regression_keeps_both_terms():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 16), nn.ReLU(), nn.Dropout(0.3), nn.Linear(16, 2))  # mean, log-variance
    res = mc_predict(model, torch.randn(7, 3), samples=10, seed=0, task="regression",
                     output_transform=split_mean_logvar)
    means, logvar = res.outputs[..., :1], res.outputs[..., 1:]
    assert torch.allclose(res.aleatoric, logvar.exp().mean(0))
    assert torch.allclose(res.epistemic, means.var(0, unbiased=False))
    assert torch.allclose(res.variance, logvar.exp().mean(0) + means.var(0, unbiased=False))
    assert res.epistemic.min() > 0


def test_error_no_stochastic_module():
    with pytest.raises(ValueError) as err:
        mc_predict(nn.Sequential(nn.Linear(3, 3), nn.BatchNorm1d(3)), torch.randn(2, 3))
    msg = str(err.value)
    assert "no dropout-family module" in msg and "regularizers: {dropout: {}}" in msg


def test_error_all_rates_zero():
    model = nn.Sequential(nn.Linear(3, 3), nn.Dropout(0.0), GaussianNoise(0.0))
    with pytest.raises(ValueError) as err:
        mc_predict(model, torch.randn(2, 3))
    msg = str(err.value)
    assert "all have rate p = 0" in msg and "regularizers: {dropout: {}}" in msg


@pytest.mark.parametrize("bad", [1, 0, -3, 2.5, True])
def test_error_too_few_samples(bad):
    with pytest.raises(ValueError, match=rf"samples must be an integer >= 2.*got samples={bad!r}"):
        mc_predict(small_net(), torch.randn(2, 4), samples=bad)


def test_error_bad_task_and_non_tensor_output():
    with pytest.raises(ValueError, match="task must be one of"):
        mc_predict(small_net(), torch.randn(2, 4), task="ranking")

    class TupleOut(nn.Module):
        def __init__(self):
            super().__init__()
            self.d = nn.Dropout(0.5)

        def forward(self, x):
            return self.d(x), x

    with pytest.raises(TypeError, match="split_mean_logvar"):
        mc_predict(TupleOut(), torch.randn(2, 4), strategy="loop")


def test_training_is_bit_identical_with_and_without_mc_predict_in_between(digits):
    xtr, ytr, xv, _ = digits
    xtr, ytr = xtr[:400], ytr[:400]
    seen = []

    def sample(model, epoch):
        for strategy in ("loop", "batched"):
            res = mc_predict(model, xv[:50], samples=5, strategy=strategy, seed=None)
            seen.append(res.outputs.std(0).mean().item())

    torch.manual_seed(1)
    plain = train_plain(make_mlp(p=0.5, batchnorm=True), xtr, ytr, epochs=3, seed=2)
    torch.manual_seed(1)
    mixed = train_plain(make_mlp(p=0.5, batchnorm=True), xtr, ytr, epochs=3, seed=2, between=sample)
    assert len(seen) == 6 and min(seen) > 0  # sampling really drew dropout masks
    for (name, a), b in zip(plain.state_dict().items(), mixed.state_dict().values(), strict=True):
        assert torch.equal(a, b), name  # weights and BatchNorm buffers, bit for bit
    assert not math.isnan(seen[0])


def test_attention_weight_dropout_is_sampled_and_zero_rate_is_not():
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(8, 2, dropout=0.0, batch_first=True)

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.attn = mha
            self.head = nn.Linear(8, 3)

        def forward(self, x):
            return self.head(self.attn(x, x, x, need_weights=False)[0].mean(1))

    net = Net().eval()
    assert stochastic_modules(net) == []
    mha.dropout = 0.3
    assert [name for name, _ in stochastic_modules(net)] == ["attn"]
    result = mc_predict(net, torch.randn(4, 5, 8), samples=8, strategy="loop", seed=0)
    assert result.outputs.std(0).max() > 0  # the attention weights were dropped differently per sample
    assert not mha.training  # mode restored


def test_batched_gives_distinct_samples_with_a_batch_shared_weight_mask():
    """Weight drop draws one mask per forward pass for the whole batch: repeating the batch T
    times in one pass would give T identical samples per row, so `batched` runs it per sample."""
    from regfw.layers import apply_weight_drop

    torch.manual_seed(0)
    rnn = nn.LSTM(4, 8, batch_first=True)
    apply_weight_drop(rnn, 0.5)

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.rnn, self.head = rnn, nn.Linear(8, 3)

        def forward(self, x):
            return self.head(self.rnn(x)[0][:, -1])

    net = Net().eval()
    x = torch.randn(5, 6, 4)
    for strategy in ("batched", "auto"):
        out = mc_predict(net, x, samples=6, strategy=strategy, seed=0,
                         **({"choose": False} if strategy == "auto" else {})).outputs
        assert out.std(0).min() > 0, strategy  # every row varies across the T samples


def test_training_and_mc_dropout_share_one_mean_variance_split():
    """The gaussian_nll loss and MC dropout's output transforms read a Gaussian head through one
    function (regfw.tensors.split_mean_variance): softplus for the loss, exp for log-variance heads."""
    import torch.nn.functional as F

    from regfw.tensors import split_mean_variance
    from regfw.train.losses import gaussian_nll, mc_output_transform

    out = torch.tensor([[0.5, -1.0, 2.0, -3.0]])
    mean, var = split_mean_variance(out)
    assert torch.equal(mean, out[:, :2])
    assert torch.allclose(var, F.softplus(out[:, 2:]) + 1e-6)
    assert mc_output_transform("gaussian_nll") is split_mean_variance  # what a fit hands MC dropout
    assert mc_output_transform("mse") is None
    target = torch.tensor([[0.0, 0.0]])
    assert torch.allclose(gaussian_nll(out, target), F.gaussian_nll_loss(mean, target, var))
    log_mean, log_var = split_mean_logvar(out)
    assert torch.equal(log_mean, mean) and torch.allclose(log_var, out[:, 2:].exp())
    with pytest.raises(ValueError, match="split_mean_variance needs an even last dimension .* got 3"):
        split_mean_logvar(torch.zeros(2, 3))
    with pytest.raises(ValueError, match="link must be one of softplus, exp, got 'relu'"):
        split_mean_variance(out, link="relu")
