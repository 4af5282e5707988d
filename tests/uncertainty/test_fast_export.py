"""The ``auto`` strategy on a graph ``torch.export`` captures: models ``torch.fx`` cannot trace (here: a
model taking keyword arguments and returning a dict, as Hugging Face models do), split on their random
operators, with every tensor of the dict following the batch rows."""
from __future__ import annotations

import random
import warnings

import pytest
import torch
import torch.nn.functional as F
from noise_floor import batch_noise_floor, far_above_floor
from torch import nn

from regfw.layers.base import StochasticModule
from regfw.layers.drop_path import DropPath
from regfw.uncertainty import mc_predict
from regfw.uncertainty.fast import analysis, split_model

T = 400
FALLBACK = "Monte Carlo strategy 'auto' uses 'batched'"


pytestmark = pytest.mark.usefixtures("one_thread")


class Tokens(nn.Module):
    """Embeddings, masked mean pooling (the mask decides which positions count), DropPath on a residual
    branch and dropout in the head; keyword inputs, a dict output holding ``logits``."""

    def __init__(self, p: float = 0.3) -> None:
        super().__init__()
        self.embed = nn.Embedding(20, 16)
        self.branch = nn.Linear(16, 16)
        self.drop_path = DropPath(0.2)
        self.fc = nn.Linear(16, 16)
        self.drop = nn.Dropout(p)
        self.head = nn.Linear(16, 3)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> dict[str, torch.Tensor]:
        h = self.embed(input_ids)
        h = h + self.drop_path(torch.tanh(self.branch(h)))
        mask = attention_mask[..., None].to(h.dtype)
        pooled = (h * mask).sum(1) / mask.sum(1)
        return {"logits": self.head(self.drop(F.relu(self.fc(pooled)))), "pooled": pooled}


def tokens(p: float = 0.3) -> Tokens:
    torch.manual_seed(0)
    return Tokens(p).eval()


def batch() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 20, (5, 6), generator=g)
    mask = torch.ones(5, 6, dtype=torch.long)
    mask[0, 3:] = 0  # one row padded: its mask must travel with its ids
    mask[2, 4:] = 0
    return {"input_ids": ids, "attention_mask": mask}


def sample(model: nn.Module, x: dict, strategy: str, **kw) -> torch.Tensor:
    if strategy == "auto":
        kw.setdefault("choose", False)  # the split itself, never the predicted choice of batched
    return mc_predict(model, x, T, strategy=strategy, seed=0, deterministic=False, **kw).outputs.double()


def test_a_model_fx_cannot_trace_is_split_on_the_graph_torch_export_captures():
    model, x = tokens(), batch()
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=FALLBACK)
        auto = sample(model, x, "auto")
    split = split_model(model, x)
    assert split.ok and split.capture == "torch.export", split.describe()
    assert split.capture_note == "the model returns dict, not one tensor"
    assert (split.last_run.samples, split.last_run.batch, split.last_run.prefix_chunks) == (T, 5, 1)
    # the embedding runs once; the residual branch's DropPath and what follows it, every sample
    once, replayed = split.deterministic_names, split.replay_names
    assert any(n.startswith("embedding") for n in once) and not any(n.startswith("embedding") for n in replayed)
    assert any(n.startswith("linear") for n in once)  # the branch's linear layer, before its DropPath
    assert len(split.sources) == 2, split.source_targets  # DropPath's mask and the head's dropout

    loop = sample(model, x, "loop")
    floor = batch_noise_floor(model, x, rows=T * 5)
    se = ((loop.var(0) + auto.var(0)) / T).sqrt()
    far_above_floor(se, floor, "the standard error of the MC means")
    z = ((loop.mean(0) - auto.mean(0)) / se).abs().max().item()
    assert z < 4.5, z
    ratio = (loop.std(0) / auto.std(0)).mean().item()
    assert abs(ratio - 1) < 0.1, ratio


def test_the_attention_mask_follows_its_rows():
    """Rows 0 and 1 get the same ids but different masks: were the mask not gathered with the rows
    (or taken from another row), their samples would be alike."""
    model, x = tokens(), batch()
    x["input_ids"][1] = x["input_ids"][0]
    auto = sample(model, x, "auto")
    with torch.no_grad():
        for row in (0, 1):
            one = {k: v[row:row + 1] for k, v in x.items()}
            model.eval()
            eval_out = model(**one)["logits"][0].double()
            # the dropouts are unbiased: the MC mean is the eval output within 5 standard errors
            se = auto[:, row].std(0) / T ** 0.5
            assert ((auto[:, row].mean(0) - eval_out).abs() / se).max() < 5
    assert (auto[:, 0].mean(0) - auto[:, 1].mean(0)).abs().max() > 10 * (auto[:, 0].std(0) / T ** 0.5).max()


