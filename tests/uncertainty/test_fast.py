"""The ``auto`` strategy (regfw.uncertainty.fast): trace, split, replay, fall back, cache."""
from __future__ import annotations

import gc
import warnings
import weakref

import pytest
import torch
import torch.fx as fx
import torch.nn.functional as F
from noise_floor import batch_noise_floor, far_above_floor
from torch import nn

from regfw.layers.base import StochasticModule
from regfw.layers.drop_path import DropPath
from regfw.placement.surgery import attach
from regfw.uncertainty import STRATEGIES, eval_mode, fast, mc_mode, mc_predict, resolve_strategy
from regfw.uncertainty.fast import split_model

pytestmark = pytest.mark.usefixtures("one_thread")


# --------------------------------------------------------------------------- models


def injected_mlp() -> nn.Sequential:
    """An MLP with dropout inserted the way regfw does it: children run from forward hooks."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 4))
    attach(model, "0", "regfw_input_dropout", nn.Dropout(0.2), "before")
    attach(model, "3", "regfw_dropout", nn.Dropout(0.5), "after")
    return model.eval()


class Block(nn.Module):
    """A residual block, ``relu(x + drop_path(branch(x)))``, with in-place ReLUs as torchvision has."""

    def __init__(self, c: int, p: float) -> None:
        super().__init__()
        self.c1, self.b1 = nn.Conv2d(c, c, 3, padding=1), nn.BatchNorm2d(c)
        self.c2, self.b2 = nn.Conv2d(c, c, 3, padding=1), nn.BatchNorm2d(c)
        self.relu = nn.ReLU(inplace=True)
        self.drop_path = DropPath(p) if p else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.b2(self.c2(self.relu(self.b1(self.c1(x)))))
        return F.relu(x + self.drop_path(out), inplace=True)


class ResNet(nn.Module):
    """Four blocks, DropPath in the last two, dropout in the head; one dropout module used twice."""

    def __init__(self, p: float, head_p: float) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.blocks = nn.Sequential(Block(8, 0), Block(8, 0), Block(8, p), Block(8, p))
        self.fc1, self.fc2 = nn.Linear(8, 16), nn.Linear(16, 5)
        self.drop = nn.Dropout(head_p)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.blocks(self.stem(x))
        h = self.drop(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))
        return self.fc2(self.drop(F.relu(self.fc1(h))))


def resnet(p: float = 0.5, head_p: float = 0.1) -> ResNet:
    torch.manual_seed(0)
    model = ResNet(p, head_p)
    for m in model.modules():  # non-trivial BatchNorm statistics, which MC dropout must keep
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.2, 0.2)
            m.running_var.uniform_(0.5, 1.5)
    return model.eval()


class DropConnectLinear(StochasticModule):
    """A linear layer with one weight mask per call, shared by the whole batch (DropConnect)."""

    def __init__(self, n_in: int, n_out: int, p: float = 0.5) -> None:
        super().__init__()
        self.p = p
        self.linear = nn.Linear(n_in, n_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = F.dropout(self.linear.weight, self.p, self.training)
        return F.linear(x, w, self.linear.bias)


def samples(model: nn.Module, x: torch.Tensor, strategy: str, t: int, seed: int = 0, **kw) -> torch.Tensor:
    """The raw MC outputs; ``auto`` always through its split (``choose=False``: these tests are about the
    split, not about whether it beats ``batched`` on a tiny model, tests/uncertainty/test_auto_choice.py)."""
    if strategy == "auto":
        kw.setdefault("choose", False)
    return mc_predict(model, x, t, strategy=strategy, seed=seed, deterministic=False, **kw).outputs


def same_distribution(a: torch.Tensor, b: torch.Tensor, floor: float) -> bool:
    """Per output element: means agree within 4.5 standard errors and the standard deviations
    within 10% on average (``a``, ``b``: ``[T, ...]`` independent samples), once the standard errors
    are asserted 100x above ``floor``, the floating-point noise between the batch sizes that drew them.

    With 15 elements, the chance that the mean check fails for equal distributions is about
    1e-4 (|z| > 4.5 has probability 7e-6 per element); the std ratio has a standard error of
    about 1/sqrt(2T) = 2.2% per element at T = 1000, less averaged over the elements.
    """
    t = a.shape[0]
    se = ((a.var(0) + b.var(0)) / t).sqrt()
    far_above_floor(se, floor, "the standard error of the sample means")
    z = ((a.mean(0) - b.mean(0)) / se).abs().max().item()
    ratio = (a.std(0) / b.std(0).clamp_min(1e-12)).mean().item()
    return z < 4.5 and abs(ratio - 1) < 0.1


#: Same masks, other batch sizes: values agree within this many floating-point noise floors
#: (a dropout mask scales what follows it by up to 1 / (1 - p), and its sums differ from the eval pass's).
KERNEL_NOISE_FLOORS = 10


def agree_up_to_kernel_noise(a: torch.Tensor, b: torch.Tensor, floor: float) -> None:
    """``a`` and ``b`` (``[T, B, ...]`` samples drawn with the same masks at different batch sizes) agree
    within :data:`KERNEL_NOISE_FLOORS` noise floors, while their spread over the samples is 100x above the
    floor for 90% of the entries (one that every mask dropped has none): a wrong mask moves values by about
    the spread, which the tolerance cannot hide."""
    far_above_floor(a.std(0), floor, "the spread of the samples", share=0.9)
    diff = float((a - b).detach().abs().max())
    assert diff <= KERNEL_NOISE_FLOORS * floor, (
        f"same masks, values {diff:.2g} apart: more than {KERNEL_NOISE_FLOORS} x the floating-point noise "
        f"floor {floor:.2g} between the batch sizes")


# --------------------------------------------------------------------------- registration, tracing


def test_auto_is_the_registered_fast_strategy():
    assert resolve_strategy("auto") == "auto"
    assert STRATEGIES["auto"] is fast.fast_strategy
    result = mc_predict(injected_mlp(), torch.randn(4, 8), samples=3, seed=0)
    assert result.strategy == "auto"


def test_trace_sees_injected_dropout_and_reproduces_the_model():
    model = injected_mlp()
    x = torch.randn(5, 8)
    # plain fx keeps nn.Linear / nn.ReLU whole and never sees their hooks, nor the dropout
    plain = [str(n.target) for n in fx.symbolic_trace(model).graph.nodes]
    assert not any("regfw" in t for t in plain)
    split = split_model(model, x)
    assert split.ok and split.mode == "rows"
    targets = split.node_targets()
    assert "m.0.regfw_input_dropout" in targets and "m.3.regfw_dropout" in targets
    assert targets.index("m.0.regfw_input_dropout") < targets.index("m.0")  # ApplyBefore
    assert targets.index("m.3") < targets.index("m.3.regfw_dropout") < targets.index("m.4")  # ApplyAfter
    assert sorted(split.source_targets) == ["m.0.regfw_input_dropout", "m.3.regfw_dropout"]
    with torch.no_grad(), eval_mode(model):
        assert torch.equal(split.graph_forward(model, x), model(x))


def test_lstm_tuple_output_with_injected_dropout_is_traced():
    class LSTMNet(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.rnn = nn.LSTM(4, 6, batch_first=True)
            self.head = nn.Linear(6, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            out, _ = self.rnn(x)
            return self.head(out[:, -1])

    torch.manual_seed(0)
    model = LSTMNet().eval()
    attach(model, "rnn", "regfw_dropout", nn.Dropout(0.3), "after")  # ApplyAfter on (output, state)
    x = torch.randn(5, 7, 4)
    split = split_model(model, x)
    assert split.ok and split.source_targets == ["m.rnn.regfw_dropout"]
    replayed = [n.target for n in split.replay if n.op == "call_module"]
    assert replayed == ["m.rnn.regfw_dropout", "m.head"]  # the LSTM runs once
    with torch.no_grad(), eval_mode(model):
        assert torch.equal(split.graph_forward(model, x), model(x))


# --------------------------------------------------------------------------- correctness


def test_single_dropout_same_values_as_loop():
    """Same seed, same masks: the replay rows are sample-major (row t * B + b), and a dropout
    mask over T x B rows is filled from the generator in order, i.e. it is the T masks that
    ``loop`` draws one pass after another, concatenated. With dropout last, the outputs are
    bitwise equal, also when the replay is cut into chunks that straddle samples."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 12), nn.ReLU(), nn.Linear(12, 4), nn.Dropout(0.5)).eval()
    x = torch.randn(5, 6)
    ref = samples(model, x, "loop", 20, seed=3)
    assert torch.equal(samples(model, x, "auto", 20, seed=3), ref)
    assert torch.equal(samples(model, x, "auto", 20, seed=3, chunk_rows=7), ref)
    run = split_model(model, x).last_run
    assert (run.chunks, run.chunk_rows) == (15, 7)  # 100 rows in chunks of at most 7
    assert not torch.equal(samples(model, x, "auto", 20, seed=4), ref)


