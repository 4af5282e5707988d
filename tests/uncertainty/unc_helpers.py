"""Helpers shared by the uncertainty tests: small dropout MLPs and a plain torch training loop."""
from __future__ import annotations

import torch
from torch import nn


def make_mlp(p: float = 0.5, hidden: int = 64, batchnorm: bool = False, out: int = 10) -> nn.Sequential:
    layers: list[nn.Module] = [nn.Linear(64, hidden)]
    if batchnorm:
        layers.append(nn.BatchNorm1d(hidden))
    layers += [nn.ReLU(), nn.Dropout(p), nn.Linear(hidden, hidden), nn.ReLU(), nn.Dropout(p), nn.Linear(hidden, out)]
    return nn.Sequential(*layers)


def train_plain(model: nn.Module, x: torch.Tensor, y: torch.Tensor, epochs: int, seed: int = 0,
                lr: float = 1e-3, batch: int = 64, between=None) -> nn.Module:
    """A plain torch training loop using the global RNG (shuffling and dropout masks).

    ``between(model, epoch)`` is called after each epoch (for RNG-isolation tests).
    """
    torch.manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    loss_fn = nn.CrossEntropyLoss()
    for epoch in range(epochs):
        model.train()
        perm = torch.randperm(len(x))
        for i in range(0, len(x), batch):
            idx = perm[i:i + batch]
            opt.zero_grad()
            loss_fn(model(x[idx]), y[idx]).backward()
            opt.step()
        if between is not None:
            between(model, epoch)
    model.eval()
    return model
