"""Small test models beyond the built-ins, shared by the surgery, plan and dropout-family tests.

* :class:`SmallResNet`: torchvision-style residual blocks (conv-BN-ReLU, a shortcut with a 1x1
  conv + BN where the shape changes, and one ``nn.ReLU`` called twice per block).
* :class:`SmallTransformer`: an ``nn.TransformerEncoder`` over a projected token sequence.
* :class:`PreNormTransformer`: hand-written pre-norm blocks (``x + attn(ln(x))``,
  ``x + mlp(ln(x))``) that ``torch.fx`` can trace, for DropPath.
* :class:`Untraceable`: a forward with Python control flow on tensor values.
* :class:`DropoutBeforeBN`: the order that causes BatchNorm's variance shift.
* :class:`MLPWithDropout`: an MLP that already has dropout after each activation.
"""
from __future__ import annotations

import torch
from torch import nn


class BasicBlock(nn.Module):
    """ResNet basic block as torchvision writes it (He et al., CVPR 2016)."""

    def __init__(self, cin: int, cout: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.downsample = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride=stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        if self.downsample is not None:
            identity = self.downsample(x)
        out += identity
        return self.relu(out)


class SmallResNet(nn.Module):
    """A stem, two stages of two basic blocks, global pooling and a linear head; input (N, 3, 16, 16)."""

    def __init__(self, num_outputs: int = 10, width: int = 8) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU())
        self.layer1 = nn.Sequential(BasicBlock(width, width), BasicBlock(width, width))
        self.layer2 = nn.Sequential(BasicBlock(width, 2 * width, stride=2), BasicBlock(2 * width, 2 * width))
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(2 * width, num_outputs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layer2(self.layer1(self.stem(x)))
        return self.fc(torch.flatten(self.pool(x), 1))


class SmallTransformer(nn.Module):
    """Token projection, a two-layer ``nn.TransformerEncoder`` and a linear head on the mean token;
    input (N, T, in_features)."""

    def __init__(self, in_features: int = 8, d_model: int = 16, num_outputs: int = 10, dropout: float = 0.0) -> None:
        super().__init__()
        self.proj = nn.Linear(in_features, d_model)
        layer = nn.TransformerEncoderLayer(d_model, nhead=2, dim_feedforward=32, dropout=dropout, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, num_layers=2, enable_nested_tensor=False)
        self.head = nn.Linear(d_model, num_outputs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(self.proj(x)).mean(dim=1))


class PreNormBlock(nn.Module):
    """``x + attn(ln(x))`` then ``x + mlp(ln(x))``, written out so ``torch.fx`` sees both adds."""

    def __init__(self, d_model: int = 16) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(d_model)
        self.attn = nn.MultiheadAttention(d_model, 2, batch_first=True)
        self.ln2 = nn.LayerNorm(d_model)
        self.mlp = nn.Sequential(nn.Linear(d_model, 2 * d_model), nn.GELU(), nn.Linear(2 * d_model, d_model))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.ln1(x)
        a, _ = self.attn(h, h, h, need_weights=False)
        x = x + a
        return x + self.mlp(self.ln2(x))


class PreNormTransformer(nn.Module):
    """Projection, ``depth`` pre-norm blocks and a linear head; input (N, T, in_features)."""

    def __init__(self, in_features: int = 8, d_model: int = 16, depth: int = 3, num_outputs: int = 10) -> None:
        super().__init__()
        self.proj = nn.Linear(in_features, d_model)
        self.blocks = nn.Sequential(*[PreNormBlock(d_model) for _ in range(depth)])
        self.head = nn.Linear(d_model, num_outputs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.blocks(self.proj(x)).mean(dim=1))


class Untraceable(nn.Module):
    """A residual MLP whose forward branches on a tensor value: ``torch.fx`` cannot trace it."""

    def __init__(self, width: int = 16) -> None:
        super().__init__()
        self.fc1 = nn.Linear(width, width)
        self.act = nn.ReLU()
        self.fc2 = nn.Linear(width, width)
        self.head = nn.Linear(width, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x + self.fc2(self.act(self.fc1(x)))
        if h.sum() > 0:
            h = h * 1.0
        return self.head(h)


class DropoutBeforeBN(nn.Module):
    """Linear -> Dropout -> BatchNorm1d -> ReLU -> Linear: dropout feeding BatchNorm."""

    def __init__(self, width: int = 16) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(width, width), nn.Dropout(0.5), nn.BatchNorm1d(width), nn.ReLU(),
                                 nn.Linear(width, 2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class MLPWithDropout(nn.Module):
    """An MLP that already has ``nn.Dropout(0.25)`` after each hidden activation; custom forward."""

    def __init__(self, width: int = 16) -> None:
        super().__init__()
        self.fc1 = nn.Linear(width, width)
        self.act1 = nn.ReLU()
        self.drop1 = nn.Dropout(0.25)
        self.fc2 = nn.Linear(width, width)
        self.act2 = nn.ReLU()
        self.drop2 = nn.Dropout(0.25)
        self.head = nn.Linear(width, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.drop1(self.act1(self.fc1(x)))
        x = self.drop2(self.act2(self.fc2(x)))
        return self.head(x)