def test_the_deterministic_output_of_a_captured_split_is_the_eval_output():
    model, x = tokens(), batch()
    result = mc_predict(model, x, 4, strategy="auto", seed=0, deterministic=True)
    with torch.no_grad():
        assert torch.equal(result.deterministic, model(**x)["logits"])


def test_a_new_rate_makes_a_new_capture():
    """A captured graph holds the rates as numbers: a rate changed after the capture gives a new split."""
    model, x = tokens(p=0.1), batch()
    low = sample(model, x, "auto").var(0).mean().item()
    first = split_model(model, x)
    model.drop.p = 0.6
    high = sample(model, x, "auto").var(0).mean().item()
    assert split_model(model, x) is not first
    assert high > 2 * low, (low, high)


class PythonRandom(StochasticModule):
    """Draws its randomness from Python's ``random``: a capture fixes it to one number."""

    def __init__(self, p: float) -> None:
        super().__init__()
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * (1 + self.p * random.random()) if self.training else x


def test_randomness_the_capture_cannot_see_is_not_split_and_the_reason_is_named():
    model = tokens()
    model.drop = PythonRandom(0.5)
    model.drop_path = nn.Identity()
    split = split_model(model, batch())
    assert not split.ok
    assert split.fallback == "stochastic module 'drop' draws nothing random in the graph torch.export captured"


def test_a_model_whose_input_shapes_keep_changing_is_captured_a_bounded_number_of_times(monkeypatch):
    """Each new sequence length needs a capture of its own (about a second each): past MAX_CAPTURES
    per model, a new length is sampled with batched, and the warning says why and what to do."""
    monkeypatch.setattr(analysis, "MAX_CAPTURES", 2)
    model, x = tokens(), batch()
    for length in (6, 5):
        assert split_model(model, {k: v[:, :length] for k, v in x.items()}).capture == "torch.export"
    with pytest.warns(RuntimeWarning, match=r"uses 'batched' for this Tokens: the model returns dict, not one tensor, "
                                            r"and its graph was captured with torch.export for 2 input shapes already"):
        mc_predict(model, {k: v[:, :4] for k, v in x.items()}, 4, strategy="auto", seed=0)
    assert split_model(model, {k: v[:, :6] for k, v in x.items()}).ok  # the captured lengths still split


class TokensTensor(Tokens):
    """The same model returning its logits tensor: ``torch.fx`` traces it, keyword inputs and all."""

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return super().forward(input_ids, attention_mask)["logits"]


def test_keyword_inputs_of_a_model_fx_traces_are_split_on_the_fx_graph():
    torch.manual_seed(0)
    model, x = TokensTensor().eval(), batch()
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=FALLBACK)
        auto = sample(model, x, "auto")
    split = split_model(model, x)
    assert split.ok and split.capture == "torch.fx" and split.capture_note is None, split.describe()
    assert split.source_targets == ["m.drop_path", "m.drop"]
    loop = sample(model, x, "loop")
    se = ((loop.var(0) + auto.var(0)) / T).sqrt()
    far_above_floor(se, batch_noise_floor(model, x, rows=T * 5), "the standard error of the MC means")
    assert ((loop.mean(0) - auto.mean(0)) / se).abs().max().item() < 4.5


class AutocastBlock(nn.Module):
    """A forward with an autocast region whose device comes from the input (as timm's EfficientViT
    attention has): ``torch.fx`` cannot trace it, and ``torch.export`` captures the region as a
    higher-order operator calling a subgraph of its own."""

    def __init__(self) -> None:
        super().__init__()
        self.inner = nn.Linear(8, 8)
        self.drop = nn.Dropout(0.3)
        self.head = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.autocast(device_type=x.device.type, enabled=False):
            h = torch.relu(self.inner(x))
        return self.head(self.drop(h))


def test_a_captured_graph_with_a_subgraph_of_its_own_is_split_and_agrees_with_loop():
    torch.manual_seed(0)
    model, x = AutocastBlock().eval(), torch.randn(5, 8)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=FALLBACK)
        auto = sample(model, x, "auto")
    split = split_model(model, x)
    assert split.ok and split.capture == "torch.export", split.describe()
    assert "torch.fx cannot trace it" in split.capture_note
    loop = sample(model, x, "loop")
    floor = batch_noise_floor(model, x, rows=T * 5)
    se = ((loop.var(0) + auto.var(0)) / T).sqrt()
    far_above_floor(se, floor, "the standard error of the MC means")
    assert ((loop.mean(0) - auto.mean(0)) / se).abs().max().item() < 4.5
