"""Digits classifiers trained with and without a step regularizer, shared by the step-regularizer tests
(``mixup``, ``rdrop``, ``label_smoothing``, ``confidence_penalty``).

Each model trains through :func:`regfw.train.steps.regularized_step` with the regularizer built by the
registry from its config section, exactly as ``RegularizedModule`` does, and is compared with the
same model, seed and data trained without it. Trained models are cached per process, so the
baseline is trained once for all the files that compare against it.
"""
from __future__ import annotations

import functools

import pytest
import torch
import torch.nn.functional as F
from regfw_plugins.confidence_penalty import entropy
from sklearn.datasets import load_digits
from torch import nn

from regfw.errors import ConfigError
from regfw.registry.regularizers import build_regularizers
from regfw.train.steps import Step, regularized_step

N_TRAIN = 1000


@functools.lru_cache(maxsize=1)
def digits() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """1000 training and 797 held-out digits (8x8 pixels scaled to [0, 1]), split with seed 0."""
    data = load_digits()
    x = torch.tensor(data.data, dtype=torch.float32) / 16
    y = torch.tensor(data.target)
    idx = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
    return x[idx[:N_TRAIN]], y[idx[:N_TRAIN]], x[idx[N_TRAIN:]], y[idx[N_TRAIN:]]


def mlp(p: float = 0.0) -> nn.Module:
    """A 64-64-10 MLP with dropout ``p`` after its hidden layer."""
    return nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Dropout(p), nn.Linear(64, 10))


@functools.cache
def trained(section: tuple, p: float = 0.0, epochs: int = 30) -> nn.Module:
    """An MLP trained on 1000 digits with the regularizers of ``section`` (a tuple of (name, settings items))."""
    x, y, _, _ = digits()
    torch.manual_seed(0)
    regs = build_regularizers({name: dict(items) for name, items in section})
    model = mlp(p)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(epochs):
        order = torch.randperm(N_TRAIN)
        for i in range(0, N_TRAIN, 100):
            b = order[i:i + 100]
            result = regularized_step(regs, model, x[b], y[b], F.cross_entropy, task="classification")
            opt.zero_grad()
            result.total.backward()
            opt.step()
    return model


def held_out(model: nn.Module) -> dict[str, float]:
    """Accuracy, mean max probability and mean entropy on the 797 held-out digits (eval mode)."""
    _, _, x, y = digits()
    model.eval()
    with torch.no_grad():
        logits = model(x)
    model.train()
    return {"acc": (logits.argmax(-1) == y).float().mean().item(),
            "max_prob": logits.softmax(-1).max(-1).values.mean().item(),
            "entropy": entropy(logits).mean().item()}


def assert_rejects_regression(name: str) -> None:
    """The regularizer ``name`` acts on class probabilities: a regression step is a config error naming it."""
    (reg,) = build_regularizers({name: {}})
    step = Step(model=nn.Identity(), inputs=torch.zeros(2, 1), targets=torch.zeros(2, 1),
                outputs=torch.zeros(2, 1), task="regression")
    with pytest.raises(ConfigError, match=rf"regularizers\.{name}: acts on class probabilities"):
        reg.transform_loss(F.mse_loss, step)
        reg.loss_term(step)  # the one of the two methods that the regularizer overrides raises
