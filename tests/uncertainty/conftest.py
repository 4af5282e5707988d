"""Fixtures of the uncertainty tests: sklearn digits and a trained dropout MLP."""
from __future__ import annotations

import pytest
import torch
from unc_helpers import make_mlp, train_plain


@pytest.fixture(scope="session")
def digits():
    """Digits as float tensors in [0, 1], split 1437 train / 360 validation (fixed seed)."""
    from sklearn.datasets import load_digits

    data = load_digits()
    x = torch.tensor(data.data, dtype=torch.float32) / 16.0
    y = torch.tensor(data.target, dtype=torch.long)
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
    x, y = x[perm], y[perm]
    return x[:1437], y[:1437], x[1437:], y[1437:]


@pytest.fixture(scope="session")
def trained_mlp(digits):
    """A dropout MLP trained on digits in plain torch (10 epochs, well under a second on one core)."""
    xtr, ytr, _, _ = digits
    torch.manual_seed(0)
    model = make_mlp(p=0.5, hidden=64)
    return train_plain(model, xtr, ytr, epochs=10, seed=0, lr=3e-3)


@pytest.fixture
def one_thread():
    """Tiny models: one intra-op thread runs them several times faster on a busy machine (a test
    module opts in with ``pytestmark = pytest.mark.usefixtures("one_thread")``)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
