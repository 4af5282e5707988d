"""Built-in demo models, one per layer kind of the rate table: ``mlp``, ``cnn``, ``lstm``.

They take flat 64-feature digits rows (or any ``in_features`` for ``mlp``) so the same data
module serves all three: ``cnn`` reads the row as an 8x8 image, ``lstm`` as 8 steps of 8.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn


class MLP(nn.Module):
    """Linear-ReLU blocks and a linear head."""

    def __init__(self, in_features: int = 64, num_outputs: int = 10, hidden: Sequence[int] = (256, 128)) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        width = in_features
        for h in hidden:
            layers += [nn.Linear(width, h), nn.ReLU()]
            width = h
        self.body = nn.Sequential(*layers)
        self.head = nn.Linear(width, num_outputs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))


class CNN(nn.Module):
    """Two conv blocks with BatchNorm on an image and a two-layer classifier head."""

    def __init__(self, in_features: int = 64, num_outputs: int = 10, channels: Sequence[int] = (16, 32),
                 side: int = 8, hidden: int = 64) -> None:
        super().__init__()
        if side * side != in_features:
            raise ValueError(f"cnn: in_features={in_features} is not side*side with side={side}")
        self.side = side
        c1, c2 = channels
        self.features = nn.Sequential(
            nn.Conv2d(1, c1, 3, padding=1), nn.BatchNorm2d(c1), nn.ReLU(),
            nn.Conv2d(c1, c2, 3, padding=1), nn.BatchNorm2d(c2), nn.ReLU(),
            nn.AdaptiveAvgPool2d(2),
        )
        self.classifier = nn.Sequential(nn.Flatten(), nn.Linear(c2 * 4, hidden), nn.ReLU(),
                                        nn.Linear(hidden, num_outputs))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.reshape(x.shape[0], 1, self.side, self.side)
        return self.classifier(self.features(x))


class LSTMClassifier(nn.Module):
    """An LSTM over the rows of the image (8 steps of 8 features) and a linear head."""

    def __init__(self, in_features: int = 64, num_outputs: int = 10, steps: int = 8, hidden: int = 64) -> None:
        super().__init__()
        if in_features % steps:
            raise ValueError(f"lstm: in_features={in_features} is not divisible by steps={steps}")
        self.steps = steps
        self.rnn = nn.LSTM(in_features // steps, hidden, batch_first=True)
        self.head = nn.Linear(hidden, num_outputs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        seq = x.reshape(x.shape[0], self.steps, -1)
        out, _ = self.rnn(seq)
        return self.head(out[:, -1])


BUILTIN_MODELS: dict[str, type[nn.Module]] = {"mlp": MLP, "cnn": CNN, "lstm": LSTMClassifier}