def test_head_dropout_then_linear_matches_loop():
    """Dropout followed by a Linear: same masks, and the Linear then runs on T x B rows instead
    of B rows, so results may differ in the last bits (different matmul blocking): within a few
    floating-point noise floors between batch B and T x B, measured on the model."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 12), nn.ReLU(), nn.Dropout(0.5), nn.Linear(12, 4)).eval()
    x = torch.randn(5, 6)
    a, b = samples(model, x, "auto", 30, seed=1), samples(model, x, "loop", 30, seed=1)
    agree_up_to_kernel_noise(a, b, batch_noise_floor(model, x, rows=30 * 5))
    split = split_model(model, x)
    assert [n.target for n in split.replay] == ["m.2", "m.3"]


def test_resnet_droppath_same_distribution_as_loop():
    """Skip connections, two DropPath blocks and one dropout module called twice: the split runs
    in rows mode and its samples have the distribution of ``loop``'s (1000 samples each)."""
    model = resnet()
    x = torch.randn(3, 3, 4, 4, generator=torch.Generator().manual_seed(0))
    split = split_model(model, x)
    assert split.ok and split.mode == "rows", split.describe()
    auto = samples(model, x, "auto", 1000, seed=0)
    loop = samples(model, x, "loop", 1000, seed=1)
    floor = batch_noise_floor(model, x, rows=1000 * 3)  # loop: 3 rows a pass; auto's replay: 3000
    assert same_distribution(auto, loop, floor)
    # the check has power: samples without DropPath's randomness (what a split that computed
    # DropPath once for all samples would come close to) fail it (their std is about 25% lower)
    without = samples(resnet(p=0.0), x, "batched", 1000, seed=2)
    assert not same_distribution(auto, without, floor)


