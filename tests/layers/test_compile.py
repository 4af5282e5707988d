"""regfw's regularizers under ``torch.compile(model, fullgraph=True)``: one graph, random masks each step.

Every model here is regularized the way a user's is (a plan from the registry, applied with its
hooks and children) and compiled with ``fullgraph=True``, so any graph break in regfw's code is an
error. The backend is ``aot_eager``: Dynamo's capture and AOTAutograd's forward and backward graphs,
which is where graph breaks and untraceable code show, without TorchInductor's C++ build (seconds
per model on a small CPU). The seed tests compile with TorchInductor, to measure what a seed fixes
there (``docs/compile.md``).
Each compile counts its frames (:class:`torch._dynamo.testing.CompileCounterWithBackend`): no
recompilation from step to step (one graph, two where a layer reads its input size on its first
call), and one more graph for eval mode.
"""
from __future__ import annotations

import pytest
import torch
import torch._dynamo.testing
from regfw_plugins.noise import GaussianNoise
from torch import nn

from regfw.layers import ConcreteDropout, DropBlock2d, DropPath, GaussianDropout, apply_embedding_dropout
from regfw.layers import Dropout as StochasticDropout
from regfw.placement.plan import apply_plan, make_plan
from regfw.registry.regularizers import build_regularizers


class Residual(nn.Module):
    """Two residual blocks (``x + f(x)``): where drop_path goes."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Linear(16, 32)
        self.blocks = nn.ModuleList(nn.Sequential(nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 32)) for _ in range(2))
        self.head = nn.Linear(32, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        for block in self.blocks:
            x = x + block(x)
        return self.head(x)


class Tokens(nn.Module):
    """Embedding, GRU and a head: embedding dropout, locked dropout and weight drop."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(50, 16)
        self.rnn = nn.GRU(16, 16, batch_first=True)
        self.head = nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, _ = self.rnn(self.embed(x))
        return self.head(out[:, -1])


class Encoder(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        layer = nn.TransformerEncoderLayer(16, 2, 32, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, 1, enable_nested_tensor=False)
        self.head = nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(x).mean(1))


def mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 4))


def cnn() -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                         nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(8, 4))


VECTORS = torch.randn(8, 16, generator=torch.Generator().manual_seed(0))
IMAGES = torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(1))
IDS = torch.randint(0, 50, (4, 7), generator=torch.Generator().manual_seed(2))
SEQUENCES = torch.randn(4, 5, 16, generator=torch.Generator().manual_seed(3))

#: (regularizers section, model, input): every dropout-family regularizer, noise included.
CASES = {
    "dropout": ({"dropout": {}}, mlp, VECTORS),
    "dropout not inverted": ({"dropout": {"inverted": False}}, mlp, VECTORS),
    "gaussian_dropout": ({"gaussian_dropout": {}}, mlp, VECTORS),
    "alpha_dropout": ({"alpha_dropout": {}}, mlp, VECTORS),
    "concrete_dropout": ({"concrete_dropout": {}}, mlp, VECTORS),
    "noise": ({"noise": {"input_std": 0.1, "hidden_std": 0.1, "weight_std": 0.05}}, mlp, VECTORS),
    "spatial_dropout": ({"spatial_dropout": {}}, cnn, IMAGES),
    "dropblock": ({"dropblock": {}}, cnn, IMAGES),
    "drop_path": ({"drop_path": {}}, Residual, VECTORS),
    "embedding, locked dropout, dropconnect": (
        {"embedding_dropout": {}, "locked_dropout": {}, "dropconnect": {}}, Tokens, IDS),
    "attention_dropout": ({"attention_dropout": {}}, Encoder, SEQUENCES),
}


def regularized(section: dict, build, x: torch.Tensor) -> nn.Module:
    torch.manual_seed(0)
    model = build()
    regs = build_regularizers(section)
    plan = make_plan(model, regs, 1000, x)
    assert [row for row in plan.rows() if row.action != "note"], f"nothing planned for {section}"
    apply_plan(model, regs, plan)
    return model


def first(out):
    return out[0] if isinstance(out, tuple) else out


@pytest.mark.parametrize("case", list(CASES))
def test_trains_in_one_graph_with_new_masks_every_step_and_eval_equals_eager(case):
    section, build, x = CASES[case]
    model = regularized(section, build, x)
    counter = torch._dynamo.testing.CompileCounterWithBackend("aot_eager")
    torch._dynamo.reset()
    # nn.GRU is compiled only with allow_rnn (torch's default graph-breaks on RNNs, whatever regfw does)
    with torch._dynamo.config.patch(allow_rnn=True):
        compiled = torch.compile(model, backend=counter, fullgraph=True)
        model.train()
        steps = [compiled(x) for _ in range(2)]
        warm = counter.frame_count  # 2 for concrete dropout, which reads its input size on its first call
        steps += [compiled(x) for _ in range(2)]
        assert warm <= 2 and counter.frame_count == warm, f"{counter.frame_count} graphs for 4 training steps"
        steps[-1].square().mean().backward()
        assert all(p.grad is None or torch.isfinite(p.grad).all() for p in model.parameters())
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())
        # random every step: no mask baked into the graph as a constant
        assert all(not torch.equal(a, b) for a, b in zip(steps[:-1], steps[1:], strict=True))
        model.eval()
        with torch.no_grad():
            out = compiled(x)
            eager = model(x)
        assert counter.frame_count == warm + 1
    # eval runs the same operations in the same order: equal to float32 rounding
    torch.testing.assert_close(out, eager, rtol=1e-6, atol=1e-6)


