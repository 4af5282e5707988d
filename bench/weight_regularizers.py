"""Cost of the weight regularizers per training step, and the drift weight noise avoids.

1. Milliseconds per training step (forward, backward, optimizer step and the regularizer's
   per-step work) of the ``cnn`` demo model on a batch of 64 digits, each regularizer alone,
   measured interleaved in one run, as a ratio to the same step without regularizer. The
   per-step work is what the Lightning callbacks do: ``decoupled_decay_`` before the step
   (decoupled decay with Adam), the max-norm step post-hook, the penalties added to the loss.
2. Weight noise restores the original parameter object after each forward pass. The usual
   alternative, adding the noise in place and subtracting it afterwards, rounds: this prints
   how far the weights drift from where they started after N perturbed passes with a learning
   rate of 0, for both.

Run: ``python bench/weight_regularizers.py`` (``--threads N``, ``--steps N``).
"""
from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _timing import compare  # noqa: E402
from regfw_plugins.weight_decay import decoupled_decay_  # noqa: E402

from regfw.build.models import CNN  # noqa: E402
from regfw.placement.plan import apply_plan, make_plan  # noqa: E402
from regfw.registry.regularizers import build_regularizers  # noqa: E402

VARIANTS = {
    "none (adam)": ("adam", {}),
    "weight_decay decoupled, adamw (native)": ("adamw", {"weight_decay": {}}),
    "weight_decay decoupled, adam (callback)": ("adam", {"weight_decay": {}}),
    "weight_decay l2 (penalty)": ("adam", {"weight_decay": {"mode": "l2"}}),
    "l1 (penalty)": ("adam", {"l1": {}}),
    "max_norm (post-step hook)": ("adam", {"max_norm": {}}),
    "noise input_std=0.1": ("adam", {"noise": {"input_std": 0.1}}),
    "noise weight_std=0.01 (all layers)": ("adam", {"noise": {"input_std": 0, "weight_std": 0.01}}),
}


def make_step(optimizer: str, section: dict, x: torch.Tensor, y: torch.Tensor):
    torch.manual_seed(0)
    model = CNN()
    regs = build_regularizers(section)
    apply_plan(model, regs, make_plan(model, regs, example_input=x[:2]))
    groups = next((g for r in regs if (g := r.param_groups(model)) is not None), None)
    params = groups if groups is not None else model.parameters()
    opt = {"adam": torch.optim.Adam, "adamw": torch.optim.AdamW}[optimizer](params, lr=1e-3)
    for reg in regs:
        if hasattr(reg, "attach"):
            reg.attach(opt)
    model.train()

    def step() -> None:
        opt.zero_grad()
        loss = F.cross_entropy(model(x), y)
        for reg in regs:
            penalty = reg.penalty(model)
            if penalty is not None:
                loss = loss + penalty
        loss.backward()
        decoupled_decay_(opt)
        opt.step()

    return step


def drift(steps: int) -> tuple[float, float]:
    """Max |w - w0| after ``steps`` perturbed passes at lr 0: (restore the object, subtract the noise)."""
    from regfw_plugins.noise import add_weight_noise

    torch.manual_seed(0)
    base = nn.Linear(64, 64)
    x = torch.randn(32, 64)

    swapped = copy.deepcopy(base)
    add_weight_noise(swapped, 1.0)
    for _ in range(steps):
        swapped(x).sum().backward()

    subtracted = copy.deepcopy(base)
    for _ in range(steps):
        noise = torch.randn_like(subtracted.weight)
        with torch.no_grad():
            subtracted.weight.add_(noise)
        subtracted(x).sum().backward()
        with torch.no_grad():
            subtracted.weight.sub_(noise)

    w0 = base.weight.detach()
    return (float((swapped.weight.detach() - w0).abs().max()), float((subtracted.weight.detach() - w0).abs().max()))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--steps", type=int, default=1000, help="perturbed passes for the drift measurement")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    x, y = torch.rand(64, 64), torch.randint(0, 10, (64,))
    steps = {name: make_step(opt, section, x, y) for name, (opt, section) in VARIANTS.items()}
    ms = compare(steps, repeats=args.repeats)
    base = ms["none (adam)"]
    print(f"cnn training step, batch 64, {args.threads} thread(s), median of {args.repeats} interleaved rounds")
    for name, value in ms.items():
        print(f"  {name:42s} {value:7.2f} ms  x{value / base:.2f}")
    kept, subtracted = drift(args.steps)
    print(f"weight noise std 1.0, {args.steps} passes at lr 0: max |w - w0| restore-the-parameter {kept:.3g}, "
          f"subtract-the-noise {subtracted:.3g}")


if __name__ == "__main__":
    main()