def test_resnet_reuses_everything_before_the_first_droppath():
    model = resnet()
    split = split_model(model, torch.randn(3, 3, 4, 4))
    replayed = {n.target for n in split.replay if n.op == "call_module"}
    computed_once = {"m.stem", "m.blocks.0.c1", "m.blocks.1.c2", "m.blocks.2.c1", "m.blocks.2.c2", "m.blocks.2.b2"}
    assert not computed_once & replayed  # including the residual branch of the first DropPath block
    assert {"m.blocks.2.drop_path", "m.blocks.3.c1", "m.blocks.3.drop_path", "m.fc1", "m.fc2", "m.drop"} <= replayed


def test_inplace_write_after_a_replayed_read_is_replayed():
    """``d = drop(a); a.relu_()``: the prefix must not apply relu_ before the replay reads ``a``."""

    class ReadThenWrite(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc, self.drop = nn.Linear(4, 4), nn.Dropout(0.5)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            a = self.fc(x)
            d = self.drop(a)
            a.relu_()
            return d + a

    torch.manual_seed(0)
    model = ReadThenWrite().eval()
    x = torch.randn(5, 4)
    assert ".relu_" in [f".{n.target}" for n in split_model(model, x).replay]
    assert torch.equal(samples(model, x, "auto", 10), samples(model, x, "loop", 10))


def test_rows_that_mix_are_replayed_per_sample():
    class Centred(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc, self.drop = nn.Linear(4, 4), nn.Dropout(0.5)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = self.drop(self.fc(x))
            return h - h.mean(0, keepdim=True)  # mixes the rows of the batch

    torch.manual_seed(0)
    model = Centred().eval()
    x = torch.randn(5, 4)
    split = split_model(model, x)
    assert split.mode == "samples" and "mixes batch rows" in split.mode_reason
    assert torch.equal(samples(model, x, "auto", 10), samples(model, x, "loop", 10))


def test_batch_shared_mask_is_replayed_per_sample():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), DropConnectLinear(8, 3)).eval()
    x = torch.randn(5, 6)
    split = split_model(model, x)
    assert split.mode == "samples" and "one random mask for the whole batch" in split.mode_reason
    out = samples(model, x, "auto", 20)
    assert torch.equal(out, samples(model, x, "loop", 20))
    assert out.std(0).min() > 0  # the samples of one input differ


