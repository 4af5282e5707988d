"""torch.compile against eager: a training step and Monte Carlo dropout, on regfw-regularized models.

Two models, each regularized the way a config does it (a plan from the registry, applied):

1. an MLP 784-512-512-10 with regfw dropout (``dropout``: on the input and after each hidden layer),
   batch 256;
2. a small CNN (three conv blocks, BatchNorm, 32x32 inputs) with DropBlock (``dropblock``) after each
   block's activation, batch 64.

The rates are the plan's for 50,000 training examples (printed).

For each, measured side by side in one run (interleaved repeats, median; CPU time of the process on
CPU, wall time after a synchronise on CUDA; ``timed`` of ``bench/mc_dropout.py``):

* a training step (forward, cross-entropy, backward, SGD step): eager, and ``torch.compile(model)``
  (TorchInductor, default mode); the ratio compiled / eager;
* ``mc_predict`` with T = 30 on the same batch, strategies ``loop``, ``batched`` and ``auto``, the
  eager model and the compiled one (``auto`` on a compiled model splits and replays the module it
  wraps, so it runs eager code: the ratio says what that costs); ratios compiled / eager.

The one-off compile time (the first call of each compiled function, wall time) is printed apart.
Eager regfw layers draw their masks from sliced random words on CPU (:mod:`regfw.layers.masks`);
compiled graphs draw them in TorchInductor's own kernels.

Usage: ``python bench/compile.py [--device cpu|cuda] [--repeats N] [--threads N]``.
"""
from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _timing import add_device_options, device_from  # noqa: E402
from mc_dropout import timed  # noqa: E402

from regfw.placement.plan import apply_plan, make_plan  # noqa: E402
from regfw.registry.regularizers import build_regularizers  # noqa: E402
from regfw.uncertainty import mc_predict  # noqa: E402

SAMPLES = 30


def mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(784, 512), nn.ReLU(), nn.Linear(512, 512), nn.ReLU(), nn.Linear(512, 10))


def cnn() -> nn.Module:
    def block(cin: int, cout: int) -> list[nn.Module]:
        return [nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU(), nn.MaxPool2d(2)]

    return nn.Sequential(*block(3, 32), *block(32, 64), *block(64, 64), nn.Flatten(), nn.Linear(64 * 16, 10))


def regularized(build: Callable[[], nn.Module], section: dict, x: torch.Tensor,
                device: torch.device) -> tuple[nn.Module, str]:
    """The model with the plan of ``section`` applied (rates for 50,000 training examples), and the
    plan's rows in a few words."""
    torch.manual_seed(0)
    model = build()
    regs = build_regularizers(section)
    plan = make_plan(model, regs, 50_000, x)
    apply_plan(model, regs, plan)
    rows = ", ".join(f"{r.variant} {r.rate:.2f} {r.action} {r.path}" for r in plan.rows() if r.action != "note")
    return model.to(device), rows


def first_call(fn: Callable[[], object], device: torch.device) -> float:
    """Wall seconds of one call (the compile, for a compiled function's first)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start


def train_step(model: nn.Module, forward: Callable, x: torch.Tensor, y: torch.Tensor) -> Callable[[], None]:
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)

    def step() -> None:
        model.train()
        loss = F.cross_entropy(forward(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return step


def mc(model: nn.Module, x: torch.Tensor, strategy: str) -> Callable[[], object]:
    def run() -> object:
        model.eval()
        return mc_predict(model, x, samples=SAMPLES, strategy=strategy, seed=0)

    return run


def report(t: dict[str, float], whats: list[str]) -> None:
    for what in whats:
        eager, comp = t[f"{what}, eager"], t[f"{what}, compiled"]
        print(f"    {what:<20} eager {eager * 1e3:8.2f} ms   compiled {comp * 1e3:8.2f} ms   "
              f"compiled / eager {comp / eager:5.2f}x")


def part(title: str, model: nn.Module, x: torch.Tensor, device: torch.device, repeats: int) -> None:
    """Training first, then Monte Carlo dropout, each timed on its own (as a run uses them)."""
    y = torch.randint(0, 10, (x.shape[0],), device=device)
    compiled = torch.compile(model)
    print(f"\n{title}, input {tuple(x.shape)}")
    train = {"train step, eager": train_step(model, model, x, y),
             "train step, compiled": train_step(model, compiled, x, y)}
    sampling = {}
    for strategy in ("loop", "batched", "auto"):
        sampling[f"mc_predict {strategy}, eager"] = mc(model, x, strategy)
        sampling[f"mc_predict {strategy}, compiled"] = mc(compiled, x, strategy)
    first = {}
    for fns in (train, sampling):
        first.update({name: first_call(fn, device) for name, fn in fns.items() if name.endswith("compiled")})
    print("    first call (compile included), wall: "
          + ", ".join(f"{name.removesuffix(', compiled')} {sec:.1f} s" for name, sec in first.items()))
    report(timed(train, repeats, device), ["train step"])
    report(timed(sampling, repeats, device), [f"mc_predict {s}" for s in ("loop", "batched", "auto")])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_device_options(parser)
    parser.add_argument("--repeats", type=int, default=10)
    args = parser.parse_args()
    device, name = device_from(parser, args)
    print(f"{name}, T = {SAMPLES}; times: "
          + ("CPU time of the process" if device.type == "cpu" else "wall time"))
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(256, 784, generator=gen).to(device)
    model, rows = regularized(mlp, {"dropout": {}}, x.cpu(), device)
    part(f"[1] MLP 784-512-512-10, batch 256; {rows}", model, x, device, args.repeats)
    x = torch.randn(64, 3, 32, 32, generator=gen).to(device)
    model, rows = regularized(cnn, {"dropblock": {}}, x.cpu(), device)
    part(f"[2] CNN, 3 conv blocks with BatchNorm, batch 64; {rows}", model, x, device, args.repeats)


if __name__ == "__main__":
    main()
