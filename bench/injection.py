"""Injected dropout vs hand-written ``nn.Dropout``: the cost of a training step, in one run.

    python bench/injection.py            # about 15-30 s on 2 CPU cores

For an MLP and a small conv net, times a full training step (zero_grad, forward, cross-entropy,
backward, SGD step) of

* ``hand-written``: the model written with ``nn.Dropout`` layers in its ``nn.Sequential``, and
* ``injected``: the same model written without dropout, regularized by regfw's ``dropout`` plugin
  at the same places and rates (modules hung on the activations and called from forward hooks),

measured round-robin in one process on one thread (``bench/_timing.py``, median of 100 rounds),
and prints the ratio injected / hand-written (target: at most 1.05). The injected path adds one
forward hook and one small module call per insertion: a few microseconds per step.
"""
from __future__ import annotations

import sys
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from _timing import compare  # noqa: E402

from regfw.placement.plan import apply_plan, make_plan  # noqa: E402
from regfw.registry.regularizers import build_regularizers  # noqa: E402

P_INPUT, P_HIDDEN, P_CONV = 0.2, 0.5, 0.1


def mlp(dropout: bool, width: int = 512) -> nn.Module:
    def drop(p: float) -> list[nn.Module]:
        return [nn.Dropout(p)] if dropout else []

    return nn.Sequential(*drop(P_INPUT), nn.Linear(784, width), nn.ReLU(), *drop(P_HIDDEN),
                         nn.Linear(width, width), nn.ReLU(), *drop(P_HIDDEN), nn.Linear(width, 10))


def cnn(dropout: bool, width: int = 16) -> nn.Module:
    def drop(p: float) -> list[nn.Module]:
        return [nn.Dropout(p)] if dropout else []

    return nn.Sequential(
        nn.Conv2d(3, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(), *drop(P_CONV),
        nn.Conv2d(width, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(), *drop(P_CONV),
        nn.AdaptiveAvgPool2d(4), nn.Flatten(), nn.Linear(16 * width, 128), nn.ReLU(), *drop(P_HIDDEN),
        nn.Linear(128, 10),
    )


def injected(make: Callable[[bool], nn.Module], x: torch.Tensor, rates: dict) -> nn.Module:
    model = make(False)
    regs = build_regularizers({"dropout": rates})
    plan = make_plan(model, regs, example_input=x[:2])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        apply_plan(model, regs, plan)
    inserted = sum(1 for r in plan.rows() if r.action in ("after", "before"))
    hand = sum(1 for m in make(True).modules() if isinstance(m, nn.Dropout))
    assert inserted == hand, (inserted, hand)
    return model


def step_fn(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> Callable[[], None]:
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    model.train()

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        opt.step()

    return step


def main() -> None:
    torch.manual_seed(0)
    torch.set_num_threads(1)  # one thread: less sensitive to other processes on a shared machine
    cases = {
        "mlp 784-512-512-10, batch 128": (mlp, torch.randn(128, 784),
                                           {"input": P_INPUT, "hidden": P_HIDDEN}),
        "cnn 2 conv blocks + head, 16x16, batch 32": (cnn, torch.randn(32, 3, 16, 16),
                                                      {"input": 0, "conv": P_CONV, "hidden": P_HIDDEN}),
    }
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    for name, (make, x, rates) in cases.items():
        y = torch.randint(0, 10, (len(x),))
        torch.manual_seed(1)
        hand = make(True)
        torch.manual_seed(1)
        inj = injected(make, x, rates)
        times = compare({"hand-written": step_fn(hand, x, y), "injected": step_fn(inj, x, y)},
                        repeats=100, warmup=10)
        ratio = times["injected"] / times["hand-written"]
        print(f"{name}: hand-written {times['hand-written']:.2f} ms, injected {times['injected']:.2f} ms, "
              f"ratio {ratio:.3f}x (target <= 1.05x)")


if __name__ == "__main__":
    main()
