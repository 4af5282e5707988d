"""Cost of the step regularizers per training step, and of R-Drop's batched second pass.

Milliseconds per training step (batch transforms, forward, loss, terms, backward, optimizer
step, all through :func:`regfw.train.steps.regularized_step`) of an MLP with dropout on a batch of 64
digits, measured interleaved in one run, as a ratio to the same step without regularizer:
``mixup``, ``cutmix`` (on the 8x8 images), ``label_smoothing``, ``confidence_penalty`` and
``rdrop`` with the second pass batched with the first (``batched: true``, one forward call on
the doubled batch) or in a second forward call (``batched: false``). Both R-Drop modes compute
the same loss (``tests/builtin_plugins/test_rdrop.py::test_rdrop_batched_equals_two_separate_passes``).

Run: ``python bench/step_regularizers.py`` (``--threads N``).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _timing import compare  # noqa: E402

from regfw.registry.regularizers import build_regularizers  # noqa: E402
from regfw.train.steps import regularized_step  # noqa: E402

CASES = {
    "none": {},
    "mixup": {"mixup": {}},
    "cutmix": {"mixup": {"cutmix": True, "alpha": 1.0}},
    "label_smoothing": {"label_smoothing": {}},
    "confidence_penalty": {"confidence_penalty": {}},
    "rdrop batched": {"rdrop": {}},
    "rdrop two calls": {"rdrop": {"batched": False}},
}


class Net(nn.Module):
    """An MLP over the 8x8 digit images (so that cutmix has images to cut)."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Flatten(), nn.Linear(64, 256), nn.ReLU(), nn.Dropout(0.3),
                                  nn.Linear(256, 256), nn.ReLU(), nn.Dropout(0.3), nn.Linear(256, 10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    data = load_digits()
    x = torch.tensor(data.data[:64], dtype=torch.float32).reshape(64, 1, 8, 8) / 16
    y = torch.tensor(data.target[:64])
    torch.manual_seed(0)
    fns = {}
    for name, section in CASES.items():
        regs, model = build_regularizers(section), Net()
        opt = torch.optim.Adam(model.parameters(), lr=1e-3)

        def step(regs=regs, model=model, opt=opt) -> None:
            result = regularized_step(regs, model, x, y, F.cross_entropy, task="classification")
            opt.zero_grad()
            result.total.backward()
            opt.step()

        fns[name] = step
    ms = compare(fns, repeats=40, warmup=5)
    print(f"training step, MLP 64-256-256-10 with dropout, batch 64, {args.threads} thread(s):")
    for name, value in ms.items():
        print(f"  {name:20s} {value:7.3f} ms  {value / ms['none']:5.2f}x")
    print(f"rdrop: two forward calls / one batched call = {ms['rdrop two calls'] / ms['rdrop batched']:.2f}x")


if __name__ == "__main__":
    main()