def _seeded_pairs(fn, x: torch.Tensor) -> torch.Tensor:
    """Two calls of ``fn`` after ``torch.manual_seed(7)``, stacked."""
    torch.manual_seed(7)
    return torch.stack([fn(x) for _ in range(2)])


#: (layer, input, whether TorchInductor draws eager mode's numbers for one seed), measured with torch 2.13
#: on CPU and stated in docs/compile.md: regfw's Bernoulli masks are one operator of the graph
#: (``regfw::word_mask``) drawing eager's random words; ``normal_`` (Gaussian dropout) stays torch's
#: eager kernel; ``rand_like``/``randn_like`` (concrete dropout, noise) and ``nn.Dropout`` are generated
#: by TorchInductor itself, its own stream; DropBlock's sampler and embedding dropout's per-word draw are
#: one operator each (``regfw::block_mask``, ``regfw::word_keep``) running eager code.
SEED_CASES = {
    "regfw Dropout": (lambda: StochasticDropout(0.5), VECTORS, True),
    "GaussianDropout": (lambda: GaussianDropout(0.5), VECTORS, True),
    "GaussianNoise": (lambda: GaussianNoise(0.5), VECTORS, False),
    "ConcreteDropout": (lambda: ConcreteDropout(0.5), VECTORS, False),
    "DropBlock2d": (lambda: DropBlock2d(0.3, 3), IMAGES, True),
    "embedding dropout": (lambda: apply_embedding_dropout(nn.Embedding(50, 8), 0.5), IDS, True),
    "nn.Dropout": (lambda: nn.Dropout(0.5), VECTORS, False),
}


@pytest.mark.parametrize("case", list(SEED_CASES))
def test_what_a_seed_fixes_under_torchinductor(case):
    """``torch.manual_seed`` fixes every compiled mask and each call draws new ones; whether they are
    eager mode's masks for the same seed depends on who draws them (:data:`SEED_CASES`)."""
    build, x, same_as_eager = SEED_CASES[case]
    layer = build().train()
    torch._dynamo.reset()
    compiled = torch.compile(layer, fullgraph=True)  # TorchInductor
    with torch.no_grad():
        a, b, eager = _seeded_pairs(compiled, x), _seeded_pairs(compiled, x), _seeded_pairs(layer, x)
    assert torch.equal(a, b)  # one seed, the same compiled masks
    assert not torch.equal(a[0], a[1])  # new masks every call
    assert torch.equal(a, eager) is same_as_eager


def test_the_backward_of_a_compiled_word_mask_uses_the_forwards_mask():
    """``regfw::word_mask`` is tagged as a seeded random op, so TorchInductor saves the mask for the
    backward pass instead of recomputing it (which would draw another)."""
    layer = StochasticDropout(0.5).train()
    torch._dynamo.reset()
    compiled = torch.compile(layer, fullgraph=True)
    x = (VECTORS.abs() + 0.5).requires_grad_()
    out = compiled(x)
    out.sum().backward()
    kept = out != 0
    assert 0 < int(kept.sum()) < kept.numel()
    assert torch.equal(x.grad != 0, kept) and bool((x.grad[kept] == 2.0).all())


@pytest.mark.parametrize("layer", [StochasticDropout(0.3), DropPath(0.3), DropBlock2d(0.3, 3), nn.Dropout(0.3)],
                         ids=lambda m: type(m).__name__)
def test_a_new_rate_reaches_the_compiled_graph(layer):
    """A rate schedule assigns ``p``: the compiled model must use the new value (a rate is a constant of
    its graph, so each new value compiles a new one, as for torch's own ``nn.Dropout``)."""
    model = nn.Sequential(nn.Conv2d(3, 4, 3), layer).train()
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    with torch.no_grad():
        features = model[0](IMAGES)
        for p in (0.3, 0.0, 1.0, 0.5):
            layer.p = p
            out = compiled(IMAGES)
            if p == 0.0:
                torch.testing.assert_close(out, features, rtol=0, atol=0)
            elif p == 1.0:
                assert not out.any()
            else:  # some entries dropped, some kept
                assert 0 < int((out == 0).sum()) < out.numel()


def test_a_new_map_size_reaches_the_compiled_dropblock():
    """A second image size makes Dynamo recompile with symbolic sizes; DropBlock's seed rate is a
    constant of the map size, so the graph must specialise on it rather than fail to trace."""
    model = nn.Sequential(nn.Conv2d(3, 4, 3), DropBlock2d(0.3, 3)).train()
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    for size in (8, 10, 12):
        out = compiled(torch.randn(4, 3, size, size))
        assert 0 < int((out == 0).sum()) < out.numel()