# --------------------------------------------------------------------------- fallback


def test_untraceable_model_falls_back_to_batched_with_one_warning():
    class DataDependent(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc, self.drop = nn.Linear(4, 4), nn.Dropout(0.5)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            if x.sum() > 0:  # control flow on a tensor value: fx cannot trace it
                x = x * 2
            return self.drop(self.fc(x))

    torch.manual_seed(0)
    model = DataDependent().eval()
    x = torch.randn(5, 4)
    why = (r"uses 'batched' for this DataDependent: torch.fx cannot trace it: TraceError: .*; "
           r"torch.export cannot capture it either \(GuardOnDataDependentSymNode: ")
    with pytest.warns(RuntimeWarning, match=why):
        first = samples(model, x, "auto", 10)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        second = samples(model, x, "auto", 10)
    assert torch.equal(first, second)
    assert torch.equal(first, samples(model, x, "batched", 10))


def test_stochastic_call_hidden_in_a_foreign_hook_falls_back():
    class Hidden(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc, self.drop = nn.Linear(4, 4), nn.Dropout(0.5)
            self.fc.register_forward_hook(lambda module, args, out: self.drop(out))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc(x)

    model = Hidden().eval()
    split = split_model(model, torch.randn(5, 4))
    assert split.fallback == (
        "stochastic module 'drop' is called inside 'm.fc', where the split cannot see it "
        "(from a hook that is not regfw's, or from a leaf module's forward)"
    )
    with pytest.warns(RuntimeWarning, match="called inside 'm.fc'"):
        samples(model, torch.randn(5, 4), "auto", 4)


# --------------------------------------------------------------------------- cache, memory


def test_split_is_cached_and_structural_changes_invalidate_it():
    model = injected_mlp()
    x = torch.randn(5, 8)
    first = split_model(model, x)
    assert split_model(model, torch.randn(7, 8)) is first  # same signature, another batch
    attach(model, "1", "regfw_dropout", nn.Dropout(0.5), "after")
    second = split_model(model, x)
    assert second is not first and "m.1.regfw_dropout" in second.source_targets
    model[1].regfw_dropout.p = 0.0  # a rate set to 0: no longer stochastic
    third = split_model(model, x)
    assert third is not second and "m.1.regfw_dropout" not in third.source_targets
    assert split_model(model, x) is third


def test_cache_does_not_keep_the_model_alive():
    model = injected_mlp()
    split_model(model, torch.randn(5, 8))
    ref = weakref.ref(model)
    del model
    gc.collect()
    assert ref() is None


def test_budget_chunks_replay_and_prefix_without_changing_values():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 8),
                          nn.Dropout(0.5)).eval()
    x = torch.randn(40, 16)
    ref = samples(model, x, "auto", 10, budget_bytes=None)
    split = split_model(model, x)
    assert split.last_run.chunks == 1 and split.last_run.prefix_chunks == 1
    budget = 8 * 1024
    chunked = samples(model, x, "auto", 10, budget_bytes=budget)
    run = split.last_run
    assert run.chunks > 1 and run.prefix_chunks > 1
    assert run.planned_peak_bytes <= budget
    # the same masks; the prefix ran in chunks of fewer rows than 40, so its sums may differ in the last bits
    parts = {-(-40 // run.prefix_chunks), 40 // run.prefix_chunks}
    agree_up_to_kernel_noise(chunked, ref, batch_noise_floor(model, x, rows=parts))
    assert torch.equal(ref, samples(model, x, "loop", 10))


def test_batch_size_read_by_prefix_and_replay_is_recomputed_for_the_rows():
    """``b = x.shape[0]`` is ``B`` in the prefix but must be the chunk's rows in the replay."""

    class SizeReader(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc, self.drop, self.out = nn.Linear(8, 8), nn.Dropout(0.5), nn.Linear(4, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            b = x.shape[0]
            h = self.drop(self.fc(x.view(b, -1)))
            return self.out(h.view(b, 2, 4).sum(1))

    torch.manual_seed(0)
    model = SizeReader().eval()
    x = torch.randn(5, 2, 4)
    split = split_model(model, x)
    assert split.mode == "rows" and "m.fc" in [n.target for n in split._prefix]
    a, b = samples(model, x, "auto", 12, chunk_rows=7), samples(model, x, "loop", 12)
    agree_up_to_kernel_noise(a, b, batch_noise_floor(model, x, rows=(7, 12 * 5)))


def test_random_functions_in_forward_are_stochastic_sources():
    class Noisy(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc, self.out = nn.Linear(4, 6), nn.Linear(6, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = self.fc(x)
            return self.out(h * (torch.rand_like(h) > 0.3))

    torch.manual_seed(0)
    model = Noisy().eval()
    x = torch.randn(5, 4)
    with mc_mode(model, []):
        split = split_model(model, x)
        assert split.source_targets == ["rand_like"] and split.mode == "rows"
        assert [n.target for n in split._prefix] == ["m.fc"]
        torch.manual_seed(1)
        a = STRATEGIES["auto"](model, x, 10, choose=False)
        torch.manual_seed(1)
        b = STRATEGIES["loop"](model, x, 10)
    # the model is random in eval mode too: the floor of its layers without the random function
    agree_up_to_kernel_noise(a, b, batch_noise_floor(nn.Sequential(model.fc, model.out), x, rows=10 * 5))


class PooledHead(nn.Module):
    """A small CNN whose own ``forward`` drops its pooled features functionally before the classifier, as
    timm's models do with ``drop_rate`` (``F.dropout`` in ``forward_head``): the model itself is the host.
    ``more_flag``: its forward reads its ``training`` flag for something besides the dropout too."""

    def __init__(self, drop_rate: float = 0.3, more_flag: bool = False) -> None:
        super().__init__()
        self.drop_rate, self.more_flag = drop_rate, more_flag
        self.calls = 0  # counted by the forward, as some models do
        self.features = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 16, 3, padding=1),
                                      nn.ReLU())
        self.fc = nn.Linear(16, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        h = self.features(x).mean((2, 3))
        if self.more_flag and self.training:
            h = h * 2
        return self.fc(F.dropout(h, p=self.drop_rate, training=self.training))


def pooled_head(**kw) -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    return PooledHead(**kw).eval(), torch.randn(6, 3, 8, 8, generator=torch.Generator().manual_seed(1))


def test_a_models_own_functional_dropout_is_traced_through_and_what_comes_before_it_is_computed_once():
    model, x = pooled_head()
    auto, batched = samples(model, x, "auto", 1000), samples(model, x, "batched", 1000)
    split = split_model(model, x)
    assert split.ok and split.source_targets == ["dropout"] and split.mode == "rows"
    # the convolutions and the pooling run once, not once per sample
    assert split.deterministic_names == ["m_features_0", "m_features_1", "m_features_2", "m_features_3", "mean"]
    assert split.replay_names == ["m_training", "dropout", "m_fc"]  # the model's flag is read as the replay runs
    assert same_distribution(auto, batched, batch_noise_floor(model, x, rows=1000 * 6))
    assert not model.training  # every flag restored
    # the eval output from the same prefix is the model's: the dropout call reads the model's flag when it runs
    det = mc_predict(model, x, 5, strategy="auto", choose=False, seed=0, deterministic=True).deterministic
    with torch.no_grad():
        torch.testing.assert_close(det, model(x), rtol=0, atol=1e-6)


def test_a_changed_functional_rate_makes_a_new_split_with_it():
    model, x = pooled_head()
    low = samples(model, x, "auto", 400)
    first = split_model(model, x)
    model.drop_rate = 0.7
    high = samples(model, x, "auto", 400)
    second = split_model(model, x)
    assert second is not first and [n.kwargs["p"] for n in second.sources] == [0.7]
    assert float(high.std(0).mean()) > 1.5 * float(low.std(0).mean())
    samples(model, x, "batched", 3)  # the forward counts its calls: an int the graph does not hold
    assert split_model(model, x) is second


def test_a_host_that_reads_its_flag_for_more_than_its_dropout_is_called_whole():
    model, x = pooled_head(more_flag=True)
    auto, batched = samples(model, x, "auto", 1000), samples(model, x, "batched", 1000)
    split = split_model(model, x)
    # traced through, the eval probe would take the training branch: the model is one stochastic call instead
    assert split.ok and split.source_targets == ["m"]
    assert same_distribution(auto, batched, batch_noise_floor(model, x, rows=1000 * 6))


# --------------------------------------------------------------------------- mixed mask kinds


class AWDLSTM(nn.Module):
    """Embedding -> 2 LSTMs -> Linear on the last step: the AWD-LSTM shape, small."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(20, 8)
        self.lstm1 = nn.LSTM(8, 8, batch_first=True)
        self.lstm2 = nn.LSTM(8, 8, batch_first=True)
        self.out = nn.Linear(8, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, _ = self.lstm1(self.emb(x))
        h, _ = self.lstm2(h)
        return self.out(h[:, -1])


def test_weight_masks_with_locked_dropout_are_drawn_per_sample_under_auto():
    """dropconnect + locked_dropout (AWD-LSTM): the LSTM's hooks draw a per-row locked mask and a
    batch-shared weight mask in one node. ``auto`` must draw one weight mask per sample and LSTM,
    as ``loop`` does, and sample the same distribution: per entry of the mean probabilities, a
    two-sample z-test against ``loop`` (T = 400 each) with |z| < 4.5 for all 30 entries (chance of
    a false failure about 2e-4), and spreads within 15%."""
    from regfw.layers import LockedDropout, WeightDrop, apply_weight_drop

    torch.manual_seed(0)
    model = AWDLSTM()
    for name in ("lstm1", "lstm2"):
        apply_weight_drop(getattr(model, name), 0.5)
        attach(model, name, "regfw_locked_dropout", LockedDropout(0.3), "after")
    model.eval()
    x = torch.randint(0, 20, (6, 7), generator=torch.Generator().manual_seed(1))
    calls = [0]
    for m in model.modules():
        if isinstance(m, WeightDrop):
            m.register_forward_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    t = 400
    split = split_model(model, x)
    assert split.mode == "samples" and "batch_shared" in split.mode_reason
    auto = mc_predict(model, x, t, strategy="auto", seed=0, deterministic=False, choose=False)
    assert calls[0] == 2 * t  # one weight mask per LSTM and sample
    loop = mc_predict(model, x, t, strategy="loop", seed=1, deterministic=False)
    a, b = auto.probs.double(), loop.probs.double()
    se = ((a.var(0) + b.var(0)) / t).sqrt()
    floor = batch_noise_floor(model, x, rows=t * 6, quantity=lambda out: torch.softmax(out, -1))
    far_above_floor(se, floor, "the standard error of the mean probabilities")
    z = ((a.mean(0) - b.mean(0)) / se).abs()
    assert z.max() < 4.5, z.max()
    ratio = (a.std(0) / b.std(0)).mean().item()
    assert abs(ratio - 1) < 0.15, ratio


# --------------------------------------------------------------------------- deterministic output


@pytest.mark.parametrize("make", [injected_mlp, resnet], ids=["mlp", "resnet"])
def test_deterministic_output_comes_from_the_prefix_and_leaves_the_samples_alone(make):
    """Under ``auto`` the eval-mode prediction is the suffix run once on the cached prefix: equal to
    a separate eval pass, with the very samples of a call without it, and no second prefix pass."""
    model = make()
    x = torch.randn(6, 8) if make is injected_mlp else torch.randn(6, 3, 8, 8)
    with torch.no_grad(), eval_mode(model):
        expected = model(x)
    with_det = mc_predict(model, x, 7, strategy="auto", seed=3, choose=False)
    without = mc_predict(model, x, 7, strategy="auto", seed=3, deterministic=False, choose=False)
    assert torch.allclose(with_det.deterministic, expected, atol=1e-6, rtol=1e-5)
    assert torch.equal(with_det.outputs, without.outputs)
    if make is injected_mlp:
        return  # input dropout: nothing before it to reuse
    first = model.stem  # computed once, in the prefix
    calls = [0]
    handle = first.register_forward_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    try:
        split_model(model, x)  # the hook changes the fingerprint: analyse again outside the count
        mc_predict(model, x, 7, strategy="auto", seed=3, choose=False)
        calls[0] = 0
        mc_predict(model, x, 7, strategy="auto", seed=3, choose=False)
    finally:
        handle.remove()
    assert calls[0] == 1  # the first layer ran once: the deterministic output reused the prefix
